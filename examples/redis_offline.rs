//! Offline delivery through Redis: messages for a peer that is away wait in its mailbox in
//! Redis ([`RedisStore`], a Redis stream per user), still sealed, until it comes back.
//!
//! ```text
//! cargo run -p p2pchat-examples --example redis_offline -- --redis-url redis://127.0.0.1:6379/
//! ```
//!
//! It needs a running Redis: `--redis-url URL`, or the `REDIS_URL` environment variable,
//! default `redis://127.0.0.1:6379/` (for one of your own, `redis-server --port 6379`).
//! Everything else runs in this process: a `p2pchat-discovery` server on a free port of
//! `127.0.0.1` with its embedded store in a temporary directory (as in `two_nodes`), and
//! two nodes, `alice` and `bob`, listening on `127.0.0.1`, whose offline store is one
//! [`RedisStore`] (`.offline_store(…)`: in place of the server's mailbox).
//!
//! `alice` writes to `bob` while he is online (delivered directly, Redis untouched); `bob`
//! shuts down; `alice` writes three more (each `Event::StoredOffline`: put in `bob`'s
//! mailbox in Redis). The program then reads that mailbox as any process sharing the Redis
//! could (`OfflineStore::fetch`, which leaves the messages in place) to show what Redis
//! holds: Fernet tokens and routing metadata, never the text. `bob` starts again with the
//! same identity key and is shown the three messages as his node drains the mailbox
//! (`[Offline][alice] …`); it acknowledges them, which removes them from Redis.
//!
//! The mailboxes live under the key prefix `--prefix` (default: one of this run's own,
//! `p2pchat-example-<pid>-<time>`, so runs never mix); nodes and discovery servers that
//! share mailboxes use the same Redis and the same prefix (`p2pchat` by default:
//! [`RedisStoreConfig::default`]).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use futures::StreamExt;
use p2pchat_core::{
    ChatNode, DiscoveryClient, Event, Events, Identity, MessageId, OfflineStore, RedisStore,
    RedisStoreConfig, TcpTransport,
};
use p2pchat_discovery::{Config, Directory, RedbStorage, serve};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// How long to wait for any one event before giving up: the example must end even if
/// something is broken.
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

/// What alice writes while bob is away.
const WHILE_AWAY: [&str; 3] = [
    "bob, are you there?",
    "this waits in Redis",
    "sealed: Redis sees only tokens",
];

/// Offline delivery through a RedisStore.
#[derive(Debug, Parser)]
struct Args {
    /// The Redis to keep the mailboxes in.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    redis_url: String,
    /// Prefix of every Redis key (default: one of this run's own).
    #[arg(long)]
    prefix: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let prefix = args.prefix.unwrap_or_else(|| {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("p2pchat-example-{}-{nanos}", std::process::id())
    });
    let redis = RedisStore::connect_with(
        &args.redis_url,
        RedisStoreConfig {
            prefix: prefix.clone(),
            ..RedisStoreConfig::default()
        },
    )
    .await
    .with_context(|| format!("connecting to Redis at {}", args.redis_url))?;
    println!(
        "offline mailboxes in Redis at {} under {prefix}:",
        args.redis_url
    );

