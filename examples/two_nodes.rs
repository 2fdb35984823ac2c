//! Two chat nodes, `alice` and `bob`, finding each other through a real discovery server
//! and talking over real TCP on loopback.
//!
//! ```text
//! cargo run -p p2pchat-examples --example two_nodes
//! ```
//!
//! No external service is needed: the program starts the `p2pchat-discovery` server
//! in-process ([`p2pchat_discovery::serve`] on `127.0.0.1` at a free port, its embedded redb
//! store in a temporary directory, [`Config::default`]), and each node registers with it
//! through a [`DiscoveryClient`] over its own session connection. The offline mailboxes are
//! a [`MemoryStore`] shared by the two nodes. Each node listens on `127.0.0.1` at a free
//! port; the first message opens one authenticated connection between them and every later
//! message, in both directions, reuses it.
//!
//! The program prints each message as its recipient receives it (`[alice] hi`) and each
//! outcome the sender is told about (`Event::Delivered` once the peer has acknowledged),
//! then shuts both nodes down, and the server after them.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use p2pchat_core::{
    ChatNode, DiscoveryClient, Event, Events, MemoryStore, MessageId, TcpTransport,
};
use p2pchat_discovery::{Config, Directory, RedbStorage, serve};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// How long to wait for any one event before giving up: the example must end even if
/// something is broken.
const EVENT_TIMEOUT: Duration = Duration::from_secs(15);

/// The conversation, as turns: each turn is one speaker sending one or more lines in a
/// row (pipelined: the next line goes out before the previous one is acknowledged).
const SCRIPT: &[(&str, &[&str])] = &[
    ("alice", &["hi"]),
    ("bob", &["hi alice!", "long time no see"]),
    (
        "alice",
        &["this goes over one TCP connection", "sealed for you alone"],
    ),
    ("bob", &["nice. bye!"]),
];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
    println!("discovery server listens on {server_addr}");

    let store = MemoryStore::new();
    let alice = start("alice", server_addr, &store).await?;
    let bob = start("bob", server_addr, &store).await?;
    println!("alice listens on {}", alice.local_addr());
    println!("bob   listens on {}", bob.local_addr());
    println!(
        "bob's safety code, as alice sees it: {}",
        alice.fingerprint("bob").await?
    );
    println!();

    // Subscribe before sending anything: a stream sees only events emitted after it exists.
    let mut alice_events = alice.events();
    let mut bob_events = bob.events();

    for (speaker, lines) in SCRIPT {
        let (from, to, from_events, to_events) = match *speaker {
            "alice" => (&alice, &bob, &mut alice_events, &mut bob_events),
            _ => (&bob, &alice, &mut bob_events, &mut alice_events),
        };
        let mut ids = Vec::with_capacity(lines.len());
        for line in *lines {
            ids.push(from.send(to.username(), line).await?);
        }
        for &id in &ids {
            let (sender, text) = received(to_events, id).await?;
            println!("[{sender}] {text}");
        }
        for &id in &ids {
            println!("    ({})", outcome(from_events, id).await?);
        }
    }

    println!();
    alice.shutdown().await.context("shutting alice down")?;
    bob.shutdown().await.context("shutting bob down")?;
    println!("both nodes shut down");
    let _ = stop_server.send(());
    server.await.context("the discovery server task failed")?;
    println!("discovery server shut down");
    Ok(())
}

/// Starts a node on TCP loopback, registered with the discovery server at `server`.
async fn start(name: &str, server: SocketAddr, store: &MemoryStore) -> anyhow::Result<ChatNode> {
    ChatNode::builder()
        .username(name)
        .listen("127.0.0.1:0".parse()?)
        .transport(TcpTransport::new())
        .discovery(DiscoveryClient::new(server.to_string()))
        .offline_store(store.clone())
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

/// Waits until the recipient shows message `id`; returns its sender and text.
async fn received(events: &mut Events, id: MessageId) -> anyhow::Result<(String, String)> {
    next_matching(events, |event| match event {
        Event::MessageReceived {
            id: got,
            from,
            text,
            ..
        } if got == id => Ok(Some((from, text))),
        Event::Error { message } => bail!("recipient reported an error: {message}"),
        _ => Ok(None),
    })
    .await
    .with_context(|| format!("waiting to receive message {id}"))
}

/// Waits for the sender's outcome of message `id`, described as a sentence.
async fn outcome(events: &mut Events, id: MessageId) -> anyhow::Result<String> {
    next_matching(events, |event| match event {
        Event::Delivered { id: got, to } if got == id => {
            Ok(Some(format!("delivered to {to}, message {id}")))
        }
        Event::StoredOffline { id: got, to } if got == id => Ok(Some(format!(
            "{to} unreachable: stored offline, message {id}"
        ))),
        Event::SendFailed {
            id: got,
            to,
            reason,
        } if got == id => {
            bail!("sending to {to} failed: {reason}")
        }
        _ => Ok(None),
    })
    .await
    .with_context(|| format!("waiting for the outcome of message {id}"))
}
