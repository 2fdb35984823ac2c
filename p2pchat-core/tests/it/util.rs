//! Shared helpers: node factories and event waiting.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use p2pchat_core::crypto::PairKey;
use p2pchat_core::testing::RawPeer;
use p2pchat_core::{
    ChatNode, Event, Events, Identity, MemoryDiscovery, MemoryNetwork, MemoryStore, TcpTransport,
    Transport,
};

/// The longest any test waits for one event.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A directory and an offline store shared by the nodes of one test.
#[derive(Clone, Default)]
pub struct World {
    pub directory: MemoryDiscovery,
    pub store: MemoryStore,
    pub network: MemoryNetwork,
}

impl World {
    pub fn new() -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        Self::default()
    }

    /// A node over TCP on 127.0.0.1.
    pub async fn tcp_node(&self, name: &str) -> ChatNode {
        self.node_with(
            name,
            Identity::generate(),
            None,
            p2pchat_core::TcpTransport::new(),
        )
        .await
    }

    /// A node over TCP with a given identity and data directory.
    pub async fn node_with(
        &self,
        name: &str,
        identity: Identity,
        data_dir: Option<&Path>,
        transport: impl Transport,
    ) -> ChatNode {
        self.builder(name, identity, data_dir, transport)
            .spawn()
            .await
            .expect("node starts")
    }

    pub fn builder(
        &self,
        name: &str,
        identity: Identity,
        data_dir: Option<&Path>,
        transport: impl Transport,
    ) -> p2pchat_core::ChatNodeBuilder {
        let mut b = ChatNode::builder()
            .identity(identity)
            .username(name)
            .listen("127.0.0.1:0".parse().expect("address"))
            .transport(transport)
            .discovery(self.directory.clone())
            .offline_store(self.store.clone())
            .event_capacity(1 << 16);
        if let Some(dir) = data_dir {
            b = b.data_dir(dir);
        }
        b
    }

    /// A node on the in-memory network.
    pub async fn memory_node(&self, name: &str) -> ChatNode {
        self.node_with(name, Identity::generate(), None, self.network.clone())
            .await
    }
}

/// Waits for the first event matching `pred`, failing the test after [`EVENT_TIMEOUT`].
pub async fn wait_for(events: &mut Events, mut pred: impl FnMut(&Event) -> bool) -> Event {
    tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            let event = events.next().await.expect("event stream open");
            assert!(!matches!(event, Event::Lagged { .. }), "events lagged");
            if pred(&event) {
                return event;
            }
        }
    })
    .await
    .expect("expected event did not arrive in time")
}

/// Whether `event` says how a send went rather than a step on the way: not
/// [`Event::Queued`] (first queued or waiting for a retry), not [`Event::Sent`] (written to a
/// connection), not presence or the directory connection. For `wait_for(&mut events, outcome)` right after a `send`.
pub fn outcome(event: &Event) -> bool {
    !matches!(
        event,
        Event::Queued { .. }
            | Event::Sent { .. }
            | Event::PeerOnline { .. }
            | Event::PeerOffline { .. }
            | Event::Reachability { .. }
            | Event::DirectoryLost { .. }
            | Event::DirectoryBack
    )
}

/// Collects received message texts from `from` until `n` have arrived.
pub async fn receive_n(events: &mut Events, n: usize) -> Vec<(String, bool)> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        if let Event::MessageReceived { text, offline, .. } =
            wait_for(events, |e| matches!(e, Event::MessageReceived { .. })).await
        {
            got.push((text, offline));
        }
    }
    got
}

/// Every event already buffered in `events`, without waiting. (Unconstrained: tokio's
/// cooperative budget would otherwise report "pending" after 128 ready events.)
pub fn buffered(events: &mut Events) -> Vec<Event> {
    use futures::FutureExt;
    let mut out = Vec::new();
    while let Some(Some(event)) = tokio::task::unconstrained(events.next()).now_or_never() {
        out.push(event);
    }
    out
}

/// Alice's node registers her key; the test then speaks as Alice by hand.
pub async fn bob_and_raw_alice(world: &World) -> (ChatNode, RawPeer, PairKey) {
    let alice_id = Identity::generate();
    let alice = world
        .node_with("alice", alice_id.clone(), None, TcpTransport::new())
        .await;
    let bob = world.tcp_node("bob").await;
    let raw = RawPeer::connect(
        &TcpTransport::new(),
        bob.local_addr(),
        &alice_id,
        "alice",
        "bob",
        &bob.public_key(),
    )
    .await
    .expect("handshake as alice");
    alice
        .shutdown()
        .await
        .expect("the real alice node is not needed");
    let pair = PairKey::derive(&alice_id, &bob.public_key()).expect("derive");
    (bob, raw, pair)
}
