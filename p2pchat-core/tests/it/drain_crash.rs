//! A node that crashes while its mailbox drain waits on the directory: what the drain had
//! opened but not yet shown must still be shown after the restart, exactly once.
//!
//! For a sender whose key is not pinned yet the drain asks the directory; meanwhile a live
//! connection's reader makes its own batch durable in the inbox (and in the sender's dedup
//! window). A crash then must not leave ids remembered as received for messages never made
//! durable in the inbox and never acknowledged in the mailbox: after the restart the drain
//! fetches them again and must show them, not drop them as duplicates.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use p2pchat_core::discovery::{DiscoveryEvent, Page, PeerRecord, Registration};
use p2pchat_core::store::OfflineStore;
use p2pchat_core::{
    ChatNode, Discovery, DiscoveryError, DiscoverySession, Event, Events, Identity,
    MemoryDiscovery, MessageId, PublicKey, TcpTransport,
};
use tokio::sync::{Notify, mpsc};

use super::util::{World, buffered, wait_for};

/// A directory whose lookups of one name never answer; it says when one is waiting.
#[derive(Debug, Clone)]
struct Stalling {
    inner: MemoryDiscovery,
    name: &'static str,
    waiting: Arc<Notify>,
}

#[derive(Debug)]
struct StallingSession {
    inner: Box<dyn DiscoverySession>,
    name: &'static str,
    waiting: Arc<Notify>,
}

#[async_trait]
impl Discovery for Stalling {
    async fn register(
        &self,
        identity: &Identity,
        registration: Registration,
        events: mpsc::Sender<DiscoveryEvent>,
    ) -> Result<Box<dyn DiscoverySession>, DiscoveryError> {
        let inner = self.inner.register(identity, registration, events).await?;
        Ok(Box::new(StallingSession {
            inner,
            name: self.name,
            waiting: self.waiting.clone(),
        }))
    }
}

