//! Offline store throughput: put 10,000 messages into one mailbox, then drain them (fetch a
//! batch, acknowledge it, repeat), through `RedisStore` and through the discovery server's
//! redb mailbox (`MailboxStore` over a real session).
//!
//! ```text
//! cargo run --release -p p2pchat-benches --bin offline-load -- --messages 10000
//! ```
//!
//! Redis is a `redis-server` this program starts on a free port in a temporary directory
//! (append-only file on, as a deployment that keeps mail would run it), unless `--redis-url`
//! names one. The discovery server runs in this process on 127.0.0.1 with its embedded store
//! in a temporary directory. Puts are issued one at a time (as one node's link stores its
//! messages) and then with `--concurrency` at once; tokens are 200-byte strings, about the
//! size of a sealed short message.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::Parser;
use p2pchat_core::discovery::Registration;
use p2pchat_core::store::{MAX_FETCH_BATCH, OfflineStore, RedisStore, RedisStoreConfig};
use p2pchat_core::testing::RedisServer;
use p2pchat_core::{Discovery, DiscoveryClient, DiscoverySession, Identity, MessageId};
use p2pchat_discovery::{Config, Directory, RedbStorage, serve};
use tokio::sync::mpsc;

/// Measures putting and draining one mailbox.
#[derive(Debug, Parser)]
struct Args {
    /// Messages per run.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Puts in flight at once in the concurrent runs.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Use this Redis instead of starting one.
    #[arg(long)]
    redis_url: Option<String>,
}

fn message(i: usize) -> p2pchat_core::StoredMessage {
    p2pchat_core::StoredMessage {
        id: MessageId::random(),
        from: "alice".into(),
        to: "bob".into(),
        token: format!("{i:0>200}"),
        expires_at: SystemTime::now() + Duration::from_secs(3600),
    }
}

/// Puts `n` messages, `concurrency` at a time; returns the elapsed time.
async fn put_all(
    store: Arc<dyn OfflineStore>,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        if tasks.len() >= concurrency
            && let Some(done) = tasks.join_next().await
        {
            done??;
        }
        let store = store.clone();
        tasks.spawn(async move { store.put(message(i)).await });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(started.elapsed())
}

/// Fetches and acknowledges until the mailbox is empty; returns (messages, elapsed).
async fn drain(store: &dyn OfflineStore) -> anyhow::Result<(usize, Duration)> {
    let started = Instant::now();
    let mut drained = 0;
    loop {
        let batch = store.fetch("bob", MAX_FETCH_BATCH).await?;
        if batch.is_empty() {
            return Ok((drained, started.elapsed()));
        }
        drained += batch.len();
        let ids: Vec<MessageId> = batch.iter().map(|m| m.id).collect();
        store.ack("bob", &ids).await?;
    }
}

fn rate(n: usize, d: Duration) -> String {
    format!(
        "{n} in {:.3} s = {:.0} msg/s",
        d.as_secs_f64(),
        n as f64 / d.as_secs_f64()
    )
}

/// One backend: sequential puts, drain, concurrent puts, drain.
async fn measure(
    name: &str,
    writer: Arc<dyn OfflineStore>,
    reader: Arc<dyn OfflineStore>,
    args: &Args,
) -> anyhow::Result<()> {
    for concurrency in [1, args.concurrency] {
        let put = put_all(writer.clone(), args.messages, concurrency).await?;
        let (drained, took) = drain(reader.as_ref()).await?;
        anyhow::ensure!(
            drained == args.messages,
            "drained {drained} of {}",
            args.messages
        );
        println!(
            "{name:<28} put (x{concurrency:<2}) {:<40} drain {}",
            rate(args.messages, put),
            rate(drained, took)
        );
    }
    Ok(())
}

async fn register(
    client: &DiscoveryClient,
    name: &str,
) -> anyhow::Result<Box<dyn DiscoverySession>> {
    let (tx, _rx) = mpsc::channel(1);
    let registration = Registration {
        username: name.into(),
        listen_port: 7000,
        announce: Vec::new(),
    };
    Ok(client
        .register(&Identity::generate(), registration, tx)
        .await?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let quota = RedisStoreConfig {
        quota: args.messages,
        ..RedisStoreConfig::default()
    };

    // Redis, directly.
    let own;
    let url = match &args.redis_url {
        Some(url) => url.clone(),
        None => {
            own = RedisServer::start_with_appendonly();
            own.url()
        }
    };
    let config = RedisStoreConfig {
        prefix: format!("load{:08x}", rand_suffix()),
        ..quota
    };
    let redis: Arc<dyn OfflineStore> = Arc::new(
        RedisStore::connect_with(&url, config)
            .await
            .with_context(|| format!("cannot use Redis at {url}"))?,
    );
    measure("RedisStore (appendonly)", redis.clone(), redis, &args).await?;

    // The discovery server's redb mailbox, over real sessions.
    let dir = tempfile::tempdir()?;
    let storage = RedbStorage::open_with_quota(dir.path(), args.messages)?;
    let server = Directory::new(Config::default(), storage);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let client = DiscoveryClient::new(listener.local_addr()?.to_string());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(serve(listener, server, async move {
        let _ = stopped.await;
    }));
    let alice = register(&client, "alice").await?;
    let bob = register(&client, "bob").await?;
    let (writer, reader) = (
        alice.mailbox().context("a mailbox")?,
        bob.mailbox().context("a mailbox")?,
    );
    measure("server mailbox (redb)", writer, reader, &args).await?;
    drop((alice, bob));
    let _ = stop.send(());
    serving.await?;
    Ok(())
}

fn rand_suffix() -> u32 {
    std::process::id()
        ^ (SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0))
}
