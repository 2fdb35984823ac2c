//! Nothing before authentication: a dialer that has not proved its key changes nothing at the
//! node (no pin, no key-change report, no held link) and costs at most one directory lookup,
//! within the node's budget for strangers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::{SinkExt, StreamExt};
use p2pchat_core::discovery::{
    Discovery, DiscoveryError, DiscoveryEvent, DiscoverySession, Page, PeerRecord, Registration,
    RelayTicket,
};
use p2pchat_core::node::MAX_STRANGER_LOOKUPS_PER_SECOND;
use p2pchat_core::protocol::{FrameCodec, Hello, PeerFrame};
use p2pchat_core::transport::Connection;
use p2pchat_core::{
    ChatNode, Event, Identity, MemoryDiscovery, MemoryStore, OfflineStore, PublicKey, TcpTransport,
};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};

use super::util::wait_for;

/// A directory that counts the lookups made through it.
#[derive(Debug, Clone)]
struct Counting {
    inner: MemoryDiscovery,
    lookups: Arc<AtomicUsize>,
}

#[derive(Debug)]
struct CountingSession {
    inner: Box<dyn DiscoverySession>,
    lookups: Arc<AtomicUsize>,
}

#[async_trait]
impl Discovery for Counting {
    async fn register(
        &self,
        identity: &Identity,
        registration: Registration,
        events: mpsc::Sender<DiscoveryEvent>,
    ) -> Result<Box<dyn DiscoverySession>, DiscoveryError> {
        let inner = self.inner.register(identity, registration, events).await?;
        Ok(Box::new(CountingSession {
            inner,
            lookups: self.lookups.clone(),
        }))
    }
}

#[async_trait]
impl DiscoverySession for CountingSession {
    async fn keep_alive(&self) -> Result<(), DiscoveryError> {
        self.inner.keep_alive().await
    }
    async fn lookup(&self, username: &str) -> Result<Option<PeerRecord>, DiscoveryError> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
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
    async fn connect_back(&self, username: &str) -> Result<(), DiscoveryError> {
        self.inner.connect_back(username).await
    }
    async fn relay(&self, username: &str) -> Result<Connection, DiscoveryError> {
        self.inner.relay(username).await
    }
    async fn join_relay(&self, ticket: &RelayTicket) -> Result<Connection, DiscoveryError> {
        self.inner.join_relay(ticket).await
    }
}

struct Setup {
    directory: MemoryDiscovery,
    store: MemoryStore,
    lookups: Arc<AtomicUsize>,
}

impl Setup {
    fn new(directory: MemoryDiscovery) -> Self {
        Self {
            directory,
            store: MemoryStore::new(),
            lookups: Arc::new(AtomicUsize::new(0)),
        }
    }

    async fn node(&self, name: &str, identity: Identity) -> ChatNode {
        ChatNode::builder()
            .identity(identity)
            .username(name)
            .listen("127.0.0.1:0".parse().expect("an address"))
            .transport(TcpTransport::new())
            .discovery(Counting {
                inner: self.directory.clone(),
                lookups: self.lookups.clone(),
            })
            .offline_store(self.store.clone())
            .event_capacity(1 << 16)
            .keep_alive_interval(Duration::from_millis(100))
            .spawn()
            .await
            .expect("node starts")
    }
}

/// Dials `addr` and sends a `Hello` as `me` with `key`, then reads until the listener
/// closes or has answered with its own `Hello` and proof (then hangs up: the stranger cannot
/// prove the key). Returns whether the listener went as far as answering.
async fn stranger_hello(addr: SocketAddr, me: &str, peer: &str, key: PublicKey) -> bool {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (r, w) = stream.into_split();
    let mut reader = FramedRead::new(r, FrameCodec::<PeerFrame>::default());
    let mut writer = FramedWrite::new(w, FrameCodec::<PeerFrame>::default());
    let hello = Hello {
        username: me.into(),
        peer: peer.into(),
        public_key: key,
        nonce: rand::random(),
    };
    writer
        .send(PeerFrame::Hello(Box::new(hello)))
        .await
        .expect("send the hello");
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match reader.next().await {
                Some(Ok(PeerFrame::Auth { .. })) => return true,
                Some(Ok(PeerFrame::Hello(_))) => continue,
                _ => return false,
            }
        }
    })
    .await
    .expect("the listener answers or closes in time");
    drop(writer);
    // The listener gives up on the missing proof (or has closed already).
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(10), reader.next()).await {
    }
    answered
}

