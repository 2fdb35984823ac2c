//! `p2pchat-discovery`: the p2pchat discovery server. A thin `main` over
//! [`p2pchat_discovery::serve`]; see that crate's documentation.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use p2pchat_core::protocol::discovery::DEFAULT_DISCOVERY_ADDR;
use p2pchat_core::store::{
    DEFAULT_ANNOUNCEMENT_CHANNEL, DEFAULT_MAILBOX_BYTES, DEFAULT_MAILBOX_QUOTA,
    DEFAULT_MESSAGE_TTL, DEFAULT_PAIR_BYTES, DEFAULT_PAIR_QUOTA, DEFAULT_SENDER_BYTES,
    DEFAULT_SENDER_QUOTA, DEFAULT_TOTAL_BYTES, MAX_MESSAGE_TTL, Quotas,
};
use p2pchat_core::{Announcement, Identity};
use p2pchat_discovery::config::{
    DEFAULT_LISTEN_ADDR, LOOKUPS_PER_SECOND_PER_IP, LOOKUPS_PER_SECOND_PER_SESSION,
    MAX_CONNECTIONS, MAX_CONNECTIONS_PER_IP, MAX_RELAYS, MAX_RELAYS_PER_USER, MAX_TOTAL_WATCHES,
    NEW_CLAIMS_PER_HOUR_PER_IP, PROBE_TIMEOUT, REGISTRATIONS_PER_SECOND_PER_IP,
    RELAY_BYTES_PER_SECOND, RELAY_IDLE_TIMEOUT,
};
use p2pchat_discovery::storage::RedisStorageConfig;
use p2pchat_discovery::{
    Config, Directory, RedbStorage, RedisStorage, Storage, relay_announcement, serve,
};

/// The operator key's file name in the data directory.
const OPERATOR_KEY_FILE: &str = "operator.key";
use tracing_subscriber::EnvFilter;

/// The p2pchat discovery server: binds usernames to keys, tracks who is online, keeps
/// offline mail, and relays operator announcements.
#[derive(Debug, Parser)]
#[command(name = "p2pchat-discovery", version)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Sign an announcement with the operator key and send it to every online node:
    /// relayed by the running server, and published on a Redis channel when given one.
    Announce(AnnounceArgs),
}

