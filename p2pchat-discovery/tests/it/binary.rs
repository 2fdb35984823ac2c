//! The `p2pchat-discovery` binary: it serves, shuts down cleanly on SIGTERM, and explains
//! what is wrong when it cannot start.

use std::process::Stdio;
use std::time::Duration;

use p2pchat_core::Identity;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use super::util::*;

fn binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_p2pchat-discovery"));
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

#[tokio::test]
async fn the_binary_serves_on_its_data_dir_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = binary()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--presence-ttl",
            "2",
            "--data-dir",
        ])
        .arg(dir.path())
        .spawn()
        .expect("start the binary");
    let mut stdout = BufReader::new(server.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, stdout.next_line())
        .await
        .expect("it says where it listens")
        .unwrap()
        .expect("a line");
    let addr: std::net::SocketAddr = line
        .strip_prefix("p2pchat-discovery listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .parse()
        .unwrap();
    let (session, _rx) = register(&client(addr), &Identity::generate(), "alice").await;
    assert!(session.lookup("alice").await.unwrap().unwrap().online);
    assert!(dir.path().join("directory.redb").exists());

    let pid = server.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(WAIT, server.wait())
        .await
        .expect("it exits after SIGTERM")
        .unwrap();
    assert!(exit.success(), "clean exit, got {exit:?}");
    assert!(matches!(
        session.keep_alive().await,
        Err(p2pchat_core::DiscoveryError::Unreachable { .. })
    ));
}

async fn fails_with(args: &[&str], expected: &str) {
    let out = tokio::time::timeout(Duration::from_secs(30), binary().args(args).output())
        .await
        .expect("it gives up in time")
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(expected), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
}

#[tokio::test]
async fn the_binary_explains_a_taken_port_and_an_unreachable_redis() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let data = dir.path().to_str().unwrap();
    fails_with(
        &["--listen", &addr, "--data-dir", data],
        &format!("p2pchat-discovery: cannot listen on {addr}"),
    )
    .await;
    // Nothing listens on port 1.
    fails_with(
        &[
            "--listen",
            "127.0.0.1:0",
            "--redis-url",
            "redis://127.0.0.1:1/",
        ],
        "p2pchat-discovery: cannot use Redis at redis://127.0.0.1:1/",
    )
    .await;
}
