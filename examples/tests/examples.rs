//! Runs every example as the program a user runs (`cargo run -p p2pchat-examples --example
//! NAME`) and checks what it printed and did: the examples are documentation, and this keeps
//! them true.
//!
//! The example programs and the `p2pchat-discovery` binary are built first, once, by
//! `cargo build` into this test's own target directory (`cargo test` builds examples only
//! as test harnesses, without their `main`). Examples that need a discovery server get the
//! real binary, started by [`DiscoveryProcess`]; `redis_offline` gets a Redis from
//! [`TestRedis`] (the one `REDIS_URL` names, or a `redis-server` of its own). Every wait is
//! bounded; nothing sleeps.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use futures::StreamExt;
use p2pchat_core::testing::TestRedis;
use p2pchat_core::{
    ChatNode, DiscoveryClient, Event, Events, OfflineStore, RedisStore, RedisStoreConfig,
};
use p2pchat_discovery::testing::DiscoveryProcess;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// The longest one example may run.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest a test waits for one line or one event.
const WAIT: Duration = Duration::from_secs(20);

/// Where the built programs are.
struct Programs {
    /// `target/<profile>/examples`.
    examples: PathBuf,
    /// `target/<profile>/p2pchat-discovery`.
    discovery: PathBuf,
}

/// Builds the example programs and the discovery server, once per test binary, in the
/// profile and target directory of this test (`target/<profile>/deps/<this test>`).
///
/// Always built, never taken as found: `cargo test --all-targets` compiles examples only as
/// test harnesses, so `target/<profile>/examples/<name>` may be missing or stale. One
/// `cargo build` for both, so the server's build shares the examples' dependencies.
fn programs() -> &'static Programs {
    static PROGRAMS: OnceLock<Programs> = OnceLock::new();
    PROGRAMS.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
        let mut build = std::process::Command::new(env!("CARGO"));
        build
            .args(["build", "-p", "p2pchat-examples", "--examples"])
            .args(["-p", "p2pchat-discovery", "--bin", "p2pchat-discovery"])
            .arg("--target-dir")
            .arg(profile_dir.parent().unwrap());
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let output = build.output().expect("run cargo build");
        assert!(
            output.status.success(),
            "building the examples failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        Programs {
            examples: profile_dir.join("examples"),
            discovery: profile_dir.join("p2pchat-discovery"),
        }
    })
}

/// The command running example `name` with `args`, killed if dropped.
fn example(name: &str, args: &[&str]) -> Command {
    let mut command = Command::new(programs().examples.join(name));
    command
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Runs example `name` with `args` to its end; returns its standard output, after checking
/// that it succeeded.
async fn run(name: &str, args: &[&str]) -> String {
    let child = example(name, args).spawn().expect("start the example");
    let output = tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{name} did not finish within {RUN_TIMEOUT:?}"))
        .expect("wait for the example");
    succeeded(name, &output)
}

/// The standard output of a finished example, after checking that it succeeded.
fn succeeded(name: &str, output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{name} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
    stdout
}

/// Checks that `output` has a line containing each of `expected`, in that order (other
/// lines may come between); returns the lines matched.
#[track_caller]
fn in_order<'a>(output: &'a str, expected: &[&str]) -> Vec<&'a str> {
    let mut lines = output.lines();
    expected
        .iter()
        .map(|want| {
            lines
                .find(|line| line.contains(want))
                .unwrap_or_else(|| panic!("no line {want:?} where expected in:\n{output}"))
        })
        .collect()
}

/// How many lines of `output` contain `part`.
fn count(output: &str, part: &str) -> usize {
    output.lines().filter(|line| line.contains(part)).count()
}

/// A `p2pchat-discovery` process on a free port of 127.0.0.1, its store in `dir`.
async fn discovery_server(dir: &Path) -> DiscoveryProcess {
    DiscoveryProcess::start(&programs().discovery, dir, &["--listen", "127.0.0.1:0"])
        .await
        .expect("p2pchat-discovery starts")
}

#[tokio::test]
async fn two_nodes_exchange_the_script_and_every_message_is_acknowledged() {
    let out = run("two_nodes", &[]).await;
    in_order(
        &out,
        &[
            "discovery server listens on 127.0.0.1:",
            "[alice] hi",
            "[bob] hi alice!",
            "[bob] long time no see",
            "[alice] this goes over one TCP connection",
            "[alice] sealed for you alone",
            "[bob] nice. bye!",
            "both nodes shut down",
            "discovery server shut down",
        ],
    );
    assert_eq!(count(&out, "(delivered to "), 6, "{out}");
}

