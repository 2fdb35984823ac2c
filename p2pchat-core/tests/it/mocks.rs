//! How the node reacts when a backend fails, with mocked backends.

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use p2pchat_core::discovery::{
    Discovery, DiscoveryError, DiscoveryEvent, DiscoverySession, Page, Registration,
};
use p2pchat_core::node::NodeError;
use p2pchat_core::store::{ExpiredMessage, OfflineStore, StoreError, StoredMessage};
use p2pchat_core::{
    ChatNode, Event, Identity, MemoryDiscovery, MessageId, PeerRecord, TcpTransport,
};
use tokio::sync::mpsc;

use super::util::wait_for;

mockall::mock! {
    pub Store {}
    #[async_trait]
    impl OfflineStore for Store {
        async fn put(&self, message: StoredMessage) -> Result<(), StoreError>;
        async fn fetch(&self, recipient: &str, limit: usize) -> Result<Vec<StoredMessage>, StoreError>;
        async fn ack(&self, recipient: &str, ids: &[MessageId]) -> Result<(), StoreError>;
        async fn take_expired(&self, sender: &str) -> Result<Vec<ExpiredMessage>, StoreError>;
        async fn subscribe(&self, recipient: &str) -> Result<BoxStream<'static, ()>, StoreError>;
    }
}

impl std::fmt::Debug for MockStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MockStore")
    }
}

fn quiet_store() -> MockStore {
    let mut store = MockStore::new();
    store.expect_fetch().returning(|_, _| Ok(Vec::new()));
    store.expect_take_expired().returning(|_| Ok(Vec::new()));
    store
        .expect_subscribe()
        .returning(|_| Ok(Box::pin(futures::stream::pending())));
    store
}

#[tokio::test]
async fn a_failing_offline_store_turns_into_a_send_failed_event() {
    let directory = MemoryDiscovery::new();
    let bob = ChatNode::builder()
        .username("bob")
        .listen("127.0.0.1:0".parse().expect("addr"))
        .discovery(directory.clone())
        .offline_store(quiet_store())
        .spawn()
        .await
        .expect("bob");
    bob.shutdown().await.expect("bob leaves");

    let mut store = quiet_store();
    store
        .expect_put()
        .times(1)
        .returning(|_| Err(StoreError::Unavailable("connection refused".into())));
    let alice = ChatNode::builder()
        .username("alice")
        .listen("127.0.0.1:0".parse().expect("addr"))
        .transport(TcpTransport::new())
        .discovery(directory)
        .offline_store(store)
        .spawn()
        .await
        .expect("alice");
    let mut events = alice.events();
    let id = alice.send("bob", "hello?").await.expect("send is accepted");
    match wait_for(&mut events, |e| {
        matches!(e, Event::SendFailed { .. } | Event::StoredOffline { .. })
    })
    .await
    {
        Event::SendFailed {
            id: failed,
            to,
            reason,
        } => {
            assert_eq!((failed, to.as_str()), (id, "bob"));
            assert!(reason.contains("offline store failed"), "{reason}");
        }
        other => panic!("expected SendFailed, got {other:?}"),
    }
    alice.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_failing_mailbox_fetch_is_reported_and_the_node_keeps_running() {
    let mut store = MockStore::new();
    store
        .expect_fetch()
        .returning(|_, _| Err(StoreError::Unavailable("down".into())));
    store.expect_take_expired().returning(|_| Ok(Vec::new()));
    store
        .expect_subscribe()
        .returning(|_| Ok(Box::pin(futures::stream::pending())));
    let node = ChatNode::builder()
        .username("carol")
        .listen("127.0.0.1:0".parse().expect("addr"))
        .discovery(MemoryDiscovery::new())
        .offline_store(store)
        .spawn()
        .await
        .expect("starts despite the store");
    let mut events = node.events();
    let event = wait_for(&mut events, |e| matches!(e, Event::Error { .. })).await;
    assert!(
        matches!(event, Event::Error { message } if message.contains("could not fetch offline messages"))
    );
    assert!(node.peers().await.is_ok(), "the node still answers");
    node.shutdown().await.expect("shutdown");
}

mockall::mock! {
    pub Session {}
    #[async_trait]
    impl DiscoverySession for Session {
        async fn keep_alive(&self) -> Result<(), DiscoveryError>;
        async fn lookup(&self, username: &str) -> Result<Option<PeerRecord>, DiscoveryError>;
        async fn list_online(&self, after: Option<String>, limit: usize) -> Result<Page, DiscoveryError>;
        async fn watch(&self, username: &str) -> Result<(), DiscoveryError>;
        async fn deregister(&self) -> Result<(), DiscoveryError>;
    }
}

impl std::fmt::Debug for MockSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MockSession")
    }
}

/// A directory that registers everyone and answers every lookup with an outage.
#[derive(Debug)]
struct Unreachable;

#[async_trait]
impl Discovery for Unreachable {
    async fn register(
        &self,
        _identity: &Identity,
        _registration: Registration,
        _events: mpsc::Sender<DiscoveryEvent>,
    ) -> Result<Box<dyn DiscoverySession>, DiscoveryError> {
        let mut session = MockSession::new();
        session.expect_lookup().returning(|_| {
            Err(DiscoveryError::Unreachable {
                addr: "127.0.0.1:5001".into(),
                reason: "connection refused".into(),
            })
        });
        session.expect_keep_alive().returning(|| Ok(()));
        session.expect_deregister().returning(|| Ok(()));
        Ok(Box::new(session))
    }
}

#[tokio::test]
async fn a_directory_outage_fails_the_send_with_a_discovery_error() {
    let node = ChatNode::builder()
        .username("alice")
        .listen("127.0.0.1:0".parse().expect("addr"))
        .discovery(Unreachable)
        .offline_store(quiet_store())
        .keep_alive_interval(Duration::from_secs(60))
        .spawn()
        .await
        .expect("starts");
    let err = node
        .send("bob", "hi")
        .await
        .expect_err("cannot resolve bob");
    assert!(
        matches!(
            err,
            NodeError::Discovery(DiscoveryError::Unreachable { .. })
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("cannot reach the discovery server"),
        "{err}"
    );
    node.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_taken_name_is_refused_at_spawn() {
    let directory = MemoryDiscovery::new();
    let first = ChatNode::builder()
        .username("alice")
        .listen("127.0.0.1:0".parse().expect("addr"))
        .discovery(directory.clone())
        .offline_store(quiet_store())
        .spawn()
        .await
        .expect("first claim");
    let err = ChatNode::builder()
        .username("alice")
        .listen("127.0.0.1:0".parse().expect("addr"))
        .discovery(directory)
        .offline_store(quiet_store())
        .spawn()
        .await
        .expect_err("a second key cannot take the name");
    assert!(
        matches!(err, NodeError::Discovery(DiscoveryError::NameTaken { .. })),
        "{err}"
    );
    first.shutdown().await.expect("shutdown");
}
