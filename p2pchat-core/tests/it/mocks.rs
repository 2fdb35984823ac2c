//! How the node reacts when a backend fails, with mocked backends.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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

use super::util::{buffered, outcome, receive_n, wait_for};

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
async fn a_failing_offline_store_is_retried_until_it_takes_the_message() {
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

    // The store refuses the first two attempts as unreachable, then takes the message.
    const FAILURES: usize = 2;
    let calls = Arc::new(AtomicUsize::new(0));
    let stored = Arc::new(Mutex::new(Vec::new()));
    let mut store = quiet_store();
    {
        let calls = calls.clone();
        let stored = stored.clone();
        store.expect_put().returning(move |message: StoredMessage| {
            if calls.fetch_add(1, Ordering::SeqCst) < FAILURES {
                Err(StoreError::Unavailable("connection refused".into()))
            } else {
                stored.lock().expect("lock").push(message.id);
                Ok(())
            }
        });
    }
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
    let mut retries = Vec::new();
    loop {
        match wait_for(&mut events, |e| {
            !matches!(
                e,
                Event::Sent { .. } | Event::PeerOnline { .. } | Event::PeerOffline { .. }
            )
        })
        .await
        {
            Event::Queued {
                id: got,
                to,
                retry: None,
            } => {
                assert_eq!((got, to.as_str()), (id, "bob"));
                assert!(retries.is_empty(), "queued once, before any retry");
            }
            Event::Queued {
                id: got,
                to,
                retry: Some(reason),
            } => {
                assert_eq!((got, to.as_str()), (id, "bob"));
                assert!(reason.contains("offline store failed"), "{reason}");
                retries.push(reason);
            }
            Event::StoredOffline { id: got, to } => {
                assert_eq!((got, to.as_str()), (id, "bob"));
                break;
            }
            other => panic!("expected the message to be retried, then stored: {other:?}"),
        }
    }
    assert_eq!(
        retries.len(),
        FAILURES,
        "each failed attempt is reported as a retry"
    );
    assert_eq!(calls.load(Ordering::SeqCst), FAILURES + 1);
    assert_eq!(
        *stored.lock().expect("lock"),
        vec![id],
        "stored once, not lost"
    );
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

/// A real directory whose lookups fail with an outage while `down` is set.
#[derive(Debug, Clone)]
struct Flaky {
    inner: MemoryDiscovery,
    down: Arc<AtomicBool>,
}

#[derive(Debug)]
struct FlakySession {
    inner: Box<dyn DiscoverySession>,
    down: Arc<AtomicBool>,
}

#[async_trait]
impl Discovery for Flaky {
    async fn register(
        &self,
        identity: &Identity,
        registration: Registration,
        events: mpsc::Sender<DiscoveryEvent>,
    ) -> Result<Box<dyn DiscoverySession>, DiscoveryError> {
        let inner = self.inner.register(identity, registration, events).await?;
        Ok(Box::new(FlakySession {
            inner,
            down: self.down.clone(),
        }))
    }
}

#[async_trait]
impl DiscoverySession for FlakySession {
    async fn keep_alive(&self) -> Result<(), DiscoveryError> {
        self.inner.keep_alive().await
    }
    async fn lookup(&self, username: &str) -> Result<Option<PeerRecord>, DiscoveryError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(DiscoveryError::Unreachable {
                addr: "127.0.0.1:5001".into(),
                reason: "connection refused".into(),
            });
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
}

#[tokio::test]
async fn a_directory_outage_queues_the_send_until_the_directory_answers() {
    let directory = MemoryDiscovery::new();
    let bob = ChatNode::builder()
        .username("bob")
        .listen("127.0.0.1:0".parse().expect("addr"))
        .transport(TcpTransport::new())
        .discovery(directory.clone())
        .offline_store(quiet_store())
        .spawn()
        .await
        .expect("bob");
    let mut bob_events = bob.events();
    let down = Arc::new(AtomicBool::new(true));
    let node = ChatNode::builder()
        .username("alice")
        .listen("127.0.0.1:0".parse().expect("addr"))
        .transport(TcpTransport::new())
        .discovery(Flaky {
            inner: directory,
            down: down.clone(),
        })
        .offline_store(quiet_store())
        .keep_alive_interval(Duration::from_secs(60))
        .spawn()
        .await
        .expect("starts");
    let mut events = node.events();
    // Alice has never seen bob and cannot look him up: the message waits.
    let id = node
        .send("bob", "hi")
        .await
        .expect("an unreachable directory queues the message");
    assert_eq!(
        wait_for(&mut events, |e| matches!(e, Event::Queued { .. })).await,
        Event::Queued {
            id,
            to: "bob".into(),
            retry: None
        }
    );
    let retry = wait_for(&mut events, |e| {
        matches!(e, Event::Queued { retry: Some(_), .. }) || outcome(e)
    })
    .await;
    assert!(
        matches!(&retry, Event::Queued { id: got, retry: Some(_), .. } if *got == id),
        "the failed attempt is retried, not ended: {retry:?}"
    );

    down.store(false, Ordering::SeqCst);
    let done = wait_for(&mut events, outcome).await;
    assert_eq!(
        done,
        Event::Delivered {
            id,
            to: "bob".into()
        }
    );
    assert_eq!(
        receive_n(&mut bob_events, 1).await,
        vec![("hi".to_owned(), false)]
    );
    node.shutdown().await.expect("shutdown");
    bob.shutdown().await.expect("shutdown");
    assert!(
        !buffered(&mut bob_events)
            .iter()
            .any(|e| matches!(e, Event::MessageReceived { .. })),
        "shown once"
    );
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
