//! How the node reacts when a backend fails, with mocked backends.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use p2pchat_core::discovery::{
    Discovery, DiscoveryError, DiscoveryEvent, DiscoverySession, Page, Registration,
};
use p2pchat_core::node::SpawnError;
use p2pchat_core::store::{ExpiredMessage, MailKey, OfflineStore, StoreError, StoredMessage};
use p2pchat_core::{
    ChatNode, Event, Identity, MemoryDiscovery, MemoryStore, PeerRecord, TcpTransport,
};
use tokio::sync::mpsc;

use super::util::{buffered, outcome, receive_n, wait_for};

mockall::mock! {
    pub Store {}
    #[async_trait]
    impl OfflineStore for Store {
        async fn put(&self, message: StoredMessage) -> Result<(), StoreError>;
        async fn fetch(&self, recipient: &str, limit: usize) -> Result<Vec<StoredMessage>, StoreError>;
        async fn ack(&self, recipient: &str, acked: &[MailKey]) -> Result<(), StoreError>;
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
                Event::Sent { .. }
                    | Event::PeerOnline { .. }
                    | Event::PeerOffline { .. }
                    | Event::Reachability { .. }
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

/// A real store whose first `failures` fetches fail as an outage would.
#[derive(Debug)]
struct FailsFirstFetches {
    inner: MemoryStore,
    failures: AtomicUsize,
}

#[async_trait]
impl OfflineStore for FailsFirstFetches {
    async fn put(&self, message: StoredMessage) -> Result<(), StoreError> {
        self.inner.put(message).await
    }
    async fn fetch(&self, recipient: &str, limit: usize) -> Result<Vec<StoredMessage>, StoreError> {
        let left = self.failures.load(Ordering::SeqCst);
        if left > 0 {
            self.failures.store(left - 1, Ordering::SeqCst);
            return Err(StoreError::unavailable("connection refused"));
        }
        self.inner.fetch(recipient, limit).await
    }
    async fn ack(&self, recipient: &str, acked: &[MailKey]) -> Result<(), StoreError> {
        self.inner.ack(recipient, acked).await
    }
    async fn take_expired(&self, sender: &str) -> Result<Vec<ExpiredMessage>, StoreError> {
        self.inner.take_expired(sender).await
    }
    async fn subscribe(&self, recipient: &str) -> Result<BoxStream<'static, ()>, StoreError> {
        self.inner.subscribe(recipient).await
    }
}

#[tokio::test]
async fn a_mailbox_drain_that_failed_is_tried_again_without_waiting_for_new_mail() {
    const FAILURES: usize = 3;
    let directory = MemoryDiscovery::new();
    let store = MemoryStore::new();
    let node = |name: &str| {
        ChatNode::builder()
            .username(name)
            .listen("127.0.0.1:0".parse().expect("addr"))
            .discovery(directory.clone())
    };
    let bob_id = Identity::generate();
    let bob = node("bob")
        .identity(bob_id.clone())
        .offline_store(store.clone())
        .spawn()
        .await
        .expect("bob");
    bob.shutdown().await.expect("bob leaves");
    let alice = node("alice")
        .offline_store(store.clone())
        .spawn()
        .await
        .expect("alice");
    let mut alice_events = alice.events();
    let id = alice.send("bob", "waiting for you").await.expect("send");
    let stored = wait_for(&mut alice_events, outcome).await;
    assert!(
        matches!(&stored, Event::StoredOffline { id: got, .. } if *got == id),
        "{stored:?}"
    );

    // bob's first drains fail; no new mail comes to wake him, and the message waits anyway.
    let bob = node("bob")
        .identity(bob_id)
        .offline_store(FailsFirstFetches {
            inner: store,
            failures: AtomicUsize::new(FAILURES),
        })
        .spawn()
        .await
        .expect("bob again");
    let mut events = bob.events();
    let mut errors = 0;
    let shown = wait_for(&mut events, |e| {
        if let Event::Error { message } = e {
            assert!(
                message.contains("could not fetch offline messages"),
                "{message}"
            );
            errors += 1;
        }
        matches!(e, Event::MessageReceived { .. })
    })
    .await;
    assert!(
        matches!(&shown, Event::MessageReceived { id: got, text, offline: true, .. }
            if *got == id && text == "waiting for you"),
        "{shown:?}"
    );
    assert_eq!(errors, 1, "one failure streak, one event");
    alice.shutdown().await.expect("shutdown");
    bob.shutdown().await.expect("shutdown");
}

/// A real directory whose lookups fail with an outage while `down` is set. It keeps the
/// node's event channel, to say when the session is back.
#[derive(Debug, Clone)]
struct Flaky {
    inner: MemoryDiscovery,
    down: Arc<AtomicBool>,
    events: Arc<Mutex<Option<mpsc::Sender<DiscoveryEvent>>>>,
}

impl Flaky {
    fn new(inner: MemoryDiscovery) -> Self {
        Self {
            inner,
            down: Arc::new(AtomicBool::new(true)),
            events: Arc::default(),
        }
    }

    /// The outage ends, and the session says so, as `DiscoveryClient` does on reconnecting.
    async fn come_back(&self) {
        self.down.store(false, Ordering::SeqCst);
        let events = self.events.lock().expect("lock").clone();
        if let Some(events) = events {
            events
                .send(DiscoveryEvent::Reconnected)
                .await
                .expect("the node listens");
        }
    }
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
        *self.events.lock().expect("lock") = Some(events.clone());
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
                source: "connection refused".into(),
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
    let flaky = Flaky::new(directory);
    let down = flaky.down.clone();
    let node = ChatNode::builder()
        .username("alice")
        .listen("127.0.0.1:0".parse().expect("addr"))
        .transport(TcpTransport::new())
        .discovery(flaky)
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

/// After a long outage the outbox waits seconds between attempts; the directory coming back
/// (the session's `Reconnected`) sends what waits at once rather than at the end of that.
#[tokio::test]
async fn a_directory_that_comes_back_sends_what_waits_at_once_not_after_the_backoff() {
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
    let flaky = Flaky::new(directory);
    let node = ChatNode::builder()
        .username("alice")
        .listen("127.0.0.1:0".parse().expect("addr"))
        .transport(TcpTransport::new())
        .discovery(flaky.clone())
        .offline_store(quiet_store())
        .keep_alive_interval(Duration::from_secs(60))
        .spawn()
        .await
        .expect("starts");
    let mut events = node.events();
    let id = node.send("bob", "hi").await.expect("queued");
    // Five failed rounds: the backoff doubles from 200 ms, so the next round is at least
    // 3.2 s away (jitter only adds).
    for _ in 0..5 {
        let retry = wait_for(&mut events, |e| {
            matches!(e, Event::Queued { retry: Some(_), .. }) || outcome(e)
        })
        .await;
        assert!(
            matches!(retry, Event::Queued { retry: Some(_), .. }),
            "{retry:?}"
        );
    }
    let back = tokio::time::Instant::now();
    flaky.come_back().await;
    let done = wait_for(&mut events, outcome).await;
    let waited = back.elapsed();
    assert_eq!(
        done,
        Event::Delivered {
            id,
            to: "bob".into()
        }
    );
    assert!(
        waited < Duration::from_secs(2),
        "delivered {waited:?} after the directory came back: it waited out the backoff"
    );
    node.shutdown().await.expect("shutdown");
    bob.shutdown().await.expect("shutdown");
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
        matches!(err, SpawnError::Discovery(DiscoveryError::NameTaken { .. })),
        "{err}"
    );
    first.shutdown().await.expect("shutdown");
}

/// Messages a run could neither deliver nor store wait in the outbox; the next run reports
/// each (`Queued`) and sends them before anything sent after it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_left_queued_are_reported_and_sent_first_by_the_next_run() {
    const LEFT: usize = 5;
    let directory = MemoryDiscovery::new();
    let (alice_id, bob_id) = (Identity::generate(), Identity::generate());
    let bob = |store: MockStore| {
        ChatNode::builder()
            .identity(bob_id.clone())
            .username("bob")
            .listen("127.0.0.1:0".parse().expect("addr"))
            .transport(TcpTransport::new())
            .discovery(directory.clone())
            .offline_store(store)
            .spawn()
    };
    bob(quiet_store())
        .await
        .expect("bob")
        .shutdown()
        .await
        .expect("bob leaves");
    let dir = tempfile::tempdir().expect("tempdir");
    let alice = |store: MockStore| {
        ChatNode::builder()
            .identity(alice_id.clone())
            .username("alice")
            .listen("127.0.0.1:0".parse().expect("addr"))
            .transport(TcpTransport::new())
            .discovery(directory.clone())
            .offline_store(store)
            .data_dir(dir.path())
            .spawn()
    };
    // First run: bob is away and the store refuses everything.
    let mut failing = quiet_store();
    failing
        .expect_put()
        .returning(|_| Err(StoreError::Unavailable("connection refused".into())));
    let first = alice(failing).await.expect("alice");
    let mut events = first.events();
    let mut left = Vec::new();
    for i in 0..LEFT {
        left.push(
            first
                .send("bob", &format!("left {i}"))
                .await
                .expect("queued"),
        );
    }
    wait_for(&mut events, |e| {
        matches!(e, Event::Queued { retry: Some(_), .. })
    })
    .await;
    first.shutdown().await.expect("alice leaves");
    assert!(
        !buffered(&mut events)
            .iter()
            .any(|e| matches!(e, Event::Delivered { .. } | Event::StoredOffline { .. })),
        "nothing left the outbox"
    );

    // Next run, bob back: the restored messages are reported at once, and go before a
    // message sent right after the start.
    let bob = bob(quiet_store()).await.expect("bob returns");
    let mut bob_events = bob.events();
    let second = alice(quiet_store()).await.expect("alice returns");
    let mut events = second.events();
    let later = second.send("bob", "after the restart").await.expect("send");
    let mut queued = Vec::new();
    while queued.len() < LEFT + 1 {
        if let Event::Queued {
            id, retry: None, ..
        } = wait_for(&mut events, |e| {
            matches!(e, Event::Queued { retry: None, .. })
        })
        .await
        {
            queued.push(id);
        }
    }
    let mut expected = left.clone();
    expected.push(later);
    assert_eq!(
        queued, expected,
        "each restored message reported, before the new one"
    );
    let texts: Vec<String> = receive_n(&mut bob_events, LEFT + 1)
        .await
        .into_iter()
        .map(|(text, _)| text)
        .collect();
    let mut in_order: Vec<String> = (0..LEFT).map(|i| format!("left {i}")).collect();
    in_order.push("after the restart".into());
    assert_eq!(texts, in_order, "nothing overtakes what waited");
    second.shutdown().await.expect("shutdown");
    bob.shutdown().await.expect("shutdown");
}
