//! Offline store throughput: put 10,000 messages into one mailbox, then drain them (fetch a
//! batch, acknowledge it, repeat), through `RedisStore` and through the discovery server's
//! redb mailbox (`MailboxStore` over a real session); and, on the same Redis, the seed's
//! way as a baseline in the same run: one `RPUSH` per message, awaited one at a time, and
//! `LPOP` until the list is empty (what the original Python client did).
//!
//! ```text
//! cargo run --release -p p2pchat-benches --bin offline-load -- --messages 10000
//! ```
//!
//! Redis is a `redis-server` this program starts on a free port in a temporary directory
//! (append-only file on, as a deployment that keeps mail would run it), unless `--redis-url`
//! names one. The discovery server runs in this process on 127.0.0.1 with its embedded store
//! in a temporary directory and no deposit rate limit. Puts are issued one at a time, then
//! with `--concurrency` at once, then with `put_many` in batches of `--batch` (as a node's
//! link hands the store the messages waiting for one peer); tokens are 200-byte strings,
//! about the size of a sealed short message. Last, for each store, a `ChatNode` sends
//! `--messages` messages one `send` at a time to a peer who is away (the node's real path:
//! durable outbox, then the store), timed until the node reports the last one stored.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use p2pchat_core::discovery::Registration;
use p2pchat_core::store::{
    MAX_FETCH_BATCH, MailKey, OfflineStore, Quotas, RedisStore, RedisStoreConfig,
};
use p2pchat_core::testing::{RedisServer, shaped_token};
use p2pchat_core::{
    ChatNode, Discovery, DiscoveryClient, DiscoverySession, Event, Identity, MemoryDiscovery,
    MessageId, TcpTransport,
};
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
    /// Messages per `put_many` in the batched runs (a node's outbox hands its store up to
    /// 256 at once).
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Use this Redis instead of starting one.
    #[arg(long)]
    redis_url: Option<String>,
}

fn message(i: usize) -> p2pchat_core::StoredMessage {
    p2pchat_core::StoredMessage {
        id: MessageId::random(),
        from: "alice".into(),
        to: "bob".into(),
        // Shaped like a Fernet token (the server checks), about 200 bytes.
        token: shaped_token(format!("{i:0>120}").as_bytes()),
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

/// Puts `n` messages with `put_many`, `batch` at a time; returns the elapsed time.
async fn put_batches(store: &dyn OfflineStore, n: usize, batch: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut i = 0;
    while i < n {
        let messages: Vec<_> = (i..n.min(i + batch)).map(message).collect();
        i += messages.len();
        for result in store.put_many(messages).await {
            result?;
        }
    }
    Ok(started.elapsed())
}

/// The seed's offline store on the same Redis: one `RPUSH` of a JSON message per message,
/// each awaited before the next, then `LPOP` until the list is empty. Returns the two times.
async fn seed_style(url: &str, n: usize) -> anyhow::Result<(Duration, Duration)> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let key = format!("seed{:08x}:offline:bob", rand_suffix());
    let started = Instant::now();
    for i in 0..n {
        let m = message(i);
        let json = format!(
            r#"{{"from":"{}","message":"{}","id":"{}"}}"#,
            m.from, m.token, m.id
        );
        let _: i64 = redis::cmd("RPUSH")
            .arg(&key)
            .arg(json)
            .query_async(&mut conn)
            .await?;
    }
    let put = started.elapsed();
    let started = Instant::now();
    let mut drained = 0;
    loop {
        let item: Option<String> = redis::cmd("LPOP").arg(&key).query_async(&mut conn).await?;
        if item.is_none() {
            break;
        }
        drained += 1;
    }
    anyhow::ensure!(drained == n, "the seed-style list drained {drained} of {n}");
    Ok((put, started.elapsed()))
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
        let acked: Vec<MailKey> = batch.iter().map(MailKey::of).collect();
        store.ack("bob", &acked).await?;
    }
}

fn rate(n: usize, d: Duration) -> String {
    format!(
        "{n} in {:.3} s = {:.0} msg/s",
        d.as_secs_f64(),
        n as f64 / d.as_secs_f64()
    )
}