#[tokio::test]
async fn server_chat_delivers_live_and_through_the_server_mailbox_and_runs_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = discovery_server(&dir.path().join("server")).await;
    let addr = server.addr.to_string();
    let nodes = dir.path().join("nodes");
    let args = [addr.as_str(), "--data-dir", nodes.to_str().unwrap()];
    // Twice against the same server: the second run uses the keys the first one saved,
    // so the names are still theirs.
    for run_number in 1..=2 {
        let out = run("server_chat", &args).await;
        in_order(
            &out,
            &[
                &format!("discovery server: {addr}"),
                "online: alice, bob",
                "bob sees: [alice] hi bob",
                "(delivered to bob)",
                "alice sees: [bob] hi alice, what's up?",
                "(delivered to alice)",
                "bob goes offline",
                "(bob is offline: stored in the server's mailbox)",
                "(bob is offline: stored in the server's mailbox)",
                "bob is back",
                "bob sees: [Offline][alice] are you there?",
                "bob sees: [Offline][alice] call me when you are back",
                "alice sees: [bob] back now, got both",
                "(delivered to alice)",
                "both nodes shut down",
            ],
        );
        assert_eq!(count(&out, "[Offline]"), 2, "run {run_number}:\n{out}");
        assert!(nodes.join("bob").join("identity.key").exists());
    }
    server.kill().await;
}

#[tokio::test]
async fn redis_offline_keeps_mail_in_redis_sealed_until_the_peer_returns() {
    let redis = TestRedis::from_env_or_start();
    let url = redis.url();
    let prefix = redis.unique_prefix("redis-offline-example");
    // Listening to bob's mailbox from outside: the example's puts reach this Redis, under
    // this prefix.
    let observer = RedisStore::connect_with(
        &url,
        RedisStoreConfig {
            prefix: prefix.clone(),
            ..RedisStoreConfig::default()
        },
    )
    .await
    .unwrap();
    let mut notices = observer.subscribe("bob").await.unwrap();

    let out = run("redis_offline", &["--redis-url", &url, "--prefix", &prefix]).await;
    in_order(
        &out,
        &[
            &format!("offline mailboxes in Redis at {url} under {prefix}:"),
            "bob sees: [alice] hi bob",
            "(delivered to bob)",
            "bob goes offline",
            "(bob is offline: stored in bob's mailbox in Redis)",
            "(bob is offline: stored in bob's mailbox in Redis)",
            "(bob is offline: stored in bob's mailbox in Redis)",
            &format!("bob's mailbox in Redis ({prefix}:mbox:bob) holds 3 messages:"),
            "from alice: a ",
            "from alice: a ",
            "from alice: a ",
            "bob is back",
            "bob sees: [Offline][alice] bob, are you there?",
            "bob sees: [Offline][alice] this waits in Redis",
            "bob sees: [Offline][alice] sealed: Redis sees only tokens",
            "both nodes and the server shut down",
        ],
    );
    assert_eq!(
        count(&out, "-byte token gAAAAA"),
        3,
        "Fernet tokens:\n{out}"
    );
    tokio::time::timeout(WAIT, notices.next())
        .await
        .expect("a put in bob's mailbox was published on this Redis")
        .expect("the notice stream is open");
}

#[tokio::test]
async fn custom_store_passes_the_suite_and_carries_offline_mail() {
    let out = run("custom_store", &[]).await;
    in_order(
        &out,
        &[
            "MapStore passes the store conformance suite",
            "bob sees: [alice] hi bob",
            "bob goes offline",
            "(bob is offline: stored in the MapStore)",
            "(bob is offline: stored in the MapStore)",
            "the MapStore holds 2 messages for bob:",
            "from alice, a ",
            "from alice, a ",
            "bob is back",
            "bob sees: [Offline][alice] this waits in a MapStore",
            "bob sees: [Offline][alice] and so does this",
            "both nodes shut down",
        ],
    );
}

#[tokio::test]
async fn key_change_warns_holds_both_ways_and_trust_releases() {
    let out = run("key_change", &[]).await;
    let lines = in_order(
        &out,
        &[
            "bob sees: [alice] hello bob",
            "alice pinned bob's key: safety code ",
            "bob registers again with a new key: safety code ",
            "alice is warned: bob's key changed from ",
            "held in alice's outbox: ",
            "bob's message to alice: delivered to alice",
            "nothing from the new key is shown yet",
            "alice trusts bob's new key",
            "alice sees: [bob] yes, new phone",
            "(delivered to bob)",
            "bob sees: [alice] is that really you?",
            "both nodes and the server shut down",
        ],
    );
    let code = |line: &str| line.rsplit("safety code ").next().unwrap().to_owned();
    let (old, new) = (code(lines[1]), code(lines[2]));
    assert_ne!(old, new);
    assert!(
        lines[3].ends_with(&format!("changed from {old} to {new}")),
        "the warning names the pinned key and the new one: {}",
        lines[3]
    );
    assert!(lines[4].ends_with(", Queued"), "{}", lines[4]);
    assert_eq!(count(&out, "held in alice's outbox"), 1, "{out}");
}

/// A running echo bot, its standard output read line by line.
struct Bot {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    /// Every line read so far.
    seen: Vec<String>,
}