#[tokio::test]
async fn a_strangers_hello_pins_nothing_whatever_key_it_shows() {
    let setup = Setup::new(MemoryDiscovery::new());
    let carol = Identity::generate();
    let carol_node = setup.node("carol", carol.clone()).await;
    let bob = setup.node("bob", Identity::generate()).await;
    // A random key under carol's name: refused at once, after one lookup.
    let before = setup.lookups.load(Ordering::SeqCst);
    assert!(
        !stranger_hello(
            bob.local_addr(),
            "carol",
            "bob",
            Identity::generate().public_key()
        )
        .await
    );
    assert_eq!(
        setup.lookups.load(Ordering::SeqCst) - before,
        1,
        "one lookup"
    );
    assert_eq!(bob.pinned_key("carol"), None, "nothing pinned");
    // carol's real key, which anyone can read in the directory: the listener answers, the
    // stranger cannot prove the key, and still nothing is pinned.
    assert!(stranger_hello(bob.local_addr(), "carol", "bob", carol.public_key()).await);
    assert_eq!(
        bob.pinned_key("carol"),
        None,
        "nothing pinned before the proof"
    );
    // carol herself, proving her key: pinned now.
    let mut bob_events = bob.events();
    carol_node.send("bob", "it's me").await.unwrap();
    wait_for(&mut bob_events, |e| {
        matches!(e, Event::MessageReceived { .. })
    })
    .await;
    assert_eq!(bob.pinned_key("carol"), Some(carol.public_key()));
}

#[tokio::test]
async fn a_stranger_showing_a_pinned_peers_new_key_raises_no_key_change_and_holds_nothing() {
    // Names lapse quickly here, so carol can come back with a new key.
    let directory =
        MemoryDiscovery::with_timeouts(Duration::from_millis(300), Duration::from_millis(300));
    let setup = Setup::new(directory);
    let carol_old = setup.node("carol", Identity::generate()).await;
    let bob = setup.node("bob", Identity::generate()).await;
    let mut bob_events = bob.events();
    carol_old.send("bob", "hello").await.unwrap();
    wait_for(&mut bob_events, |e| {
        matches!(e, Event::MessageReceived { .. })
    })
    .await;
    let old_key = carol_old.public_key();
    assert_eq!(bob.pinned_key("carol"), Some(old_key));
    carol_old.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await; // the claim lapses
    let carol_new = Identity::generate();
    let carol = setup.node("carol", carol_new.clone()).await;
    // A stranger shows the directory's new key for carol, without proving it.
    assert!(stranger_hello(bob.local_addr(), "carol", "bob", carol_new.public_key()).await);
    // Then the real carol connects: the one key change reported is hers, after her proof.
    carol.send("bob", "new phone").await.unwrap();
    let changed = wait_for(&mut bob_events, |e| matches!(e, Event::KeyChanged { .. })).await;
    assert_eq!(
        changed,
        Event::KeyChanged {
            username: "carol".into(),
            old: old_key.fingerprint(),
            new: carol_new.public_key().fingerprint(),
        }
    );
    let earlier = super::util::buffered(&mut bob_events);
    assert!(
        !earlier
            .iter()
            .any(|e| matches!(e, Event::KeyChanged { .. })),
        "one key change only: {earlier:?}"
    );
    assert_eq!(
        bob.pinned_key("carol"),
        Some(old_key),
        "still the old pin until trusted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_strangers_costs_at_most_the_lookup_budget_and_a_known_peer_is_served() {
    const STRANGERS: usize = 200;
    let setup = Setup::new(MemoryDiscovery::new());
    let alice = setup.node("alice", Identity::generate()).await;
    let bob = setup.node("bob", Identity::generate()).await;
    let mut alice_events = alice.events();
    let mut bob_events = bob.events();
    // alice and bob know each other (pinned) before the flood.
    alice.send("bob", "before").await.unwrap();
    wait_for(&mut bob_events, |e| {
        matches!(e, Event::MessageReceived { .. })
    })
    .await;
    let before = setup.lookups.load(Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    let addr = bob.local_addr();
    let flood: Vec<_> = (0..STRANGERS)
        .map(|i| {
            tokio::spawn(async move {
                stranger_hello(
                    addr,
                    &format!("stranger{i}"),
                    "bob",
                    Identity::generate().public_key(),
                )
                .await
            })
        })
        .collect();
    // A known peer is served during the flood.
    let id = alice.send("bob", "during the flood").await.unwrap();
    match wait_for(&mut alice_events, |e| {
        matches!(e, Event::Delivered { id: got, .. } if *got == id)
            || matches!(e, Event::StoredOffline { .. } | Event::SendFailed { .. })
    })
    .await
    {
        Event::Delivered { .. } => {}
        other => panic!("alice was not served: {other:?}"),
    }
    for f in flood {
        assert!(!f.await.unwrap(), "no stranger got an answer");
    }
    let lookups = setup.lookups.load(Ordering::SeqCst) - before;
    let secs = started.elapsed().as_secs_f64();
    let budget = 2.0 * f64::from(MAX_STRANGER_LOOKUPS_PER_SECOND)
        + f64::from(MAX_STRANGER_LOOKUPS_PER_SECOND) * secs;
    println!(
        "strangers: {STRANGERS} hellos in {secs:.2} s cost {lookups} lookups (budget {budget:.0})"
    );
    assert!(
        (lookups as f64) <= budget + 3.0,
        "{lookups} lookups for {STRANGERS} strangers in {secs:.2} s"
    );
    assert!(lookups < STRANGERS, "the budget, not one lookup each");
}
