//! Running the real `p2pchat-discovery` binary from tests and load programs (feature
//! `test-utils`): [`DiscoveryProcess`] starts it on 127.0.0.1, reads the address it prints,
//! and kills it when dropped.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// How long [`DiscoveryProcess::start`] waits for the server to say where it listens.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// What the binary prints first, before its address.
const LISTENING: &str = "p2pchat-discovery listening on ";

/// Why the server did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The program could not be run.
    #[error("cannot run {binary}")]
    Spawn {
        /// The program.
        binary: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It said nothing within [`START_TIMEOUT`].
    #[error("the server did not say where it listens within {} s", START_TIMEOUT.as_secs())]
    Timeout,
    /// It exited, or printed something else first.
    #[error("the server did not start: {0}")]
    Unexpected(String),
}

/// A running `p2pchat-discovery`; killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct DiscoveryProcess {
    /// The process.
    pub child: Child,
    /// Its process id.
    pub pid: u32,
    /// Where it says it listens.
    pub addr: SocketAddr,
    /// Kept open: the server may still write to its stdout.
    _stdout: Lines<BufReader<ChildStdout>>,
}

impl DiscoveryProcess {
    /// Starts `binary` with `args` and `--data-dir data_dir` (add `--listen 127.0.0.1:0` to
    /// `args` for a free port), logging warnings only, and waits until it listens.
    pub async fn start(binary: &Path, data_dir: &Path, args: &[&str]) -> Result<Self, StartError> {
        let mut child = Command::new(binary)
            .args(args)
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| StartError::Spawn {
                binary: binary.display().to_string(),
                source,
            })?;
        let pid = child
            .id()
            .ok_or_else(|| StartError::Unexpected("it exited at once".into()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| StartError::Unexpected("no standard output".into()))?;
        let mut stdout = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(START_TIMEOUT, stdout.next_line())
            .await
            .map_err(|_| StartError::Timeout)?
            .map_err(|e| StartError::Unexpected(e.to_string()))?
            .ok_or_else(|| StartError::Unexpected("it exited without a word".into()))?;
        let addr = line
            .strip_prefix(LISTENING)
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| StartError::Unexpected(format!("its first line was {line:?}")))?;
        Ok(Self {
            child,
            pid,
            addr,
            _stdout: stdout,
        })
    }

    /// Stops the server with SIGKILL and waits for it.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}
