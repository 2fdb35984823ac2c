//! The terminal mode, driven through a real pseudo-terminal: the prompts for what the flags
//! left out, and the line editor keeping a half-typed line while a message arrives.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use common::{Client, Server, WAIT};
use portable_pty::{Child, CommandBuilder, MasterPty, PtySize, native_pty_system};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio::time::Instant;

/// Removes terminal escape sequences: CSI (`ESC [` parameters, intermediates, final byte),
/// OSC (`ESC ]` up to BEL or `ESC \`) and the other `ESC` sequences (intermediates, then
/// one final byte). A sequence cut off at the end is dropped.
fn strip_ansi(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] != 0x1b {
            out.push(raw[i]);
            i += 1;
            continue;
        }
        i += 1;
        match raw.get(i) {
            Some(b'[') => {
                i += 1;
                // Parameters and intermediates, then the final byte (0x40..=0x7e).
                while i < raw.len() && (0x20..=0x3f).contains(&raw[i]) {
                    i += 1;
                }
                i += 1;
            }
            Some(b']') => {
                i += 1;
                while i < raw.len() {
                    if raw[i] == 0x07 {
                        i += 1;
                        break;
                    }
                    if raw[i] == 0x1b && raw.get(i + 1) == Some(&b'\\') {
                        i += 2;
                        break;
                    }
                    i += 1;
                }
            }
            Some(_) => {
                while i < raw.len() && (0x20..=0x2f).contains(&raw[i]) {
                    i += 1;
                }
                i += 1;
            }
            None => {}
        }
    }
    out
}

/// Where `needle` first occurs in `haystack` at or after `from`.
fn find(haystack: &[u8], needle: &str, from: usize) -> Option<usize> {
    let needle = needle.as_bytes();
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| from + i)
}

/// A `p2pchat` running in a pseudo-terminal, killed when dropped.
struct Terminal {
    child: Box<dyn Child + Send + Sync>,
    keyboard: Box<dyn Write + Send>,
    chunks: UnboundedReceiver<Vec<u8>>,
    /// Everything the terminal showed so far, escape sequences included.
    raw: Vec<u8>,
    /// Kept open: closing the master hangs the terminal up.
    _master: Box<dyn MasterPty + Send>,
}

impl Terminal {
    fn spawn(args: &[&str], cwd: &Path) -> Self {
        let pair = native_pty_system()
            .openpty(PtySize {
                rows: 24,
                cols: 100,
                ..PtySize::default()
            })
            .expect("open a pseudo-terminal");
        let mut command = CommandBuilder::new(env!("CARGO_BIN_EXE_p2pchat"));
        command.args(args);
        command.cwd(cwd);
        command.env("TERM", "xterm");
        command.env("RUST_LOG", "error");
        command.env_remove("P2PCHAT_REDIS_URL");
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
            _master: pair.master,
        }
    }

    /// What the terminal showed so far, without escape sequences.
    fn text(&self) -> Vec<u8> {
        strip_ansi(&self.raw)
    }

    fn shown(&self) -> String {
        String::from_utf8_lossy(&self.text()).into_owned()
    }

    /// Presses keys (`\r` is Enter).
    fn type_keys(&mut self, keys: &str) {
        self.keyboard.write_all(keys.as_bytes()).unwrap();
        self.keyboard.flush().unwrap();
    }

    /// Waits until `needle` shows at or after `from` (in the stripped text); returns where.
    async fn wait_for(&mut self, needle: &str, from: usize) -> usize {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(at) = find(&self.text(), needle, from) {
                return at;
            }
            match tokio::time::timeout_at(deadline, self.chunks.recv()).await {
                Ok(Some(chunk)) => self.raw.extend_from_slice(&chunk),
                Ok(None) => panic!(
                    "the terminal closed before showing {needle:?} (after byte {from}); it showed {:?}",
                    self.shown()
                ),
                Err(_) => panic!(
                    "the terminal did not show {needle:?} (after byte {from}) within {WAIT:?}; \
                     it showed {:?}",
                    self.shown()
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
                self.raw.extend_from_slice(&chunk);
            }
            assert!(
                Instant::now() < deadline,
                "p2pchat did not exit within {WAIT:?}; the terminal showed {:?}",
                self.shown()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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
    );

    // In a terminal, what the flags left out is asked for.
    let at = alice.wait_for("Enter your username: ", 0).await;
    alice.type_keys("alice\r");
    let at = alice.wait_for("Enter port to listen on: ", at).await;
    alice.type_keys("0\r");
    let started = alice
        .wait_for("Client started. Type 'help' for commands.", at)
        .await;

    let mut bob = Client::start(root.path(), "bob", &server).await;

    // A half-typed line, shown by the editor.
    alice.type_keys("send bob hel");
    let typed = alice.wait_for("> send bob hel", started).await;

    // A message arrives while alice is typing: printed above, the line redrawn below it.
    bob.say("send alice are you there?").await;
    let message = alice.wait_for("[bob] are you there?", typed).await;
    let after = message + "[bob] are you there?".len();
    // Below the message: the prompt and the half-typed line, drawn again.
    alice.wait_for("> send bob hel", after).await;

    // The line is still whole in the editor, not only on the screen.
    alice.type_keys("lo bob\r");
    bob.expect("[alice] hello bob").await;

    alice.type_keys("quit\r");
    let status = alice.exit().await;
    assert!(
        status.success(),
        "p2pchat exited with {status}; the terminal showed {:?}",
        alice.shown()
    );
    bob.quit().await;
    server.kill().await;
}
