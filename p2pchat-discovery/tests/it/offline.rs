//! Offline delivery through the server mailbox: the store suite on redb and on Redis, the
//! mailbox's own rules, and nodes that deliver, drain, expire and survive crashes and
//! restarts with no service but the discovery server.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use p2pchat_core::store::{ExpiredMessage, MailKey, OfflineStore, StoreError, StoredMessage};
use p2pchat_core::testing::{
    STORE_SUITE_USERS, SharedStore, StoreAccess, shaped_token, store_conformance,
};
use p2pchat_core::{
    ChatNode, DiscoveryClient, DiscoverySession, Event, Events, Identity, MessageId, TcpTransport,
};
use p2pchat_discovery::{RedbStorage, Storage};
use tokio::sync::Notify;

use super::util::*;

/// Each user acts through the mailbox of their own session on the server.
struct Mailboxes {
    _server: TestServer,
    sessions: HashMap<String, Box<dyn DiscoverySession>>,
    /// The server's data directory, removed when the run ends.
    _dir: Option<tempfile::TempDir>,
}

#[async_trait]
impl StoreAccess for Mailboxes {
    async fn store_for(&self, user: &str) -> Arc<dyn OfflineStore> {
        self.sessions[user]
            .mailbox()
            .expect("the server keeps mailboxes")
    }
}

async fn mailboxes(storage: Arc<dyn Storage>) -> Mailboxes {
    let server = TestServer::start(fast_config(), storage).await;
    let mut sessions = HashMap::new();
    // Registered up front: a deposit needs a claimed recipient.
    for user in STORE_SUITE_USERS {
        let (session, _rx) = register(&server.client(), &Identity::generate(), user).await;
        sessions.insert(user.to_owned(), session);
    }
    Mailboxes {
        _server: server,
        sessions,
        _dir: None,
    }
}

/// Access to a store, keeping its data directory until the run ends.
struct InDir<A> {
    access: A,
    _dir: tempfile::TempDir,
}

#[async_trait]
impl<A: StoreAccess> StoreAccess for InDir<A> {
    async fn store_for(&self, user: &str) -> Arc<dyn OfflineStore> {
        self.access.store_for(user).await
    }
}

#[tokio::test]
async fn the_server_mailbox_passes_the_store_suite_on_redb() {
    store_conformance(|quotas| async move {
        let dir = tempfile::tempdir().unwrap();
        let storage = RedbStorage::open_with_quotas(dir.path(), quotas).unwrap();
        let mut access = mailboxes(Arc::new(storage)).await;
        access._dir = Some(dir);
        access
    })
    .await;
}

#[tokio::test]
async fn the_server_mailbox_passes_the_store_suite_on_redis() {
    let redis = redis();
    let url = redis.url();
    store_conformance(|quotas| {
        let url = url.clone();
        async move {
            let prefix = format!("mbox{:08x}", rand::random::<u32>());
            let settings = p2pchat_discovery::storage::RedisStorageConfig {
                prefix,
                quotas,
                ..Default::default()
            };
            let storage = p2pchat_discovery::RedisStorage::connect_with(&url, settings)
                .await
                .unwrap();
            mailboxes(Arc::new(storage)).await
        }
    })
    .await;
}

#[tokio::test]
async fn the_redb_mailbox_itself_passes_the_store_suite() {
    store_conformance(|quotas| async move {
        let dir = tempfile::tempdir().unwrap();
        let storage = RedbStorage::open_with_quotas(dir.path(), quotas).unwrap();
        InDir {
            access: SharedStore(storage.mailbox()),
            _dir: dir,
        }
    })
    .await;
}

/// A message from `from` to `to` whose token (shaped like a Fernet token, as the server
/// checks) holds `text`.
fn message(from: &str, to: &str, text: &str) -> StoredMessage {
    StoredMessage {
        id: MessageId::random(),
        from: from.to_owned(),
        to: to.to_owned(),
        token: shaped_token(text.as_bytes()),
        expires_at: std::time::SystemTime::now() + Duration::from_secs(3600),
    }
}

