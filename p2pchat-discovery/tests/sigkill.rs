//! A client killed with SIGKILL goes offline (pushed to its watchers) within the presence
//! TTL. The client must be another process, so this test binary runs itself as the child:
//! with `P2PCHAT_SIGKILL_CHILD=<server address>` set it registers "victim" and keeps alive
//! until it is killed. (`harness = false`; it prints a libtest-style result line.)

use std::time::{Duration, Instant};

use p2pchat_core::discovery::{DiscoveryEvent, Registration};
use p2pchat_core::{Discovery, DiscoveryClient, Identity};
use p2pchat_discovery::{Config, Directory, RedbStorage, serve};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

const CHILD_ENV: &str = "P2PCHAT_SIGKILL_CHILD";
const NAME: &str = "client_killed_with_sigkill_goes_offline_within_the_presence_ttl";
const TTL: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(15);

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("{NAME}: test");
        return;
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    if let Ok(addr) = std::env::var(CHILD_ENV) {
        runtime.block_on(child(addr));
        return;
    }
    let started = Instant::now();
    let outcome = std::panic::catch_unwind(|| runtime.block_on(parent()));
    let secs = started.elapsed().as_secs_f64();
    match outcome {
        Ok(()) => {
            println!("test {NAME} ... ok");
            println!(
                "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in {secs:.2}s"
            );
        }
        Err(_) => {
            println!("test {NAME} ... FAILED");
            println!(
                "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in {secs:.2}s"
            );
            std::process::exit(101);
        }
    }
}

fn registration(name: &str) -> Registration {
    Registration {
        username: name.to_owned(),
        listen_port: 7000,
        announce: Vec::new(),
        dialable: true,
    }
}

/// The victim: registers, says so on stdout, keeps alive until killed.
async fn child(addr: String) {
    let (tx, _rx) = mpsc::channel(8);
    let session = DiscoveryClient::new(addr)
        .register(&Identity::generate(), registration("victim"), tx)
        .await
        .expect("the child registers");
    println!("registered");
    loop {
        tokio::time::sleep(TTL / 4).await;
        let _ = session.keep_alive().await;
    }
}

async fn parent() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = Config {
        presence_ttl: TTL,
        idle_timeout: TTL * 3,
        ..Config::default()
    };
    let server = Directory::new(config, RedbStorage::open(dir.path()).expect("redb"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(serve(listener, server, async move {
        let _ = stopped.await;
    }));

    let mut child = tokio::process::Command::new(std::env::current_exe().expect("own path"))
        .env(CHILD_ENV, addr.to_string())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the child");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("the child registers in time")
        .expect("read the child");
    assert_eq!(line.as_deref(), Some("registered"));

    let (tx, mut pushes) = mpsc::channel(8);
    let watcher = DiscoveryClient::new(addr.to_string())
        .register(&Identity::generate(), registration("watcher"), tx)
        .await
        .expect("the watcher registers");
    watcher.watch("victim").await.expect("watch");
    assert!(
        watcher
            .lookup("victim")
            .await
            .expect("lookup")
            .expect("known")
            .online
    );

    child.start_kill().expect("SIGKILL the child");
    let killed = Instant::now();
    let offline = tokio::time::timeout(TTL, async {
        loop {
            match pushes.recv().await {
                Some(DiscoveryEvent::PeerOffline { username }) if username == "victim" => return,
                Some(_) => {}
                None => panic!("push channel closed"),
            }
        }
    })
    .await;
    assert!(
        offline.is_ok(),
        "no offline push within the presence TTL of {TTL:?}"
    );
    eprintln!("victim offline {:?} after SIGKILL", killed.elapsed());
    let record = watcher
        .lookup("victim")
        .await
        .expect("lookup")
        .expect("claim stays");
    assert!(!record.online);
    let _ = child.wait().await;
    let _ = stop.send(());
    serving.await.expect("server stops");
}
