//! The `p2pchat-discovery` binary: it serves, shuts down cleanly on SIGTERM, and explains
//! what is wrong when it cannot start.

use std::process::Stdio;
use std::time::Duration;

use p2pchat_core::Identity;
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
    // Its stdout stays open to the end: the server may still write to it.
    let mut server = discovery_process(
        dir.path(),
        &["--listen", "127.0.0.1:0", "--presence-ttl", "2"],
    )
    .await;
    let addr = server.addr;
    let (session, _rx) = register(&client(addr), &Identity::generate(), "alice").await;
    assert!(session.lookup("alice").await.unwrap().unwrap().online);
    assert!(dir.path().join("directory.redb").exists());

    let pid = server.child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(WAIT, server.child.wait())
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

#[tokio::test]
async fn announce_signs_with_the_servers_operator_key_and_every_online_node_shows_it() {
    use futures::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let server = discovery_process(dir.path(), &["--listen", "127.0.0.1:0"]).await;
    let addr = server.addr.to_string();
    assert!(dir.path().join("operator.key").exists(), "created at start");
    let node = p2pchat_core::ChatNode::builder()
        .username("reader")
        .listen("127.0.0.1:0".parse().unwrap())
        .discovery(client(addr.parse().unwrap()))
        .spawn()
        .await
        .unwrap();
    let mut events = node.events();

    let out = binary()
        .args([
            "announce",
            "server restarts at noon",
            "--server",
            &addr,
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("relayed by the server"), "{said}");
    let shown = tokio::time::timeout(WAIT, async {
        loop {
            if let p2pchat_core::Event::Announcement { text } = events.next().await.unwrap() {
                return text;
            }
        }
    })
    .await
    .expect("the node shows it");
    assert_eq!(shown, "server restarts at noon");

    // Without the operator key there is nothing to sign with.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = binary()
        .args(["announce", "hi", "--server", &addr, "--data-dir"])
        .arg(elsewhere.path())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no operator key"), "{stderr}");
    node.shutdown().await.unwrap();
}

/// Runs the binary with the platform's data directory in `home` (empty in these tests).
async fn run_with_home(home: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut cmd = binary();
    cmd.env("HOME", home)
        .env("XDG_DATA_HOME", home.join("data"))
        .args(args);
    tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("it ends in time")
        .unwrap()
}

#[tokio::test]
async fn announce_needs_the_data_dir_its_server_was_started_with_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let server = discovery_process(dir.path(), &["--listen", "127.0.0.1:0"]).await;
    let addr = server.addr.to_string();
    let home = tempfile::tempdir().unwrap();

    // `--data-dir DIR` after the subcommand, or before it as for the server: its key.
    for args in [
        &["announce", "one", "--server", &addr, "--data-dir", data][..],
        &["--data-dir", data, "announce", "two", "--server", &addr][..],
    ] {
        let out = run_with_home(home.path(), args).await;
        assert!(out.status.success(), "{args:?}: {out:?}");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("relayed by the server"), "{args:?}: {said}");
    }

    // Without it, `announce` looks in the platform's data directory, finds no key, and says
    // where it looked and what to pass.
    let out = run_with_home(home.path(), &["announce", "three", "--server", &addr]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let looked = home.path().join("data/p2pchat-discovery/operator.key");
    assert!(
        stderr.contains(&format!(
            "no operator key at {} (the default data directory)",
            looked.display()
        )),
        "stderr: {stderr}"
    );
    assert!(
        stderr.contains("a server started with `--data-dir DIR` needs `announce --data-dir DIR`"),
        "stderr: {stderr}"
    );
    assert!(!looked.exists(), "announce creates no key");

    // An announcement with nothing to say is refused with a sentence, not shown blank.
    let out = run_with_home(
        home.path(),
        &["announce", "  ", "--server", &addr, "--data-dir", data],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("an announcement needs some text"),
        "stderr: {stderr}"
    );
    server.kill().await;
}