#[tokio::test]
async fn a_mailbox_acts_for_its_own_user_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(fast_config(), redb(dir.path())).await;
    let (alice, _a) = register(&server.client(), &Identity::generate(), "alice").await;
    let (bob, _b) = register(&server.client(), &Identity::generate(), "bob").await;
    let (alice_box, bob_box) = (alice.mailbox().unwrap(), bob.mailbox().unwrap());
    alice_box.put(message("alice", "bob", "t1")).await.unwrap();
    assert!(matches!(
        alice_box.fetch("bob", 10).await,
        Err(StoreError::Forbidden(_))
    ));
    assert!(matches!(
        alice_box
            .ack(
                "bob",
                &[MailKey {
                    from: "alice".into(),
                    id: MessageId::random()
                }]
            )
            .await,
        Err(StoreError::Forbidden(_))
    ));
    assert!(matches!(
        alice_box.subscribe("bob").await,
        Err(StoreError::Forbidden(_))
    ));
    assert!(matches!(
        alice_box.put(message("bob", "alice", "forged")).await,
        Err(StoreError::Forbidden(_))
    ));
    // The server checks too: a deposit for a name nobody holds is refused.
    match alice_box.put(message("alice", "nobody", "t2")).await {
        Err(StoreError::Forbidden(why)) => assert!(why.contains("nobody"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(bob_box.fetch("bob", 10).await.unwrap().len(), 1);
    // A dropped session takes its mailbox handle with it.
    drop(alice);
    assert!(matches!(
        alice_box.fetch("alice", 10).await,
        Err(StoreError::Unavailable(_))
    ));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// Nodes

async fn node(name: &str, id: &Identity, dir: &Path, server: &TestServer) -> ChatNode {
    node_on(name, id, dir, server.client(), None).await
}

async fn node_on(
    name: &str,
    id: &Identity,
    dir: &Path,
    directory: DiscoveryClient,
    store: Option<Arc<dyn OfflineStore>>,
) -> ChatNode {
    let mut builder = ChatNode::builder()
        .identity(id.clone())
        .username(name)
        .listen("127.0.0.1:0".parse().unwrap())
        .transport(TcpTransport::new())
        .discovery(directory)
        .data_dir(dir)
        .keep_alive_interval(TTL / 4)
        .message_ttl(Duration::from_secs(3600));
    if let Some(store) = store {
        builder = builder.offline_store(store);
    }
    builder
        .spawn()
        .await
        .unwrap_or_else(|e| panic!("{name} starts: {e}"))
}

/// Waits for `n` messages; returns (text, offline) in arrival order.
async fn receive(events: &mut Events, n: usize) -> Vec<(String, bool)> {
    let mut got = Vec::new();
    while got.len() < n {
        if let Event::MessageReceived { text, offline, .. } =
            wait_event(events, |e| matches!(e, Event::MessageReceived { .. })).await
        {
            got.push((text, offline));
        }
    }
    got
}

/// Sends `texts` to `to` and expects each to be stored offline.
async fn send_stored(from: &ChatNode, to: &str, texts: &[String]) {
    let mut events = from.events();
    let mut ids = Vec::new();
    for t in texts {
        ids.push(from.send(to, t).await.unwrap());
    }
    for id in ids {
        let outcome = wait_outcome(&mut events, id).await;
        assert!(
            matches!(outcome, Event::StoredOffline { .. }),
            "expected stored offline, got {outcome:?}"
        );
    }
}

#[tokio::test]
async fn offline_messages_wait_in_the_server_mailbox_and_arrive_in_order_marked_offline() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(fast_config(), redb(&dir.path().join("server"))).await;
    let (alice_id, bob_id) = (Identity::generate(), Identity::generate());
    let alice = node("alice", &alice_id, &dir.path().join("alice"), &server).await;
    let bob = node("bob", &bob_id, &dir.path().join("bob"), &server).await;
    alice.send("bob", "hello while you are here").await.unwrap();
    let mut bob_events = bob.events();
    receive(&mut bob_events, 1).await;
    bob.shutdown().await.unwrap();

    let texts: Vec<String> = (0..50).map(|i| format!("offline {i}")).collect();
    send_stored(&alice, "bob", &texts).await;

    let bob = node("bob", &bob_id, &dir.path().join("bob"), &server).await;
    let mut bob_events = bob.events();
    let got = receive(&mut bob_events, texts.len()).await;
    let expected: Vec<(String, bool)> = texts.iter().map(|t| (t.clone(), true)).collect();
    assert_eq!(
        got, expected,
        "every message once, in order, marked offline"
    );
    alice.shutdown().await.unwrap();
    bob.shutdown().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn mail_stored_while_the_recipient_is_online_but_unreachable_is_drained_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // Neither side can be dialed and the server relays nothing: the mailbox is the only way.
    let config = p2pchat_discovery::Config {
        max_relays: 0,
        ..fast_config()
    };
    let server = TestServer::start(config, redb(&dir.path().join("server"))).await;
    let alice = ChatNode::builder()
        .username("alice")
        .listen("127.0.0.1:0".parse().unwrap())
        .dialable(false)
        .discovery(server.client())
        .data_dir(dir.path().join("alice"))
        .keep_alive_interval(TTL / 4)
        .spawn()
        .await
        .unwrap();
    // bob announces an address nobody listens on: alice cannot dial him.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let bob = ChatNode::builder()
        .username("bob")
        .listen("127.0.0.1:0".parse().unwrap())
        .announce(vec![dead_addr])
        .discovery(server.client())
        .data_dir(dir.path().join("bob"))
        .keep_alive_interval(TTL / 4)
        .spawn()
        .await
        .unwrap();
    let mut bob_events = bob.events();
    send_stored(&alice, "bob", &["can you hear me?".to_owned()]).await;
    // No restart: the server's new-mail push makes bob drain now.
    assert_eq!(
        receive(&mut bob_events, 1).await,
        vec![("can you hear me?".to_owned(), true)]
    );
    alice.shutdown().await.unwrap();
    bob.shutdown().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn the_server_keeps_every_mailbox_across_a_restart_on_redb() {
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    let server = TestServer::start(fast_config(), redb(&server_dir)).await;
    let addr = server.addr;
    let (alice_id, bob_id) = (Identity::generate(), Identity::generate());
    let alice = node("alice", &alice_id, &dir.path().join("alice"), &server).await;
    let bob = node("bob", &bob_id, &dir.path().join("bob"), &server).await;
    bob.shutdown().await.unwrap();
    let texts: Vec<String> = (0..20).map(|i| format!("kept {i}")).collect();
    send_stored(&alice, "bob", &texts).await;
    alice.shutdown().await.unwrap();
    server.stop().await;

    let server = TestServer::start_at(addr, fast_config(), redb(&server_dir)).await;
    let bob = node("bob", &bob_id, &dir.path().join("bob"), &server).await;
    let mut bob_events = bob.events();
    let got: Vec<String> = receive(&mut bob_events, texts.len())
        .await
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(got, texts);
    bob.shutdown().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_message_that_expires_undelivered_is_reported_to_its_sender() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(fast_config(), redb(&dir.path().join("server"))).await;
    let bob_id = Identity::generate();
    let bob = node("bob", &bob_id, &dir.path().join("bob"), &server).await;
    bob.shutdown().await.unwrap();
    let alice = ChatNode::builder()
        .username("alice")
        .listen("127.0.0.1:0".parse().unwrap())
        .discovery(server.client())
        .keep_alive_interval(TTL / 4)
        .message_ttl(Duration::from_millis(300))
        .spawn()
        .await
        .unwrap();
    let mut events = alice.events();
    let id = alice.send("bob", "too late").await.unwrap();
    wait_event(&mut events, |e| matches!(e, Event::StoredOffline { .. })).await;
    assert_eq!(
        wait_event(&mut events, |e| matches!(e, Event::Expired { .. })).await,
        Event::Expired {
            id,
            to: "bob".into()
        }
    );
    // And bob never sees it.
    let bob = node("bob", &bob_id, &dir.path().join("bob"), &server).await;
    let mut bob_events = bob.events();
    bob.send("alice", "marker").await.unwrap();
    receive(&mut events, 1).await;
    assert!(
        !super::util::buffered_texts(&mut bob_events).contains(&"too late".to_owned()),
        "an expired message is never shown"
    );
    alice.shutdown().await.unwrap();
    bob.shutdown().await.unwrap();
    server.stop().await;
}

/// Passes everything through, except that the first `ack` tells the test and never returns:
/// the node is then killed between fetching and acknowledging.
#[derive(Debug)]
struct StallFirstAck {
    inner: Arc<dyn OfflineStore>,
    stalled: Arc<Notify>,
    once: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl OfflineStore for StallFirstAck {
    async fn put(&self, m: StoredMessage) -> Result<(), StoreError> {
        self.inner.put(m).await
    }
    async fn fetch(&self, r: &str, n: usize) -> Result<Vec<StoredMessage>, StoreError> {
        self.inner.fetch(r, n).await
    }
    async fn ack(&self, r: &str, acked: &[MailKey]) -> Result<(), StoreError> {
        if !self.once.swap(true, std::sync::atomic::Ordering::SeqCst) {
            self.stalled.notify_one();
            std::future::pending::<()>().await;
        }
        self.inner.ack(r, acked).await
    }
    async fn take_expired(&self, s: &str) -> Result<Vec<ExpiredMessage>, StoreError> {
        self.inner.take_expired(s).await
    }
    async fn subscribe(&self, r: &str) -> Result<BoxStream<'static, ()>, StoreError> {
        self.inner.subscribe(r).await
    }
}

/// The recipient dies after fetching, before acknowledging: the mail is fetched again after
/// the restart and shown once in all.
async fn killed_between_fetch_and_ack(mailbox: Arc<dyn OfflineStore>, server: &TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let (alice_id, bob_id) = (Identity::generate(), Identity::generate());
    let bob_dir = dir.path().join("bob");
    let bob = node_on(
        "bob",
        &bob_id,
        &bob_dir,
        server.client(),
        Some(mailbox.clone()),
    )
    .await;
    bob.shutdown().await.unwrap();
    let alice = node_on(
        "alice",
        &alice_id,
        &dir.path().join("alice"),
        server.client(),
        Some(mailbox.clone()),
    )
    .await;
    let texts: Vec<String> = (0..10).map(|i| format!("at least once {i}")).collect();
    send_stored(&alice, "bob", &texts).await;

    let stalled = Arc::new(Notify::new());
    let store = StallFirstAck {
        inner: mailbox.clone(),
        stalled: stalled.clone(),
        once: Default::default(),
    };
    let bob = node_on(
        "bob",
        &bob_id,
        &bob_dir,
        server.client(),
        Some(Arc::new(store)),
    )
    .await;
    let mut first_life = bob.events();
    tokio::time::timeout(WAIT, stalled.notified())
        .await
        .expect("bob fetched and tried to acknowledge");
    bob.simulate_crash().await;
    let mut shown: Vec<String> = super::util::buffered_texts(&mut first_life);
    assert_eq!(
        mailbox.fetch("bob", 100).await.unwrap().len(),
        texts.len(),
        "nothing was acknowledged"
    );

    let bob = node_on(
        "bob",
        &bob_id,
        &bob_dir,
        server.client(),
        Some(mailbox.clone()),
    )
    .await;
    let mut second_life = bob.events();
    tokio::time::timeout(WAIT, async {
        while !mailbox.fetch("bob", 100).await.unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the second life acknowledges the mail");
    shown.extend(super::util::buffered_texts(&mut second_life));
    assert_eq!(
        shown, texts,
        "each message shown exactly once over both lives"
    );
    alice.shutdown().await.unwrap();
    bob.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_recipient_killed_between_fetch_and_ack_gets_the_mail_again_and_shows_it_once_on_redb() {
    let dir = tempfile::tempdir().unwrap();
    let storage = redb(dir.path());
    let mailbox = storage.mailbox();
    let server = TestServer::start(fast_config(), storage).await;
    killed_between_fetch_and_ack(mailbox, &server).await;
    server.stop().await;
}

#[tokio::test]
async fn a_recipient_killed_between_fetch_and_ack_gets_the_mail_again_and_shows_it_once_on_redis() {
    let redis = redis();
    let storage = redis_storage(&redis.url()).await;
    let mailbox = storage.mailbox();
    let server = TestServer::start(fast_config(), storage).await;
    killed_between_fetch_and_ack(mailbox, &server).await;
    server.stop().await;
}

#[tokio::test]
async fn big_mail_comes_in_replies_that_fit_a_frame_and_oversized_tokens_are_refused() {
    use p2pchat_core::protocol::MAX_TOKEN_LEN;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(fast_config(), redb(dir.path())).await;
    let (alice, _a) = register(&server.client(), &Identity::generate(), "alice").await;
    let (bob, _b) = register(&server.client(), &Identity::generate(), "bob").await;
    let (alice_box, bob_box) = (alice.mailbox().unwrap(), bob.mailbox().unwrap());
    // Five messages of (within a block of) the largest size: together far more than one
    // frame holds. A token of k AES blocks is 57 + 16k bytes before base64.
    let blocks = (MAX_TOKEN_LEN / 4 * 3 - 57) / 16;
    let big = shaped_token(&vec![b't'; blocks * 16 - 1]);
    assert!(big.len() <= MAX_TOKEN_LEN && big.len() > MAX_TOKEN_LEN - 32);
    for _ in 0..5 {
        let mut m = message("alice", "bob", "");
        m.token = big.clone();
        alice_box.put(m).await.unwrap();
    }
    let mut too_big = message("alice", "bob", "");
    too_big.token = "t".repeat(MAX_TOKEN_LEN + 1);
    match alice_box.put(too_big).await {
        Err(StoreError::Unavailable(why)) => assert!(why.to_string().contains("at most"), "{why}"),
        other => panic!("an oversized token must be refused, got {other:?}"),
    }
    let mut drained = 0;
    for _ in 0..10 {
        let batch = bob_box.fetch("bob", 256).await.expect("a reply that fits");
        if batch.is_empty() {
            break;
        }
        assert!(batch.len() < 5, "one reply cannot hold all five");
        drained += batch.len();
        let acked: Vec<MailKey> = batch.iter().map(MailKey::of).collect();
        bob_box.ack("bob", &acked).await.unwrap();
    }
    assert_eq!(drained, 5);
    bob.keep_alive().await.expect("the session survived");
    server.stop().await;
}
