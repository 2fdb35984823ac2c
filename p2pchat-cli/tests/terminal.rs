//! The terminal mode, driven through a real pseudo-terminal and read back through a
//! terminal emulator (`vt100`), as a person would see the screen: the prompts for what the
//! flags left out, the line editor keeping a half-typed line while a message arrives, tab
//! completion, a huge paste, colours and `NO_COLOR`.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use common::{Client, Server, WAIT};
use portable_pty::{Child, CommandBuilder, MasterPty, PtySize, native_pty_system};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio::time::Instant;

const ROWS: u16 = 24;
const COLS: u16 = 100;

/// A `p2pchat` running in a pseudo-terminal, killed when dropped.
struct Terminal {
    child: Box<dyn Child + Send + Sync>,
    keyboard: Box<dyn Write + Send>,
    chunks: UnboundedReceiver<Vec<u8>>,
    /// Everything the program wrote, escape sequences included.
    raw: Vec<u8>,
    /// The screen, as a terminal would show it.
    screen: vt100::Parser,
    /// Kept open: closing the master hangs the terminal up.
    _master: Box<dyn MasterPty + Send>,
}

impl Terminal {
    fn spawn(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> Self {
        let pair = native_pty_system()
            .openpty(PtySize {
                rows: ROWS,
                cols: COLS,
                ..PtySize::default()
            })
            .expect("open a pseudo-terminal");
        let mut command = CommandBuilder::new(env!("CARGO_BIN_EXE_p2pchat"));
        command.args(args);
        command.cwd(cwd);
        command.env("TERM", "xterm");
        command.env("RUST_LOG", "error");
        command.env_remove("P2PCHAT_REDIS_URL");
        command.env_remove("NO_COLOR");
        for (key, value) in env {
            command.env(key, value);
        }
        let child = pair
            .slave
            .spawn_command(command)
            .expect("start p2pchat in the pseudo-terminal");
        // Only the child holds the terminal's other end now.
        drop(pair.slave);
        let mut reader = pair.master.try_clone_reader().unwrap();
        let keyboard = pair.master.take_writer().unwrap();
        let (tx, chunks) = unbounded_channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match reader.read(&mut buf) {
                    // EOF, or EIO once the child is gone.
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Self {
            child,
            keyboard,
            chunks,
            raw: Vec::new(),
            screen: vt100::Parser::new(
                std::num::NonZeroU16::new(ROWS).unwrap(),
                std::num::NonZeroU16::new(COLS).unwrap(),
                0,
            ),
            _master: pair.master,
        }
    }

    /// The screen's rows, as shown.
    fn rows(&self) -> Vec<String> {
        self.screen.screen().rows(0, COLS).collect()
    }

    /// Presses keys (`\r` is Enter).
    fn type_keys(&mut self, keys: &str) {
        self.keyboard.write_all(keys.as_bytes()).unwrap();
        self.keyboard.flush().unwrap();
    }

    fn take(&mut self, chunk: &[u8]) {
        self.raw.extend_from_slice(chunk);
        self.screen.process(chunk);
    }

    /// Waits until the screen's rows satisfy `pred`; returns them.
    async fn wait_until(&mut self, what: &str, pred: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let rows = self.rows();
            if pred(&rows) {
                return rows;
            }
            match tokio::time::timeout_at(deadline, self.chunks.recv()).await {
                Ok(Some(chunk)) => self.take(&chunk),
                Ok(None) => {
                    panic!("the terminal closed before showing {what}; it showed {rows:#?}")
                }
                Err(_) => {
                    panic!("the terminal did not show {what} within {WAIT:?}; it showed {rows:#?}")
                }
            }
        }
    }

    /// Waits until a row shows `needle`; returns the row's index.
    async fn wait_for(&mut self, needle: &str) -> usize {
        let rows = self
            .wait_until(&format!("{needle:?}"), |rows| {
                rows.iter().any(|r| r.contains(needle))
            })
            .await;
        rows.iter().rposition(|r| r.contains(needle)).unwrap()
    }

    /// Waits until `needle` was written at some point (it may have scrolled away since).
    async fn wait_written(&mut self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        let needle_bytes = needle.as_bytes();
        let mut from = 0;
        loop {
            if self.raw[from..]
                .windows(needle_bytes.len())
                .any(|w| w == needle_bytes)
            {
                return;
            }
            from = self.raw.len().saturating_sub(needle_bytes.len());
            match tokio::time::timeout_at(deadline, self.chunks.recv()).await {
                Ok(Some(chunk)) => self.take(&chunk),
                _ => panic!(
                    "the program never wrote {needle:?}; the screen is {:#?}",
                    self.rows()
                ),
            }
        }
    }

    /// Waits (bounded) for the program to exit; returns its exit status.
    async fn exit(&mut self) -> portable_pty::ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            // Keep draining the output so the child never blocks on a full terminal.
            while let Ok(chunk) = self.chunks.try_recv() {
                self.take(&chunk);
            }
            assert!(
                Instant::now() < deadline,
                "p2pchat did not exit within {WAIT:?}; the terminal showed {:#?}",
                self.rows()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn quit(&mut self) {
        self.type_keys("quit\r");
        let status = self.exit().await;
        assert!(
            status.success(),
            "p2pchat exited with {status}; the terminal showed {:#?}",
            self.rows()
        );
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `name` in a terminal with all flags given; waits for the greeting.
async fn started(root: &Path, name: &str, server: &Server, env: &[(&str, &str)]) -> Terminal {
    let dir = root.join(name);
    let mut term = Terminal::spawn(
        &[
            "--user",
            name,
            "--port",
            "0",
            "--discovery",
            &server.addr,
            "--data-dir",
            dir.to_str().unwrap(),
        ],
        root,
        env,
    );
    term.wait_for("Client started. Type 'help' for commands.")
        .await;
    // The editor's prompt: the terminal is in the editor's mode from now on (typed before,
    // keys would be cooked by the terminal, as they are for any program still starting).
    term.wait_for(&format!("{name}> ")).await;
    term
}

#[tokio::test]
async fn the_half_typed_line_survives_an_incoming_message() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server")).await;
    let alice_dir = root.path().join("alice");
    let mut alice = Terminal::spawn(
        &[
            "--discovery",
            &server.addr,
            "--data-dir",
            alice_dir.to_str().unwrap(),
        ],
        root.path(),
        &[],
    );

    // In a terminal, what the flags left out is asked for.
    alice.wait_for("Enter your username: ").await;
    alice.type_keys("alice\r");
    alice.wait_for("Enter port to listen on: ").await;
    alice.type_keys("0\r");
    alice
        .wait_for("Client started. Type 'help' for commands.")
        .await;

    let mut bob = Client::start(root.path(), "bob", &server).await;

    // A half-typed line, shown by the editor.
    alice.type_keys("send bob hel");
    alice.wait_for("alice> send bob hel").await;

    // A message arrives while alice is typing: printed above, the line drawn again below.
    bob.say("send alice are you there?").await;
    let rows = alice
        .wait_until("the message above the half-typed line", |rows| {
            let message = rows.iter().position(|r| r.contains("[bob] are you there?"));
            let prompt = rows.iter().rposition(|r| r.contains("alice> send bob hel"));
            matches!((message, prompt), (Some(m), Some(p)) if m < p)
        })
        .await;
    let message = rows
        .iter()
        .find(|r| r.contains("[bob] are you there?"))
        .unwrap();
    assert!(
        message.trim_start().as_bytes()[..5]
            .iter()
            .filter(|b| b.is_ascii_digit())
            .count()
            == 4,
        "the line starts with the time: {message:?}"
    );

    // The line is still whole in the editor, not only on the screen.
    alice.type_keys("lo bob\r");
    bob.expect("[alice] hello bob").await;

    alice.quit().await;
    bob.quit().await;
    server.kill().await;
}

/// Tab completes commands (with or without '/') and the names the client knows; a
/// conversation (`/query`) changes the prompt.
#[tokio::test]
async fn tab_completes_commands_and_names() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server")).await;
    let mut bob = Client::start(root.path(), "bob", &server).await;
    let mut alice = started(root.path(), "alice", &server, &[]).await;
    // Alice learns bob's name from the list of who is online.
    alice.type_keys("list\r");
    alice.wait_for("Online users: bob").await;

    alice.type_keys("sen\t");
    alice.wait_for("alice> send ").await;
    alice.type_keys("b\t");
    alice.wait_for("alice> send bob ").await;
    alice.type_keys("completed\r");
    bob.expect("[alice] completed").await;

    alice.type_keys("/que\tb\t\r");
    alice.wait_for("Talking to bob").await;
    alice.wait_for("alice -> bob> ").await;
    alice.type_keys("in a conversation\r");
    bob.expect("[alice] in a conversation").await;
    alice.type_keys("/query\r");
    alice.wait_for("No longer talking to bob.").await;
    alice.quit().await;

    // The input history survives a restart: Up brings back what was typed last time.
    let mut alice = started(root.path(), "alice", &server, &[]).await;
    alice.type_keys("\x1b[A\x1b[A");
    alice.wait_for("alice> /query").await;
    alice.type_keys("\x15");
    alice.quit().await;
    bob.quit().await;
}

/// A 70 KB paste (bracketed, as terminals send a paste) is one insertion, not 70,000
/// redraws: Enter is answered with the too-long sentence at once, and the client still
/// works.
#[tokio::test]
async fn a_huge_paste_is_answered_at_once() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server")).await;
    let mut bob = Client::start(root.path(), "bob", &server).await;
    let mut alice = started(root.path(), "alice", &server, &[]).await;
    let paste = format!("\x1b[200~send bob {}\x1b[201~\r", "x".repeat(70_000));
    let sent = Instant::now();
    alice.type_keys(&paste);
    alice
        .wait_for("That message is too long: 70000 bytes")
        .await;
    let took = sent.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the sentence came {took:?} after the paste"
    );
    alice.type_keys("send bob still here\r");
    bob.expect("[alice] still here").await;
    alice.quit().await;
    bob.quit().await;
}

