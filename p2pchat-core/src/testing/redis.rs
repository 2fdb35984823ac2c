//! A real `redis-server` for tests: [`RedisServer`] runs one on a free local port in a
//! temporary directory; [`TestRedis`] uses the server named by `REDIS_URL` instead, when set.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

/// How long `redis-server` may take to report that it accepts connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The log line `redis-server` prints once it accepts connections.
const READY_LINE: &str = "Ready to accept connections";

/// How many fresh ports [`RedisServer::start`] tries when the server exits before it is ready
/// (another process may take the free port between probing and binding it).
const START_ATTEMPTS: usize = 3;

/// A `redis-server` process of its own, on `127.0.0.1` and a free port, keeping its data in
/// a temporary directory. Killed when dropped.
///
/// Fault tests use it directly: [`kill`](Self::kill) stops the server abruptly (SIGKILL) and
/// [`restart`](Self::restart) starts it again on the same port and directory, so with
/// [`start_with_appendonly`](Self::start_with_appendonly) the data comes back.
///
/// Panics when `redis-server` is not installed or does not become ready within 10 s.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    appendonly: bool,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a server without persistence.
    pub fn start() -> Self {
        Self::start_configured(false)
    }

    /// Starts a server that logs every write to an append-only file, so its data survives
    /// [`kill`](Self::kill) and [`restart`](Self::restart).
    pub fn start_with_appendonly() -> Self {
        Self::start_configured(true)
    }

    fn start_configured(appendonly: bool) -> Self {
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("p2pchat-redis-")
                .tempdir()
                .unwrap_or_else(|e| panic!("cannot create a directory for redis-server: {e}"));
            let port = free_port();
            match spawn_ready(port, dir.path(), appendonly) {
                Ok(child) => {
                    return Self {
                        child: Some(child),
                        port,
                        appendonly,
                        dir,
                    };
                }
                Err(output) => failures.push(format!("on port {port}:\n{output}")),
            }
        }
        panic!(
            "redis-server did not start ({START_ATTEMPTS} attempts):\n{}",
            failures.join("\n")
        );
    }

    /// The URL to connect to: `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port the server listens on (the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the server's data.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server abruptly (SIGKILL) and waits for it to exit. Nothing is flushed
    /// beyond what the append-only file already holds. Does nothing if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // An error means it already exited; reap it either way.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and directory (killing it first if it is
    /// still running) and waits until it accepts connections.
    pub fn restart(&mut self) {
        self.kill();
        match spawn_ready(self.port, self.dir.path(), self.appendonly) {
            Ok(child) => self.child = Some(child),
            Err(output) => panic!(
                "redis-server did not restart on port {}:\n{output}",
                self.port
            ),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis for a test: the external server named by the `REDIS_URL` environment variable
/// when it is set, or else a [`RedisServer`] of the test's own.
///
/// An external server is shared with other tests (and other runs), so tests using
/// [`TestRedis`] must keep to keys under a prefix of their own (see
/// [`unique_prefix`](Self::unique_prefix)) and must not flush the database. Fault tests
/// (killing and restarting the server) need a server of their own: they use
/// [`RedisServer`] directly.
#[derive(Debug)]
pub enum TestRedis {
    /// The server at `REDIS_URL`.
    External(String),
    /// A server started for this test.
    Own(RedisServer),
}

impl TestRedis {
    /// Uses `REDIS_URL` when it is set and not empty, or else starts a [`RedisServer`].
    pub fn from_env_or_start() -> Self {
        match std::env::var("REDIS_URL") {
            Ok(url) if !url.trim().is_empty() => Self::External(url),
            _ => Self::Own(RedisServer::start()),
        }
    }

    /// The URL to connect to.
    pub fn url(&self) -> String {
        match self {
            Self::External(url) => url.clone(),
            Self::Own(server) => server.url(),
        }
    }

    /// A key prefix no other test or run uses: `test-{name}-{pid}-{nanos}`.
    pub fn unique_prefix(&self, name: &str) -> String {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("test-{name}-{}-{nanos}", std::process::id())
    }
}

/// A port nothing listens on right now (the OS picks it; the probe is closed again).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|e| panic!("cannot bind a probe socket on 127.0.0.1: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("cannot read the probe socket's port: {e}"))
        .port()
}

/// Spawns `redis-server` and waits for its "ready" log line. On failure returns the output
/// seen so far (the child is killed).
fn spawn_ready(port: u16, dir: &Path, appendonly: bool) -> Result<Child, String> {
    let mut child = match Command::new("redis-server")
        .arg("--port")
        .arg(port.to_string())
        .args(["--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(dir)
        .args(["--save", ""])
        .args(["--appendonly", if appendonly { "yes" } else { "no" }])
        .args(["--daemonize", "no"])
        .args(["--logfile", ""])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("redis-server not found; install it (apt-get install redis-server)")
        }
        Err(e) => panic!("cannot run redis-server: {e}"),
    };

    // Both streams are drained for the life of the process (a full pipe would block the
    // server's logging); the lines go to a channel that readiness is awaited on.
    let (lines, seen) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        forward_lines(stdout, lines.clone());
    }
    if let Some(stderr) = child.stderr.take() {
        forward_lines(stderr, lines);
    }

    let deadline = Instant::now() + READY_TIMEOUT;
    let mut output = String::new();
    let failure = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match seen.recv_timeout(left) {
            Ok(line) => {
                let ready = line.contains(READY_LINE);
                output.push_str(&line);
                output.push('\n');
                if ready {
                    return Ok(child);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                break format!("not ready after {READY_TIMEOUT:?} (no \"{READY_LINE}\" line)");
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break "exited before it was ready".to_owned();
            }
        }
    };
    let _ = child.kill();
    let status = child
        .wait()
        .map(|s| s.to_string())
        .unwrap_or_else(|e| e.to_string());
    Err(format!("{failure} ({status}); its output:\n{output}"))
}

/// Reads `stream` line by line on a thread of its own, sending each line on `lines` (and
/// dropping them once nobody listens) until the stream ends.
fn forward_lines(stream: impl Read + Send + 'static, lines: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let _ = lines.send(line);
        }
    });
}