impl Bot {
    /// Starts the bot with `args` and waits until it says it is ready.
    async fn start(args: &[&str]) -> Self {
        let mut child = example("echo_bot", args).spawn().expect("start echo_bot");
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut bot = Self {
            child,
            stdout,
            seen: Vec::new(),
        };
        bot.line_with("echo bot 'echo' ready: registered with ")
            .await;
        bot
    }

    /// Reads lines until one contains `part`.
    async fn line_with(&mut self, part: &str) {
        loop {
            let line = tokio::time::timeout(WAIT, self.stdout.next_line())
                .await
                .unwrap_or_else(|_| panic!("no line {part:?} in time; so far:\n{:#?}", self.seen))
                .unwrap()
                .unwrap_or_else(|| panic!("the bot ended before {part:?}:\n{:#?}", self.seen));
            let found = line.contains(part);
            self.seen.push(line);
            if found {
                return;
            }
        }
    }

    /// Waits for the bot to exit; returns everything it printed.
    async fn finish(mut self) -> String {
        let mut rest = Vec::new();
        while let Some(line) = tokio::time::timeout(RUN_TIMEOUT, self.stdout.next_line())
            .await
            .expect("the bot stops in time")
            .unwrap()
        {
            rest.push(line);
        }
        let output = self.child.wait_with_output().await.unwrap();
        self.seen.extend(rest);
        let stdout = self.seen.join("\n");
        assert!(
            output.status.success(),
            "the bot failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }
}

/// A node of the test's own, talking to the bot through the server.
async fn tester(server: &DiscoveryProcess) -> ChatNode {
    ChatNode::builder()
        .username("tester")
        .listen("127.0.0.1:0".parse().unwrap())
        .discovery(DiscoveryClient::new(server.addr.to_string()))
        .spawn()
        .await
        .unwrap()
}

/// The texts of the next `n` messages `events` shows from `from`.
async fn replies(events: &mut Events, from: &str, n: usize) -> Vec<String> {
    let mut texts = Vec::new();
    while texts.len() < n {
        let event = tokio::time::timeout(WAIT, events.next())
            .await
            .unwrap_or_else(|_| panic!("no reply in time; so far {texts:?}"))
            .expect("the tester's events end only at shutdown");
        match event {
            Event::MessageReceived {
                from: who, text, ..
            } if who == from => texts.push(text),
            Event::SendFailed { reason, .. } => panic!("a message to the bot failed: {reason}"),
            _ => {}
        }
    }
    texts
}

#[tokio::test]
async fn echo_bot_answers_every_message_and_stops_after_max_messages() {
    let dir = tempfile::tempdir().unwrap();
    let server = discovery_server(&dir.path().join("server")).await;
    let addr = server.addr.to_string();
    let bot_dir = dir.path().join("bot");
    let bot = Bot::start(&[
        "--server",
        &addr,
        "--data-dir",
        bot_dir.to_str().unwrap(),
        "--max-messages",
        "3",
    ])
    .await;
    let tester = tester(&server).await;
    let mut events = tester.events();
    for text in ["one", "two", "three"] {
        tester.send("echo", text).await.unwrap();
    }
    assert_eq!(
        replies(&mut events, "echo", 3).await,
        ["echo: one", "echo: two", "echo: three"]
    );
    let out = bot.finish().await;
    in_order(
        &out,
        &[
            "[tester] one",
            "answered tester: reply ",
            "[tester] two",
            "answered tester: reply ",
            "[tester] three",
            "answered tester: reply ",
            "answered 3 messages (--max-messages): stopping",
            "stopped after answering 3 messages",
        ],
    );
    // Each reply's outcome is read, up to the end of the stream.
    assert_eq!(
        count(&out, "delivered to tester") + count(&out, "waits in their mailbox"),
        3,
        "{out}"
    );
    tester.shutdown().await.unwrap();
    server.kill().await;
}

#[cfg(unix)]
#[tokio::test]
async fn echo_bot_stops_gracefully_at_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let server = discovery_server(&dir.path().join("server")).await;
    let addr = server.addr.to_string();
    let bot_dir = dir.path().join("bot");
    let bot = Bot::start(&["--server", &addr, "--data-dir", bot_dir.to_str().unwrap()]).await;
    let tester = tester(&server).await;
    let mut events = tester.events();
    tester.send("echo", "are you there?").await.unwrap();
    assert_eq!(
        replies(&mut events, "echo", 1).await,
        ["echo: are you there?"]
    );

    let pid = bot.child.id().expect("the bot is running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill -INT {pid}");
    let out = bot.finish().await;
    in_order(
        &out,
        &[
            "[tester] are you there?",
            "answered tester: reply ",
            "Ctrl-C: stopping",
            "stopped after answering 1 messages",
        ],
    );
    tester.shutdown().await.unwrap();
    server.kill().await;
}