/// One backend: sequential puts, drain, concurrent puts, drain, batched puts, drain.
/// Returns the batched run's (put, drain) times.
async fn measure(
    name: &str,
    writer: Arc<dyn OfflineStore>,
    reader: Arc<dyn OfflineStore>,
    args: &Args,
) -> anyhow::Result<(Duration, Duration)> {
    let mut batched = (Duration::ZERO, Duration::ZERO);
    for how in ["x1", "xN", "many"] {
        let put = match how {
            "x1" => put_all(writer.clone(), args.messages, 1).await?,
            "xN" => put_all(writer.clone(), args.messages, args.concurrency).await?,
            _ => put_batches(writer.as_ref(), args.messages, args.batch).await?,
        };
        let (drained, took) = drain(reader.as_ref()).await?;
        anyhow::ensure!(
            drained == args.messages,
            "drained {drained} of {}",
            args.messages
        );
        let label = match how {
            "x1" => "put x1".to_owned(),
            "xN" => format!("put x{}", args.concurrency),
            _ => format!("put_many {}", args.batch),
        };
        println!(
            "{name:<28} {label:<12} {:<40} drain {}",
            rate(args.messages, put),
            rate(drained, took)
        );
        batched = (put, took);
    }
    Ok(batched)
}

/// The node's real path: `n` `ChatNode::send` calls, each awaited before the next, to a
/// peer who is away, until the node reports every message `StoredOffline`. The sender
/// (`sender`) keeps its durable outbox in a temporary data directory; the recipient (`away`)
/// is spawned once and shut down first, so the directory knows it as offline. Returns the
/// elapsed time.
async fn node_sends(
    discovery: impl Discovery + Clone,
    store: Option<Arc<dyn OfflineStore>>,
    n: usize,
) -> anyhow::Result<Duration> {
    let dir = tempfile::tempdir()?;
    let node = |name: &str| {
        let mut builder = ChatNode::builder()
            .identity(Identity::generate())
            .username(name)
            .listen("127.0.0.1:0".parse().expect("an address"))
            .transport(TcpTransport::new())
            .discovery(discovery.clone())
            .data_dir(dir.path().join(name))
            .event_capacity(n * 2 + 64);
        if let Some(store) = &store {
            builder = builder.offline_store(store.clone());
        }
        builder
    };
    node("away").spawn().await?.shutdown().await?;
    let sender = node("sender").spawn().await?;
    let mut events = sender.events();
    let stored = tokio::spawn(async move {
        let mut stored = 0;
        while stored < n {
            match events.next().await {
                Some(Event::StoredOffline { .. }) => stored += 1,
                Some(Event::SendFailed { reason, .. }) => anyhow::bail!("a send failed: {reason}"),
                Some(_) => {}
                None => anyhow::bail!("the event stream ended after {stored} stored"),
            }
        }
        anyhow::Ok(())
    });
    let started = Instant::now();
    for i in 0..n {
        sender.send("away", &format!("message {i:0>100}")).await?;
    }
    stored.await??;
    let took = started.elapsed();
    sender.shutdown().await?;
    Ok(took)
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
        dialable: true,
    };
    Ok(client
        .register(&Identity::generate(), registration, tx)
        .await?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let quota = RedisStoreConfig {
        // This measures the stores, not their limits.
        quotas: Quotas::unlimited(),
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
    let (seed_put, seed_drain) = seed_style(&url, args.messages).await?;
    println!(
        "{:<28} {:<12} {:<40} drain {}",
        "seed-style RPUSH/LPOP",
        "rpush x1",
        rate(args.messages, seed_put),
        rate(args.messages, seed_drain)
    );
    measure(
        "RedisStore (appendonly)",
        redis.clone(),
        redis.clone(),
        &args,
    )
    .await?;
    let took = node_sends(MemoryDiscovery::new(), Some(redis), args.messages).await?;
    println!(
        "{:<28} {:<12} {}",
        "RedisStore (appendonly)",
        "node send x1",
        rate(args.messages, took)
    );

    // The discovery server's redb mailbox, over real sessions.
    let dir = tempfile::tempdir()?;
    let storage = RedbStorage::open_with_quotas(dir.path(), Quotas::unlimited())?;
    // Unlimited deposits per user: this measures the store, not the rate limiter (whose
    // default, 1,000 a second after a burst of 10,000, the three runs would exceed).
    let config = Config {
        deposits_per_second_per_user: 0,
        new_claims_per_hour_per_ip: 0,
        ..Config::default()
    };
    let server = Directory::new(config, storage);
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
    let (put, drained) = measure("server mailbox (redb)", writer, reader, &args).await?;
    println!(
        "server mailbox (redb), put_many, beside the seed-style baseline: put {:.1}x as fast, \
         drain {:.1}x",
        seed_put.as_secs_f64() / put.as_secs_f64(),
        seed_drain.as_secs_f64() / drained.as_secs_f64()
    );
    drop((alice, bob));
    let took = node_sends(client.clone(), None, args.messages).await?;
    println!(
        "{:<28} {:<12} {}",
        "server mailbox (redb)",
        "node send x1",
        rate(args.messages, took)
    );
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
