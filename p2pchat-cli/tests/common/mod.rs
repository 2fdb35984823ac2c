//! Shared by the end-to-end tests: the real binaries, a discovery server process, and
//! clients driven through pipes.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use p2pchat_discovery::testing::DiscoveryProcess;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// The longest a test waits for one line.
pub const WAIT: Duration = Duration::from_secs(20);

/// The `p2pchat` binary under test.
pub fn p2pchat() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_p2pchat"))
}

/// The `p2pchat-discovery` binary of this workspace, built beside this test if it is not
/// there yet (`cargo test --workspace` builds it; `cargo test -p p2pchat-cli` may not).
pub fn discovery_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            // target/<profile>/deps/<test> → target/<profile>/p2pchat-discovery
            let exe = std::env::current_exe().unwrap();
            let dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
            let binary = dir.join("p2pchat-discovery");
            if !binary.exists() {
                let mut build = std::process::Command::new(env!("CARGO"));
                build.args([
                    "build",
                    "-p",
                    "p2pchat-discovery",
                    "--bin",
                    "p2pchat-discovery",
                ]);
                if dir.file_name().is_some_and(|n| n == "release") {
                    build.arg("--release");
                }
                let status = build.status().expect("run cargo build");
                assert!(status.success(), "cannot build p2pchat-discovery");
            }
            binary
        })
        .clone()
}

/// A `p2pchat-discovery` process on 127.0.0.1, killed when dropped.
pub struct Server {
    pub addr: String,
    process: DiscoveryProcess,
}

impl Server {
    pub async fn start(data_dir: &Path) -> Self {
        let process =
            DiscoveryProcess::start(&discovery_binary(), data_dir, &["--listen", "127.0.0.1:0"])
                .await
                .expect("p2pchat-discovery starts");
        Self {
            addr: process.addr.to_string(),
            process,
        }
    }

    /// Starts one with more flags (`--listen` given here picks the address).
    pub async fn start_with(data_dir: &Path, extra: &[&str]) -> Self {
        let mut args = vec!["--listen", "127.0.0.1:0"];
        if let Some(at) = extra.iter().position(|a| *a == "--listen") {
            args.clear();
            args.extend_from_slice(&extra[at..at + 2]);
        }
        args.extend(
            extra
                .iter()
                .enumerate()
                .filter(|(i, a)| **a != "--listen" && (*i == 0 || extra[i - 1] != "--listen"))
                .map(|(_, a)| *a),
        );
        let process = DiscoveryProcess::start(&discovery_binary(), data_dir, &args)
            .await
            .expect("p2pchat-discovery starts");
        Self {
            addr: process.addr.to_string(),
            process,
        }
    }

    /// Stops the server (SIGKILL).
    pub async fn kill(self) {
        self.process.kill().await;
    }
}

/// A `p2pchat` process driven through pipes (stdin is not a terminal: plain line mode).
pub struct Client {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    /// Every line read so far.
    pub seen: Vec<String>,
}

impl Client {
    /// Starts `name` with its own data directory under `root`, and waits for the greeting.
    pub async fn start(root: &Path, name: &str, server: &Server) -> Self {
        Self::start_with(root, name, &server.addr, &[]).await
    }

    pub async fn start_with(root: &Path, name: &str, discovery: &str, extra: &[&str]) -> Self {
        let mut client = Self::spawn(root, name, discovery, extra);
        client
            .expect_line(|l| l == "Client started. Type 'help' for commands.")
            .await;
        client
    }

    /// Starts the process without waiting for anything.
    pub fn spawn(root: &Path, name: &str, discovery: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(p2pchat())
            .args([
                "--user",
                name,
                "--port",
                "0",
                "--discovery",
                discovery,
                "--data-dir",
            ])
            .arg(root.join(name))
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start p2pchat");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        Self {
            name: name.to_owned(),
            child,
            stdin,
            stdout,
            seen: Vec::new(),
        }
    }

    /// Types a line.
    pub async fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
    }

    /// Reads lines until one matches; fails the test after [`WAIT`].
    pub async fn expect_line(&mut self, pred: impl Fn(&str) -> bool) -> String {
        let name = self.name.clone();
        let seen = &mut self.seen;
        let stdout = &mut self.stdout;
        tokio::time::timeout(WAIT, async {
            loop {
                let line = stdout
                    .next_line()
                    .await
                    .unwrap()
                    .unwrap_or_else(|| panic!("{name}'s output ended; it said {seen:?}"));
                seen.push(line.clone());
                if pred(&line) {
                    return line;
                }
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{name} did not print the expected line; it said {:?}",
                self.seen
            )
        })
    }

    /// Waits for exactly `line`, after the time a message line starts with.
    pub async fn expect(&mut self, line: &str) {
        self.expect_line(|l| untimed(l) == line).await;
    }

    /// Waits for the notice that a message to `to` is stored for later.
    pub async fn expect_stored(&mut self, to: &str) {
        let start = format!("({to} cannot be reached now: ");
        self.expect_line(|l| l.starts_with(&start) && l.ends_with(" can receive it)"))
            .await;
    }

    /// Waits until every one of `lines` has been printed, in any order (for lines that come
    /// from independent sources, such as a mailbox drain and a request notice).
    pub async fn expect_all(&mut self, lines: &[&str]) {
        let mut missing: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
        while !missing.is_empty() {
            let got = self
                .expect_line(|l| missing.iter().any(|m| m == untimed(l)))
                .await;
            missing.retain(|m| m != untimed(&got));
        }
    }

    /// Closes stdin (end of input) and waits for a clean exit; returns everything printed.
    pub async fn quit_by_eof(mut self) -> Vec<String> {
        drop(self.stdin.take());
        self.finish().await
    }

    /// Types `quit` and waits for a clean exit; returns everything printed.
    pub async fn quit(mut self) -> Vec<String> {
        self.say("quit").await;
        self.finish().await
    }

    async fn finish(mut self) -> Vec<String> {
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("the client exits")
            .unwrap();
        while let Ok(Some(line)) = self.stdout.next_line().await {
            self.seen.push(line);
        }
        assert!(status.success(), "{} exited with {status}", self.name);
        self.seen
    }

    /// Everything the client wrote to stderr, after it exited.
    /// Waits for the client to exit by itself with its stdin still open (nothing closes
    /// it for it); returns the exit status and stderr.
    pub async fn exit_by_itself(mut self) -> (std::process::ExitStatus, String) {
        let _open = self.stdin.take();
        let out = tokio::time::timeout(WAIT, self.child.wait_with_output())
            .await
            .expect("the client exits by itself, its stdin still open")
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub async fn exit_with_stderr(mut self) -> (std::process::ExitStatus, String) {
        drop(self.stdin.take());
        let out = tokio::time::timeout(WAIT, self.child.wait_with_output())
            .await
            .expect("the client exits")
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// `line` without the time a message line starts with (`14:05 ` today, `2026-12-01 14:05 `
/// on another day).
pub fn untimed(line: &str) -> &str {
    let b = line.as_bytes();
    let time_at = |at: usize| {
        b.len() > at + 5
            && b[at..at + 2].iter().all(u8::is_ascii_digit)
            && b[at + 2] == b':'
            && b[at + 3..at + 5].iter().all(u8::is_ascii_digit)
            && b[at + 5] == b' '
    };
    if time_at(0) {
        return &line[6..];
    }
    let dated = b.len() > 11
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b' ';
    if dated && time_at(11) {
        return &line[17..];
    }
    line
}