#[async_trait]
impl DiscoverySession for StallingSession {
    async fn keep_alive(&self) -> Result<(), DiscoveryError> {
        self.inner.keep_alive().await
    }
    async fn lookup(&self, username: &str) -> Result<Option<PeerRecord>, DiscoveryError> {
        if username == self.name {
            self.waiting.notify_one();
            std::future::pending::<()>().await;
        }
        self.inner.lookup(username).await
    }
    async fn list_online(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> Result<Page, DiscoveryError> {
        self.inner.list_online(after, limit).await
    }
    async fn watch(&self, username: &str) -> Result<(), DiscoveryError> {
        self.inner.watch(username).await
    }
    async fn deregister(&self) -> Result<(), DiscoveryError> {
        self.inner.deregister().await
    }
    fn mailbox(&self) -> Option<Arc<dyn OfflineStore>> {
        self.inner.mailbox()
    }
    fn operator_key(&self) -> Option<PublicKey> {
        self.inner.operator_key()
    }
}

async fn outcome(events: &mut Events, id: MessageId) -> Event {
    wait_for(events, |e| match e {
        Event::Delivered { id: got, .. }
        | Event::StoredOffline { id: got, .. }
        | Event::SendFailed { id: got, .. } => *got == id,
        _ => false,
    })
    .await
}

async fn shown(events: &mut Events, id: MessageId) {
    wait_for(
        events,
        |e| matches!(e, Event::MessageReceived { id: got, .. } if *got == id),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_the_drain_waits_for_a_lookup_loses_none_of_the_mail() {
    let world = World::new();
    let dir = tempfile::tempdir().unwrap();
    let bob_id = Identity::generate();
    let bob = world
        .node_with("bob", bob_id.clone(), Some(dir.path()), TcpTransport::new())
        .await;
    let alice = world.tcp_node("alice").await;
    let carol = world.tcp_node("carol").await;
    let dave = world.tcp_node("dave").await;
    let (mut alice_events, mut carol_events, mut dave_events) =
        (alice.events(), carol.events(), dave.events());

    // bob has heard from alice and carol (their keys are pinned in his data directory), never
    // from dave.
    let mut bob_events = bob.events();
    for from in [&alice, &carol] {
        let id = from.send("bob", "hello").await.unwrap();
        shown(&mut bob_events, id).await;
    }
    bob.shutdown().await.unwrap();

    // Mail for bob: carol's first, then dave's.
    let from_carol = carol.send("bob", "mail from carol").await.unwrap();
    assert!(matches!(
        outcome(&mut carol_events, from_carol).await,
        Event::StoredOffline { .. }
    ));
    let from_dave = dave.send("bob", "mail from dave").await.unwrap();
    assert!(matches!(
        outcome(&mut dave_events, from_dave).await,
        Event::StoredOffline { .. }
    ));

    // bob comes back; his drain opens carol's message and asks the directory for dave's key,
    // which does not answer.
    let stalling = Stalling {
        inner: world.directory.clone(),
        name: "dave",
        waiting: Arc::new(Notify::new()),
    };
    let bob = ChatNode::builder()
        .identity(bob_id.clone())
        .username("bob")
        .listen("127.0.0.1:0".parse().unwrap())
        .transport(TcpTransport::new())
        .discovery(stalling.clone())
        .offline_store(world.store.clone())
        .data_dir(dir.path())
        .spawn()
        .await
        .unwrap();
    let mut first_life = bob.events();
    tokio::time::timeout(Duration::from_secs(10), stalling.waiting.notified())
        .await
        .expect("the drain asks for dave's key");
    // The stalled drain holds bob's actor, so nobody can connect to him; but his own link
    // can connect out. alice answers over that connection, and bob's reader makes its
    // batch's ids durable, then shows it.
    let ping = bob.send("alice", "are you there?").await.unwrap();
    let mut alice_shows = alice.events();
    shown(&mut alice_shows, ping).await;
    let live = alice.send("bob", "live from alice").await.unwrap();
    assert!(matches!(
        outcome(&mut alice_events, live).await,
        Event::Delivered { .. }
    ));
    bob.simulate_crash().await;
    let mut shown_ids: Vec<MessageId> = Vec::new();
    while let Some(event) = first_life.next().await {
        if let Event::MessageReceived { id, .. } = event {
            shown_ids.push(id);
        }
    }

    // bob comes back with a directory that answers, and drains his mailbox.
    let bob = world
        .node_with("bob", bob_id, Some(dir.path()), TcpTransport::new())
        .await;
    let mut second_life = bob.events();
    // Until dave's mail is shown (it comes after carol's), keeping everything shown and any
    // error reported.
    let mut errors = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = second_life.next().await {
            match event {
                Event::MessageReceived { id, .. } => {
                    shown_ids.push(id);
                    if id == from_dave {
                        return;
                    }
                }
                Event::Error { message } => errors.push(message),
                _ => {}
            }
        }
    })
    .await
    .expect("dave's mail is shown");
    tokio::time::timeout(Duration::from_secs(10), async {
        while !world.store.fetch("bob", 10).await.unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the mailbox is drained");
    for event in buffered(&mut second_life) {
        match event {
            Event::MessageReceived { id, .. } => shown_ids.push(id),
            Event::Error { message } => errors.push(message),
            _ => {}
        }
    }

    let sent = [from_carol, from_dave, live];
    let _ = alice_shows;
    let count = |id: &MessageId| shown_ids.iter().filter(|s| *s == id).count();
    let lost = sent.iter().filter(|id| count(id) == 0).count();
    let duplicated: usize = sent.iter().map(|id| count(id).saturating_sub(1)).sum();
    println!(
        "drain-crash: sent={} shown={} lost={lost} duplicated={duplicated} (carol's mail shown \
         {} times, dave's {}, alice's live message {}; errors after the restart: {errors:?})",
        sent.len(),
        sent.len() - lost,
        count(&from_carol),
        count(&from_dave),
        count(&live)
    );
    for n in [&alice, &bob, &carol, &dave] {
        n.shutdown().await.unwrap();
    }
    assert_eq!(lost, 0, "carol's mail was lost");
    assert_eq!(duplicated, 0);
}