/// Colours in a terminal: our own name highlighted (in our lines and where a peer mentions
/// it); none with `NO_COLOR`.
#[tokio::test]
async fn own_name_is_highlighted_unless_no_color() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server")).await;
    let mut bob = Client::start(root.path(), "bob", &server).await;
    let highlighted = format!(
        "{}alice",
        anstyle::Style::new()
            .bold()
            .fg_color(Some(anstyle::AnsiColor::Yellow.into()))
            .render()
    );
    for (env, colored) in [(vec![], true), (vec![("NO_COLOR", "1")], false)] {
        let mut alice = started(root.path(), "alice", &server, &env).await;
        bob.say("send alice hello alice").await;
        alice.wait_for("[bob] hello alice").await;
        let raw = String::from_utf8_lossy(&alice.raw).into_owned();
        assert_eq!(
            raw.contains(&highlighted),
            colored,
            "NO_COLOR={:?}: {raw:?}",
            env.first()
        );
        alice.quit().await;
    }
    bob.quit().await;
}

/// Commands typed while a peer floods the screen are all answered: printing above the
/// prompt never holds up the command loop (it once could, for good).
#[tokio::test]
async fn commands_are_answered_while_messages_pour_in() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&root.path().join("server")).await;
    let mut bob = Client::start(root.path(), "bob", &server).await;
    let mut alice = started(root.path(), "alice", &server, &[]).await;
    const FLOOD: usize = 500;
    let flood: String = (0..FLOOD)
        .map(|i| format!("send alice flood {i}\n"))
        .collect();
    bob.say(flood.trim_end()).await;
    for i in 0..30 {
        alice.type_keys(&format!("history nobody{i}\r"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    alice.type_keys("status\r");
    alice.wait_written("alice — connected to").await;
    alice.wait_written("No history with nobody29.").await;
    alice.wait_written(&format!("flood {}", FLOOD - 1)).await;
    alice.quit().await;
    bob.quit().await;
}
