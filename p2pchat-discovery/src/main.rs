//! `p2pchat-discovery`: the p2pchat discovery server. A thin `main` over
//! [`p2pchat_discovery::serve`]; see that crate's documentation.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use p2pchat_discovery::server::{
    DEFAULT_LISTEN_ADDR, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_IP, REGISTRATIONS_PER_SECOND_PER_IP,
};
use p2pchat_discovery::{Config, RedbStorage, RedisStorage, Server, Storage, serve};
use tracing_subscriber::EnvFilter;

/// The p2pchat discovery server: binds usernames to keys and tracks who is online.
#[derive(Debug, Parser)]
#[command(name = "p2pchat-discovery", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = DEFAULT_LISTEN_ADDR)]
    listen: SocketAddr,
    /// Directory of the embedded store (used when no Redis is given)
    /// [default: the platform's data directory, e.g. ~/.local/share/p2pchat-discovery].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Keep the directory in Redis instead, shared by every instance given the same URL.
    #[arg(long, env = "P2PCHAT_REDIS_URL")]
    redis_url: Option<String>,
    /// Seconds without a keep-alive before a user is offline.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    presence_ttl: u64,
    /// Days without its owner before a name may be claimed by another key.
    #[arg(long, default_value_t = 180)]
    claim_lapse_days: u64,
    /// Most connections held at once.
    #[arg(long, default_value_t = MAX_CONNECTIONS)]
    max_connections: usize,
    /// Most connections from one IP address.
    #[arg(long, default_value_t = MAX_CONNECTIONS_PER_IP)]
    max_connections_per_ip: usize,
    /// Registrations per second from one IP address (0: unlimited).
    #[arg(long, default_value_t = REGISTRATIONS_PER_SECOND_PER_IP)]
    registrations_per_second: u32,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("p2pchat-discovery: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let presence_ttl = Duration::from_secs(args.presence_ttl);
    let config = Config {
        presence_ttl,
        idle_timeout: presence_ttl * 3,
        claim_lapse: Duration::from_secs(args.claim_lapse_days.saturating_mul(24 * 3600)),
        max_connections: args.max_connections,
        max_connections_per_ip: args.max_connections_per_ip,
        registrations_per_second_per_ip: args.registrations_per_second,
        ..Config::default()
    };
    let storage: Arc<dyn Storage> = match &args.redis_url {
        Some(url) => Arc::new(
            RedisStorage::connect(url)
                .await
                .with_context(|| format!("cannot use Redis at {url}"))?,
        ),
        None => {
            let dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
            let storage = RedbStorage::open(&dir)
                .with_context(|| format!("cannot use the data directory {}", dir.display()))?;
            tracing::info!(dir = %dir.display(), "embedded store");
            Arc::new(storage)
        }
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    // On stdout, for whoever started us with port 0.
    println!("p2pchat-discovery listening on {}", listener.local_addr()?);
    serve(
        listener,
        Server::with_storage(config, storage),
        shutdown_signal(),
    )
    .await;
    Ok(())
}

fn default_data_dir() -> PathBuf {
    dirs::data_dir()
        .map(|d| d.join("p2pchat-discovery"))
        .unwrap_or_else(|| PathBuf::from("p2pchat-discovery-data"))
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
