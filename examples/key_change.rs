//! A peer's identity key changes: `bob` loses his key and registers his name again with a
//! new one. `alice`, who pinned the old key when she first talked to him, is told
//! (`Event::KeyChanged`), her node holds every message between them (hers to him, unsent;
//! his to her, unshown) until she accepts the new key with [`ChatNode::trust`], which
//! releases them.
//!
//! ```text
//! cargo run -p p2pchat-examples --example key_change
//! ```
//!
//! No external service is needed: a `p2pchat-discovery` server runs in this process on a
//! free port of `127.0.0.1` (embedded store in a temporary directory), and two nodes listen
//! on `127.0.0.1`. A name on a server belongs to the key that first claimed it until its
//! owner has been away for the claim lapse (`--claim-lapse-days`, 180 days by default);
//! this server's lapse is zero ([`Config::claim_lapse`]), so the name is free for a new
//! key as soon as the old `bob` is offline.
//!
//! What a real application does at the `KeyChanged` event: show both safety codes
//! ([`ChatNode::fingerprint`] gives the pinned one) and ask the user to compare the new one
//! with the peer's, out of band, before calling `trust`. Until then, nothing goes to the new
//! key and nothing from it is shown. This program trusts after printing the codes.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use futures::{FutureExt, StreamExt};
use p2pchat_core::{
    ChatNode, DiscoveryClient, Event, Events, Identity, MessageId, OutboxEntry, OutboxState,
    TcpTransport,
};
use p2pchat_discovery::{Config, Directory, RedbStorage, serve};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// How long to wait for any one event before giving up: the example must end even if
/// something is broken.
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The discovery server, in this process, with claims that lapse at once.
    let data_dir = tempfile::tempdir().context("creating the server's data directory")?;
    let storage = RedbStorage::open(data_dir.path()).context("opening the server's store")?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let server_addr = listener.local_addr()?;
    let config = Config {
        claim_lapse: Duration::ZERO,
        ..Config::default()
    };
    let (stop_server, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, Directory::new(config, storage), async {
        let _ = stopped.await;
    }));

    let alice = start("alice", Identity::generate(), server_addr).await?;
    let mut alice_events = alice.events();
    let bob = start("bob", Identity::generate(), server_addr).await?;
    let mut bob_events = bob.events();

    // First contact: alice pins the key the directory has for bob.
    let id = alice.send("bob", "hello bob").await?;
    show(&mut bob_events, "bob", id).await?;
    println!("    ({})", outcome(&mut alice_events, id).await?);
    let pinned = alice.fingerprint("bob").await?;
    println!("alice pinned bob's key: safety code {pinned}");

    // bob loses his key; his name lapses once he is offline, and he claims it again.
    bob.shutdown()
        .await
        .context("shutting the first bob down")?;
    drop(bob_events);
    let new_bob = start("bob", Identity::generate(), server_addr).await?;
    let mut new_bob_events = new_bob.events();
    println!(
        "bob registers again with a new key: safety code {}",
        new_bob.public_key().fingerprint()
    );

    // alice writes to bob: the directory now has another key for him.
    let held_out = alice.send("bob", "is that really you?").await?;
    let (old, new) = next_matching(&mut alice_events, |event| match event {
        Event::KeyChanged { username, old, new } if username == "bob" => Ok(Some((old, new))),
        Event::Delivered { id, .. } | Event::StoredOffline { id, .. } if id == held_out => {
            bail!("a message went to a key alice never accepted")
        }
        _ => Ok(None),
    })
    .await
    .context("waiting for alice to notice bob's new key")?;
    println!("alice is warned: bob's key changed from {old} to {new}");
    ensure!(old == pinned, "the warning names another pinned key");
    ensure!(
        alice.fingerprint("bob").await? == pinned,
        "the pin changed without trust"
    );
    let outbox = alice.outbox().await;
    for entry in &outbox {
        println!(
            "    held in alice's outbox: {} to {}, {:?}",
            entry.id, entry.to, entry.state
        );
    }
    let held = |entry: &OutboxEntry| entry.id == held_out && entry.state == OutboxState::Queued;
    ensure!(
        matches!(&outbox[..], [entry] if held(entry)),
        "alice's message should wait in her outbox, unsent"
    );

    // The new bob writes to alice. Her node takes the message (his node is told it was
    // delivered: it is durable at alice's), but holds it unshown.
    let held_in = new_bob.send("alice", "yes, new phone").await?;
    println!(
        "    bob's message to alice: {}",
        outcome(&mut new_bob_events, held_in).await?
    );
    // Nothing went either way so far (looking at the events already there, not waiting).
    while let Some(Some(event)) = alice_events.next().now_or_never() {
        match event {
            Event::MessageReceived { from, text, .. } => {
                bail!("alice was shown [{from}] {text} before trusting the new key")
            }
            Event::Delivered { id, .. } | Event::StoredOffline { id, .. } if id == held_out => {
                bail!("a message went to a key alice never accepted")
            }
            _ => {}
        }
    }
    println!("    alice's node holds it: nothing from the new key is shown yet");

    // alice compares the safety codes with bob out of band, and accepts the new key.
    alice
        .trust("bob")
        .await
        .context("alice trusting bob's new key")?;
    println!("alice trusts bob's new key");
    ensure!(
        alice.fingerprint("bob").await? == new_bob.public_key().fingerprint(),
        "the pin is the new key after trust"
    );
    show(&mut alice_events, "alice", held_in).await?;
    println!("    ({})", outcome(&mut alice_events, held_out).await?);
    show(&mut new_bob_events, "bob", held_out).await?;

    alice.shutdown().await.context("shutting alice down")?;
    new_bob.shutdown().await.context("shutting bob down")?;
    let _ = stop_server.send(());
    server.await.context("the discovery server task failed")?;
    println!("both nodes and the server shut down");
    Ok(())
}

/// Starts a node on TCP loopback, registered with the discovery server at `server`; its
/// offline mail is in the server's mailbox.
async fn start(name: &str, identity: Identity, server: SocketAddr) -> anyhow::Result<ChatNode> {
    ChatNode::builder()
        .username(name)
        .identity(identity)
        .listen("127.0.0.1:0".parse()?)
        .transport(TcpTransport::new())
        .discovery(DiscoveryClient::new(server.to_string()))
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