    // The discovery server, in this process: embedded store in a temporary directory.
    let data_dir = tempfile::tempdir().context("creating the server's data directory")?;
    let storage = RedbStorage::open(data_dir.path()).context("opening the server's store")?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let server_addr = listener.local_addr()?;
    let (stop_server, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        listener,
        Directory::new(Config::default(), storage),
        async {
            let _ = stopped.await;
        },
    ));

    let alice = start("alice", Identity::generate(), server_addr, &redis).await?;
    let mut alice_events = alice.events();
    // bob's key is kept: he comes back with it (a real application saves it to a file,
    // `Identity::load_or_generate`).
    let bob_key = Identity::generate();
    let bob = start("bob", bob_key.clone(), server_addr, &redis).await?;
    let mut bob_events = bob.events();

    let id = alice.send("bob", "hi bob").await?;
    show(&mut bob_events, "bob", id).await?;
    println!("    ({})", outcome(&mut alice_events, id).await?);

    bob.shutdown().await.context("shutting bob down")?;
    drop(bob_events);
    println!("bob goes offline");
    let mut waiting = Vec::new();
    for text in WHILE_AWAY {
        let id = alice.send("bob", text).await?;
        println!("    ({})", outcome(&mut alice_events, id).await?);
        waiting.push(id);
    }

    // What Redis holds for bob now (`fetch` leaves the messages where they are).
    let mailbox = redis.fetch("bob", 100).await?;
    println!(
        "bob's mailbox in Redis ({prefix}:mbox:bob) holds {} messages:",
        mailbox.len()
    );
    for message in &mailbox {
        ensure!(
            !WHILE_AWAY.iter().any(|text| message.token.contains(text)),
            "the text of a message is in Redis"
        );
        let expires_in = message
            .expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        println!(
            "    {} from {}: a {}-byte token {}…, expires in {} days",
            message.id,
            message.from,
            message.token.len(),
            message.token.get(..12).unwrap_or(&message.token),
            (expires_in.as_secs() + 43_200) / 86_400,
        );
    }

    let bob = start("bob", bob_key, server_addr, &redis).await?;
    let mut bob_events = bob.events();
    println!("bob is back");
    for id in waiting {
        show(&mut bob_events, "bob", id).await?;
    }

    alice.shutdown().await.context("shutting alice down")?;
    bob.shutdown().await.context("shutting bob down")?;
    let _ = stop_server.send(());
    server.await.context("the discovery server task failed")?;
    println!("both nodes and the server shut down");
    Ok(())
}

/// Starts a node on TCP loopback, registered with the discovery server at `server`, with
/// its offline mail in Redis.
async fn start(
    name: &str,
    identity: Identity,
    server: SocketAddr,
    redis: &RedisStore,
) -> anyhow::Result<ChatNode> {
    ChatNode::builder()
        .username(name)
        .identity(identity)
        .listen("127.0.0.1:0".parse()?)
        .transport(TcpTransport::new())
        .discovery(DiscoveryClient::new(server.to_string()))
        .offline_store(redis.clone())
        .spawn()
        .await
        .with_context(|| format!("starting {name}"))
}

/// The next event on `events` for which `pick` returns something.
async fn next_matching<T>(
    events: &mut Events,
    mut pick: impl FnMut(Event) -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    loop {
        let event = tokio::time::timeout(EVENT_TIMEOUT, events.next())
            .await
            .context("no event in time")?
            .context("the node's event stream ended")?;
        if let Some(found) = pick(event)? {
            return Ok(found);
        }
    }
}

/// Waits until `reader` is shown message `id`, and prints it.
async fn show(events: &mut Events, reader: &str, id: MessageId) -> anyhow::Result<()> {
    let line = next_matching(events, |event| match event {
        Event::MessageReceived {
            id: got,
            from,
            text,
            offline,
            ..
        } if got == id => Ok(Some(if offline {
            format!("[Offline][{from}] {text}")
        } else {
            format!("[{from}] {text}")
        })),
        Event::Error { message } => bail!("{reader}'s node reported an error: {message}"),
        _ => Ok(None),
    })
    .await
    .with_context(|| format!("waiting for {reader} to receive message {id}"))?;
    println!("{reader} sees: {line}");
    Ok(())
}

/// Waits for the sender's outcome of message `id`, described as a sentence.
async fn outcome(events: &mut Events, id: MessageId) -> anyhow::Result<String> {
    next_matching(events, |event| match event {
        Event::Delivered { id: got, to } if got == id => Ok(Some(format!("delivered to {to}"))),
        Event::StoredOffline { id: got, to } if got == id => Ok(Some(format!(
            "{to} is offline: stored in {to}'s mailbox in Redis"
        ))),
        Event::SendFailed {
            id: got,
            to,
            reason,
        } if got == id => bail!("sending to {to} failed: {reason}"),
        _ => Ok(None),
    })
    .await
    .with_context(|| format!("waiting for the outcome of message {id}"))
}
