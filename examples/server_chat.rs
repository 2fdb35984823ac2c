//! Two nodes chatting through a real `p2pchat-discovery` server that runs in its own
//! process, with offline mail kept in that server's mailbox: the default deployment.
//!
//! Start the server, then the example, giving it the server's address:
//!
//! ```text
//! cargo run -p p2pchat-discovery -- --listen 127.0.0.1:5001 --data-dir /tmp/p2pchat-server
//! cargo run -p p2pchat-examples --example server_chat -- 127.0.0.1:5001
//! ```
//!
//! (The address defaults to `127.0.0.1:5001`, where a node built without `.discovery(…)`
//! looks for its server too.)
//!
//! `alice` and `bob` each register with the server through a [`DiscoveryClient`] and are
//! given no offline store, so each keeps offline mail in the server's mailbox
//! ([`p2pchat_core::MailboxStore`], reached over the node's own discovery session). They
//! exchange a message each way over a direct connection; then `bob` shuts down (goes
//! offline), `alice` writes to him anyway (the messages wait on the server, still sealed:
//! `Event::StoredOffline`), and when `bob` starts again, with the same identity key, the
//! node drains his mailbox at once and shows them (`Event::MessageReceived` with
//! `offline: true`, printed `[Offline][alice] …`). He answers, and both shut down.
//!
//! Each user keeps an identity key (`identity.key`) and the node database in a directory of
//! their own under `--data-dir DIR` (default: `p2pchat-example-server-chat` in the system's
//! temporary directory), as the `p2pchat` client does. A name on a server belongs to the key
//! that first claimed it, so running the example again against the same server must use the
//! same keys: keep the data directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use futures::StreamExt;
use p2pchat_core::discovery::DEFAULT_DISCOVERY_ADDR;
use p2pchat_core::{ChatNode, DiscoveryClient, Event, Events, Identity, MessageId};

/// How long to wait for any one event before giving up: the example must end even if
/// something is broken.
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

/// The identity key's file name in a user's data directory (the `p2pchat` client's too).
const IDENTITY_FILE: &str = "identity.key";

/// Two nodes chatting through a p2pchat-discovery server, with offline mail on the server.
#[derive(Debug, Parser)]
struct Args {
    /// The discovery server, `host:port`.
    #[arg(default_value = DEFAULT_DISCOVERY_ADDR)]
    server: String,
    /// Where each user's identity key and node database live (a directory per user).
    #[arg(long, default_value_os_t = std::env::temp_dir().join("p2pchat-example-server-chat"))]
    data_dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!("discovery server: {}", args.server);

    let alice = start("alice", &args).await?;
    // The first `events()` stream starts when the node was spawned: nothing is missed.
    let mut alice_events = alice.events();
    let bob = start("bob", &args).await?;
    let mut bob_events = bob.events();
    let mut online: Vec<String> = alice
        .peers()
        .await?
        .into_iter()
        .map(|p| p.username)
        .collect();
    online.sort();
    println!("online: {}", online.join(", "));

    // Both online: a direct connection, acknowledged end to end.
    let id = alice.send("bob", "hi bob").await?;
    show(&mut bob_events, "bob", id).await?;
    println!("    ({})", outcome(&mut alice_events, id).await?);
    let id = bob.send("alice", "hi alice, what's up?").await?;
    show(&mut alice_events, "alice", id).await?;
    println!("    ({})", outcome(&mut bob_events, id).await?);

    // bob leaves: the node deregisters, and the server knows he is offline.
    bob.shutdown().await.context("shutting bob down")?;
    drop(bob_events);
    println!("bob goes offline");
    let mut waiting = Vec::new();
    for text in ["are you there?", "call me when you are back"] {
        let id = alice.send("bob", text).await?;
        println!("    ({})", outcome(&mut alice_events, id).await?);
        waiting.push(id);
    }

    // bob comes back with the same key: his node drains the server mailbox as it starts.
    let bob = start("bob", &args).await?;
    let mut bob_events = bob.events();
    println!("bob is back");
    for id in waiting {
        show(&mut bob_events, "bob", id).await?;
    }
    let id = bob.send("alice", "back now, got both").await?;
    show(&mut alice_events, "alice", id).await?;
    println!("    ({})", outcome(&mut bob_events, id).await?);

    alice.shutdown().await.context("shutting alice down")?;
    bob.shutdown().await.context("shutting bob down")?;
    println!("both nodes shut down");
    Ok(())
}

/// Starts `name`'s node: its identity key and database in its own directory, registered
/// with the server, offline mail on the server (no `.offline_store(…)`).
async fn start(name: &str, args: &Args) -> anyhow::Result<ChatNode> {
    let dir: &Path = &args.data_dir.join(name);
    let identity = Identity::load_or_generate(dir.join(IDENTITY_FILE))
        .with_context(|| format!("loading {name}'s identity key from {}", dir.display()))?;
    ChatNode::builder()
        .username(name)
        .identity(identity)
        .data_dir(dir)
        .discovery(DiscoveryClient::new(args.server.clone()))
        .spawn()
        .await
        .with_context(|| {
            format!(
                "starting {name} (is p2pchat-discovery running at {}?)",
                args.server
            )
        })
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

/// Waits until `reader` is shown message `id`, and prints it as the `p2pchat` client
/// would.
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
            "{to} is offline: stored in the server's mailbox"
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