#[derive(Debug, clap::Args)]
struct AnnounceArgs {
    /// The text to announce.
    text: String,
    /// The running server to relay it.
    #[arg(long, default_value = DEFAULT_DISCOVERY_ADDR)]
    server: String,
    /// The data directory the server was started with (`--data-dir`): its operator key is
    /// DATA_DIR/operator.key [default: the platform's data directory, as for the server].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The operator key file the server was started with (`--operator-key`)
    /// [default: DATA_DIR/operator.key].
    #[arg(long)]
    operator_key: Option<PathBuf>,
    /// Also publish on this Redis, for nodes that listen to Redis directly.
    #[arg(long, env = "P2PCHAT_REDIS_URL")]
    redis_url: Option<String>,
    /// The Redis channel to publish on.
    #[arg(long, default_value = DEFAULT_ANNOUNCEMENT_CHANNEL)]
    channel: String,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = DEFAULT_LISTEN_ADDR)]
    listen: SocketAddr,
    /// Directory of the embedded store (used when no Redis is given)
    /// [default: the platform's data directory, e.g. ~/.local/share/p2pchat-discovery].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Keep the directory and the mailboxes in Redis instead, shared by every instance given
    /// the same URL.
    #[arg(long, env = "P2PCHAT_REDIS_URL")]
    redis_url: Option<String>,
    /// The operator key file, created if missing (instances sharing Redis should share it)
    /// [default: DATA_DIR/operator.key].
    #[arg(long)]
    operator_key: Option<PathBuf>,
    /// The Redis channel announcements are published on.
    #[arg(long, default_value = DEFAULT_ANNOUNCEMENT_CHANNEL)]
    announcement_channel: String,
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
    /// New names one IP address may claim per hour; renewals do not count (0: unlimited).
    #[arg(long, default_value_t = NEW_CLAIMS_PER_HOUR_PER_IP)]
    new_claims_per_hour: u32,
    /// Lookups and listing pages per second from one IP address, bursts of twice that (0:
    /// unlimited).
    #[arg(long, default_value_t = LOOKUPS_PER_SECOND_PER_IP)]
    lookups_per_second: u32,
    /// Lookups and listing pages per second one session may ask for, bursts of twice that
    /// (0: unlimited).
    #[arg(long, default_value_t = LOOKUPS_PER_SECOND_PER_SESSION)]
    lookups_per_second_per_session: u32,
    /// Watches held at once, all sessions together.
    #[arg(long, default_value_t = MAX_TOTAL_WATCHES)]
    max_watches: usize,
    /// Milliseconds the reachability probe of a registering node may take (0: no probe;
    /// nodes are published as they say).
    #[arg(long, default_value_t = PROBE_TIMEOUT.as_millis() as u64)]
    probe_timeout_ms: u64,
    /// Most relays open at once (0: relay nothing; peers that cannot dial each other use
    /// the mailbox).
    #[arg(long, default_value_t = MAX_RELAYS)]
    max_relays: usize,
    /// Most relays one user takes part in at once.
    #[arg(long, default_value_t = MAX_RELAYS_PER_USER)]
    max_relays_per_user: usize,
    /// Bytes per second one relay carries, both directions together (0: unlimited).
    #[arg(long, default_value_t = RELAY_BYTES_PER_SECOND)]
    relay_bytes_per_second: u32,
    /// Seconds a relay may carry nothing before it is closed.
    #[arg(long, default_value_t = RELAY_IDLE_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    relay_idle_timeout: u64,
    /// Where nodes registered with other instances (sharing Redis) join the relays this
    /// instance holds [default: --listen, unless it is 0.0.0.0 or [::]].
    #[arg(long, value_name = "IP:PORT")]
    relay_addr: Option<SocketAddr>,
    /// Days an offline message may wait, counted from when it was sealed: older deposits
    /// are refused, later expiries cut to this.
    #[arg(long, default_value_t = DEFAULT_MESSAGE_TTL.as_secs() / 86_400,
          value_parser = clap::value_parser!(u64).range(1..=MAX_MESSAGE_TTL.as_secs() / 86_400))]
    message_ttl_days: u64,
    /// Most messages waiting for one recipient.
    #[arg(long, default_value_t = DEFAULT_MAILBOX_QUOTA as u64)]
    mailbox_messages: u64,
    /// Most bytes waiting for one recipient.
    #[arg(long, default_value_t = DEFAULT_MAILBOX_BYTES)]
    mailbox_bytes: u64,
    /// Most messages one sender may have waiting, in all mailboxes together.
    #[arg(long, default_value_t = DEFAULT_SENDER_QUOTA)]
    sender_messages: u64,
    /// Most bytes one sender may have waiting, in all mailboxes together.
    #[arg(long, default_value_t = DEFAULT_SENDER_BYTES)]
    sender_bytes: u64,
    /// Most messages one sender may have waiting for one recipient.
    #[arg(long, default_value_t = DEFAULT_PAIR_QUOTA)]
    pair_messages: u64,
    /// Most bytes one sender may have waiting for one recipient.
    #[arg(long, default_value_t = DEFAULT_PAIR_BYTES)]
    pair_bytes: u64,
    /// Most bytes of mail waiting on the server, all mailboxes together.
    #[arg(long, default_value_t = DEFAULT_TOTAL_BYTES)]
    mail_bytes: u64,
}

