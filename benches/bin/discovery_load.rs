//! Load on one `p2pchat-discovery`: registrations and keep-alives per second with 1, 10 and
//! 100 concurrent clients, then many idle sessions held at once and the server's memory per
//! session.
//!
//! ```text
//! cargo build --release -p p2pchat-discovery -p p2pchat-benches
//! cargo run --release -p p2pchat-benches --bin discovery-load -- --idle 10000
//! ```
//!
//! The server is the real binary (`target/release/p2pchat-discovery`, or `--server-bin`),
//! started on 127.0.0.1 with an embedded store in a temporary directory and the per-address
//! limits lifted (every client here comes from 127.0.0.1), so its memory can be read from
//! `/proc`. Each client re-registers the same user in a loop, doing `--keep-alives`
//! keep-alives per registration: a registration is a new connection, a challenge, a
//! signature check and a lease; a keep-alive is one request on an open session.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use p2pchat_core::discovery::Registration;
use p2pchat_core::{Discovery, DiscoveryClient, DiscoverySession, Identity};
use p2pchat_discovery::testing::DiscoveryProcess;
use tokio::sync::mpsc;

/// Measures one discovery server under load.
#[derive(Debug, Parser)]
struct Args {
    /// Seconds to run each concurrency level.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Concurrency levels (clients registering and keeping alive at once).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 10, 100])]
    clients: Vec<usize>,
    /// Keep-alives per registration.
    #[arg(long, default_value_t = 9)]
    keep_alives: u32,
    /// Idle sessions to open and hold at the end (0: skip).
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// The server binary [default: p2pchat-discovery beside this program].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Clients say they can be dialed, so the server probes each registration's address
    /// (port 7000 on 127.0.0.1, where nothing listens: refused at once). By default they say
    /// they cannot (no probe), as before the probe existed.
    #[arg(long)]
    probed: bool,
}

/// `--probed`, for [`registration`].
static PROBED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    PROBED.store(args.probed, std::sync::atomic::Ordering::Relaxed);
    let wanted = (args.idle as u64) * 2 + 4096;
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    if soft < wanted.min(hard) {
        let raised = wanted.min(hard);
        rlimit::setrlimit(rlimit::Resource::NOFILE, raised, hard)?;
        println!("descriptor limit raised from {soft} to {raised}");
    }
    let dir = tempfile::tempdir()?;
    let server = Spawned::start(&args, &dir).await?;
    println!(
        "server {} (pid {}), RSS at start {} KiB",
        server.addr,
        server.pid,
        server.rss_kib()?
    );

    for &clients in &args.clients {
        let (registrations, keep_alives, elapsed) =
            load(server.addr, clients, args.keep_alives, args.seconds).await?;
        let secs = elapsed.as_secs_f64();
        println!(
            "clients {clients:>3}: {:>8.0} registrations/s + {:>8.0} keep-alives/s = {:>8.0} ops/s",
            registrations as f64 / secs,
            keep_alives as f64 / secs,
            (registrations + keep_alives) as f64 / secs
        );
    }

    if args.idle > 0 {
        idle_sessions(&server, args.idle).await?;
    }
    Ok(())
}

/// The server process.
struct Spawned {
    addr: SocketAddr,
    pid: u32,
    _process: DiscoveryProcess,
}

impl Spawned {
    async fn start(args: &Args, dir: &tempfile::TempDir) -> anyhow::Result<Self> {
        let bin = match &args.server_bin {
            Some(bin) => bin.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("no directory beside this program")?
                .join("p2pchat-discovery"),
        };
        if !bin.exists() {
            bail!(
                "{} not found: build it first with `cargo build --release -p p2pchat-discovery`",
                bin.display()
            );
        }
        let args = [
            "--listen",
            "127.0.0.1:0",
            "--registrations-per-second",
            "0",
            "--new-claims-per-hour",
            "0",
            "--lookups-per-second",
            "0",
            "--max-connections",
            "1000000",
            "--max-connections-per-ip",
            "1000000",
        ];
        let process = DiscoveryProcess::start(&bin, dir.path(), &args).await?;
        Ok(Self {
            addr: process.addr,
            pid: process.pid,
            _process: process,
        })
    }

    /// Resident memory of the server process, in KiB (Linux).
    fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in /proc status")
    }
}

fn registration(name: &str) -> Registration {
    Registration {
        username: name.to_owned(),
        listen_port: 7000,
        announce: Vec::new(),
        dialable: PROBED.load(std::sync::atomic::Ordering::Relaxed),
    }
}

async fn register(
    client: &DiscoveryClient,
    identity: &Identity,
    name: &str,
) -> anyhow::Result<Box<dyn DiscoverySession>> {
    // Nobody reads the pushes; a full channel just drops them.
    let (tx, _rx) = mpsc::channel(1);
    client
        .register(identity, registration(name), tx)
        .await
        .with_context(|| format!("register {name}"))
}

/// `clients` tasks registering and keeping alive for `seconds`.
async fn load(
    addr: SocketAddr,
    clients: usize,
    keep_alives: u32,
    seconds: u64,
) -> anyhow::Result<(u64, u64, Duration)> {
    let registrations = Arc::new(AtomicU64::new(0));
    let kept = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for i in 0..clients {
        let (registrations, kept) = (registrations.clone(), kept.clone());
        tasks.push(tokio::spawn(async move {
            let client = DiscoveryClient::new(addr.to_string());
            let identity = Identity::generate();
            let name = format!("load{clients}-{i}");
            while Instant::now() < until {
                let session = register(&client, &identity, &name).await?;
                registrations.fetch_add(1, Ordering::Relaxed);
                for _ in 0..keep_alives {
                    session.keep_alive().await?;
                    kept.fetch_add(1, Ordering::Relaxed);
                }
                session.deregister().await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((
        registrations.load(Ordering::Relaxed),
        kept.load(Ordering::Relaxed),
        started.elapsed(),
    ))
}

/// Opens `n` sessions, holds them, and reads the server's memory.
async fn idle_sessions(server: &Spawned, n: usize) -> anyhow::Result<()> {
    const OPENING_AT_ONCE: usize = 64;
    let before = server.rss_kib()?;
    let started = Instant::now();
    let client = DiscoveryClient::new(server.addr.to_string());
    let mut sessions = Vec::with_capacity(n);
    let mut batch = tokio::task::JoinSet::new();
    for i in 0..n {
        let client = client.clone();
        batch.spawn(
            async move { register(&client, &Identity::generate(), &format!("idle{i}")).await },
        );
        if batch.len() >= OPENING_AT_ONCE || i + 1 == n {
            while let Some(done) = batch.join_next().await {
                sessions.push(done??);
            }
        }
    }
    let opened = started.elapsed();
    // Let the server settle (allocator caches, lazily grown buffers) before reading.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = server.rss_kib()?;
    let check = register(&client, &Identity::generate(), "idle-check").await?;
    let listed = check.list_online(None, 10).await?;
    anyhow::ensure!(!listed.users.is_empty(), "the loaded server still answers");
    let per_session = (after.saturating_sub(before)) as f64 / n as f64;
    println!(
        "idle sessions: {} held (opened in {:.1} s); server RSS {before} KiB -> {after} KiB = {per_session:.1} KiB per session",
        sessions.len(),
        opened.as_secs_f64()
    );
    Ok(())
}