impl ServeArgs {
    /// The mail quotas the flags set.
    fn quotas(&self) -> Quotas {
        let mut quotas = Quotas::default();
        quotas.mailbox_messages = self.mailbox_messages;
        quotas.mailbox_bytes = self.mailbox_bytes;
        quotas.sender_messages = self.sender_messages;
        quotas.sender_bytes = self.sender_bytes;
        quotas.pair_messages = self.pair_messages;
        quotas.pair_bytes = self.pair_bytes;
        quotas.total_bytes = self.mail_bytes;
        quotas
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let outcome = match args.command {
        Some(Command::Announce(mut announce)) => {
            // `p2pchat-discovery --data-dir DIR announce …` means the same as `announce
            // --data-dir DIR`: the server's flags, written before the subcommand.
            announce.data_dir = announce.data_dir.or(args.serve.data_dir);
            announce.operator_key = announce.operator_key.or(args.serve.operator_key);
            send_announcement(announce).await
        }
        None => run(args.serve).await,
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("p2pchat-discovery: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The operator key's file: given, or `operator.key` in the data directory.
fn operator_key_path(given: Option<PathBuf>, data_dir: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| {
        data_dir
            .unwrap_or_else(default_data_dir)
            .join(OPERATOR_KEY_FILE)
    })
}

async fn send_announcement(args: AnnounceArgs) -> anyhow::Result<()> {
    let looked_in = match (&args.operator_key, &args.data_dir) {
        (Some(_), _) => "the file --operator-key names",
        (None, Some(_)) => "the --data-dir given",
        (None, None) => "the default data directory",
    };
    let path = operator_key_path(args.operator_key, args.data_dir);
    if !path.exists() {
        anyhow::bail!(
            "no operator key at {} ({looked_in}). A server keeps its key in its data directory, \
             created at its first start: a server started with `--data-dir DIR` needs \
             `announce --data-dir DIR`, and one started with `--operator-key PATH` needs \
             `announce --operator-key PATH`",
            path.display()
        );
    }
    let operator = Identity::load(&path)
        .with_context(|| format!("cannot read the operator key {}", path.display()))?;
    let announcement = Announcement::sign(&operator, &args.text)?;
    let relayed = relay_announcement(&args.server, &announcement)
        .await
        .map_err(anyhow::Error::new);
    match &relayed {
        Ok(sessions) => println!(
            "announcement relayed by the server at {} ({sessions} sessions online there)",
            args.server
        ),
        Err(e) => eprintln!("p2pchat-discovery: the server did not relay it: {e:#}"),
    }
    let published = match &args.redis_url {
        Some(url) => {
            let published = publish(url, &args.channel, &announcement.to_json()).await;
            match &published {
                Ok(listeners) => println!(
                    "announcement published on Redis channel '{}' ({listeners} listeners)",
                    args.channel
                ),
                Err(e) => eprintln!("p2pchat-discovery: cannot publish on Redis at {url}: {e:#}"),
            }
            published.is_ok()
        }
        None => false,
    };
    if relayed.is_err() && !published {
        anyhow::bail!("the announcement reached nobody");
    }
    Ok(())
}

async fn publish(url: &str, channel: &str, payload: &str) -> anyhow::Result<i64> {
    let client = redis::Client::open(url)?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .context("no answer within 5 s")??;
    Ok(redis::cmd("PUBLISH")
        .arg(channel)
        .arg(payload)
        .query_async(&mut conn)
        .await?)
}

async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let key_path = operator_key_path(args.operator_key.clone(), args.data_dir.clone());
    let operator = load_or_create_operator_key(&key_path)?;
    tracing::info!(
        key = %key_path.display(),
        fingerprint = %operator.public_key().fingerprint(),
        "operator key"
    );
    let presence_ttl = Duration::from_secs(args.presence_ttl);
    let config = Config {
        presence_ttl,
        idle_timeout: presence_ttl * 3,
        claim_lapse: Duration::from_secs(args.claim_lapse_days.saturating_mul(24 * 3600)),
        max_connections: args.max_connections,
        max_connections_per_ip: args.max_connections_per_ip,
        registrations_per_second_per_ip: args.registrations_per_second,
        operator: Some(operator),
        probe_timeout: Duration::from_millis(args.probe_timeout_ms),
        new_claims_per_hour_per_ip: args.new_claims_per_hour,
        lookups_per_second_per_ip: args.lookups_per_second,
        lookups_per_second_per_session: args.lookups_per_second_per_session,
        max_total_watches: args.max_watches,
        max_relays: args.max_relays,
        max_relays_per_user: args.max_relays_per_user,
        relay_bytes_per_second: args.relay_bytes_per_second,
        relay_idle_timeout: Duration::from_secs(args.relay_idle_timeout),
        relay_addr: args.relay_addr,
        message_ttl: Duration::from_secs(args.message_ttl_days.saturating_mul(86_400)),
        ..Config::default()
    };
    let storage: Arc<dyn Storage> = match &args.redis_url {
        Some(url) => {
            let settings = RedisStorageConfig {
                announcement_channel: args.announcement_channel.clone(),
                quotas: args.quotas(),
                ..RedisStorageConfig::default()
            };
            Arc::new(
                RedisStorage::connect_with(url, settings)
                    .await
                    .with_context(|| format!("cannot use Redis at {url}"))?,
            )
        }
        None => {
            let dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
            let storage = RedbStorage::open_with_quotas(&dir, args.quotas())
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
        Directory::with_storage(config, storage),
        shutdown_signal(),
    )
    .await;
    Ok(())
}

/// Loads the operator key, creating it (mode 0600) and its directory (0700, when missing) on
/// first start. A key file other users can read or write is refused, with how to fix it.
fn load_or_create_operator_key(path: &std::path::Path) -> anyhow::Result<Identity> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let mut dirs = std::fs::DirBuilder::new();
        dirs.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut dirs, 0o700);
        dirs.create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    Identity::load_or_generate(path)
        .with_context(|| format!("cannot use the operator key {}", path.display()))
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
