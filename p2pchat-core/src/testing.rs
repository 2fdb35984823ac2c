//! Test support (feature `test-utils`): one conformance suite per backend trait, run against
//! every implementation, and tools for protocol-level tests.
//!
//! A new backend passes the same suite as the in-memory one:
//!
//! ```no_run
//! use p2pchat_core::MemoryStore;
//! use p2pchat_core::testing::{SharedStore, store_conformance};
//!
//! # async fn demo() {
//! // In a `#[tokio::test]`, with your store in place of `MemoryStore`:
//! store_conformance(|quotas| async move { SharedStore::new(MemoryStore::with_quotas(quotas)) })
//!     .await;
//! # }
//! ```
//!
//! The suites panic (with a message naming the broken rule) on the first violation.
//!
//! [`fuzz`] holds the checks the `cargo fuzz` targets in `fuzz/` run, which the regression
//! tests replay on the inputs kept in `fuzz/regressions/`.

use parking_lot::Mutex;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::discovery::{Discovery, DiscoveryError, DiscoveryEvent, MAX_PAGE_SIZE, Registration};
use crate::error::Cause;
use crate::identity::{Identity, PublicKey};
use crate::node::handshake::{self, FrameReader, FrameWriter};
use crate::protocol::{MessageId, PeerFrame, ProtocolError};
use crate::store::{MailKey, OfflineStore, Put, Quota, Quotas, StoreError, StoredMessage};
use crate::transport::{Connection, Listener, Transport, TransportError};

pub mod doc_limits;
pub mod fernet;
pub mod fuzz;
pub mod layers;
mod redis;
pub use redis::{RedisServer, TestRedis};

/// How long any single expected event may take in the suites before it counts as missing.
pub const SUITE_EVENT_TIMEOUT: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(SUITE_EVENT_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

// ---------------------------------------------------------------------------------------
// Transport

/// Checks what every connection between two peers must do, whatever carries it (a
/// transport, or the directory's relay): bytes flow both ways in order; a megabyte each way
/// at once arrives intact without deadlock; dropping one end is end-of-stream at the other.
/// `open` gives a fresh pair of connected ends each call (dialing end first).
pub async fn connection_conformance<F, Fut>(mut open: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = (Connection, Connection)>,
{
    let (mut a, mut b) = within("a connection", open()).await;
    a.writer.write_all(b"ping").await.expect("write");
    a.writer.flush().await.expect("flush");
    let mut buf = [0u8; 4];
    within("bytes from the dialer", b.reader.read_exact(&mut buf))
        .await
        .expect("read");
    assert_eq!(&buf, b"ping");
    b.writer.write_all(b"pong").await.expect("write");
    b.writer.flush().await.expect("flush");
    within("bytes from the listener", a.reader.read_exact(&mut buf))
        .await
        .expect("read");
    assert_eq!(&buf, b"pong");

    // A megabyte each way at once, without deadlock, intact.
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let send = |mut w: crate::transport::WriteHalf, data: Vec<u8>| async move {
        w.write_all(&data).await.expect("write");
        w.flush().await.expect("flush");
        w
    };
    let recv = |mut r: crate::transport::ReadHalf, len: usize| async move {
        let mut got = vec![0u8; len];
        r.read_exact(&mut got).await.expect("read");
        got
    };
    let (wa, wb, got_b, got_a) = within(
        "a bulk transfer",
        futures::future::join4(
            send(a.writer, data.clone()),
            send(b.writer, data.clone()),
            recv(b.reader, data.len()),
            recv(a.reader, data.len()),
        ),
    )
    .await;
    assert!(got_a == data && got_b == data, "bulk data arrives intact");
    drop(wa);
    drop(wb);

    // End of stream when the other end goes away.
    let (a, mut b) = within("a second connection", open()).await;
    drop(a);
    let mut rest = Vec::new();
    within("end of stream", b.reader.read_to_end(&mut rest))
        .await
        .expect("clean end of stream");
    assert!(rest.is_empty());
}

/// Checks the [`Transport`] contract: `make` returns a fresh transport (or a handle on a
/// fresh network) each call.
pub async fn transport_conformance<T, F, Fut>(make: F)
where
    T: Transport,
    F: Fn() -> Fut,
    Fut: Future<Output = T>,
{
    let any: SocketAddr = "127.0.0.1:0".parse().expect("valid address");

    let transport = Arc::new(make().await);
    let listener = transport.bind(any).await.expect("bind to port 0");
    let addr = listener.local_addr();
    assert_ne!(addr.port(), 0, "local_addr reports the chosen port");
    let listener = Arc::new(tokio::sync::Mutex::new(listener));
    connection_conformance(|| {
        let (transport, listener) = (transport.clone(), listener.clone());
        async move {
            let mut listener = listener.lock().await;
            let (dialed, accepted) = tokio::join!(transport.dial(addr), listener.accept());
            (dialed.expect("dial"), accepted.expect("accept"))
        }
    })
    .await;

    // A bound address cannot be bound again.
    match transport.bind(addr).await {
        Err(TransportError::AddrInUse { .. }) => {}
        other => panic!("binding a taken address must fail with AddrInUse, got {other:?}"),
    }

    // After the listener is dropped, dials are refused.
    drop(listener);
    match transport.dial(addr).await {
        Err(TransportError::ConnectionRefused { .. }) => {}
        other => panic!("dialing a closed listener must be refused, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Discovery

fn registration(name: &str, port: u16) -> Registration {
    Registration {
        username: name.to_owned(),
        listen_port: port,
        announce: Vec::new(),
        dialable: true,
    }
}

/// Waits (at most `timeout`) for watchers to be told `username` went online or offline.
async fn expect_presence(
    rx: &mut mpsc::Receiver<DiscoveryEvent>,
    username: &str,
    online: bool,
    timeout: Duration,
) {
    let wanted = if online {
        DiscoveryEvent::PeerOnline {
            username: username.to_owned(),
        }
    } else {
        DiscoveryEvent::PeerOffline {
            username: username.to_owned(),
        }
    };
    let found = tokio::time::timeout(timeout, async {
        while let Some(event) = rx.recv().await {
            if event == wanted {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(found, Ok(true)),
        "expected presence event {wanted:?}"
    );
}

/// Checks the [`Discovery`] contract. `make` returns a fresh, empty directory whose
/// presence TTL is `presence_ttl` (keep it short, a second or two: the suite waits for a
/// registration to expire).
pub async fn discovery_conformance<D, F, Fut>(make: F, presence_ttl: Duration)
where
    D: Discovery,
    F: Fn() -> Fut,
    Fut: Future<Output = D>,
{
    let dir = make().await;
    let (alice, bob, mallory) = (
        Identity::generate(),
        Identity::generate(),
        Identity::generate(),
    );
    let (tx, _rx) = mpsc::channel(64);

    // Registration and lookup.
    let a = dir
        .register(&alice, registration("alice", 4001), tx.clone())
        .await
        .expect("first registration claims the name");
    let record = a
        .lookup("alice")
        .await
        .expect("lookup")
        .expect("alice is known");
    assert_eq!(record.public_key, alice.public_key());
    assert!(record.online);
    assert!(
        record.addrs.iter().any(|addr| addr.port() == 4001),
        "published address carries the listen port: {:?}",
        record.addrs
    );
    assert_eq!(a.lookup("nobody").await.expect("lookup"), None);

    // Name claims.
    match dir
        .register(&mallory, registration("alice", 4002), tx.clone())
        .await
    {
        Err(DiscoveryError::NameTaken { username }) => assert_eq!(username, "alice"),
        other => panic!("another key must not take a claimed name, got {other:?}"),
    }
    match dir
        .register(&alice, registration("Bad Name", 4003), tx.clone())
        .await
    {
        Err(DiscoveryError::InvalidUsername(_)) => {}
        other => panic!("bad usernames must be refused, got {other:?}"),
    }

    // Watching presence: only names somebody holds; pushed on register and on deregister.
    let (watch_tx, mut watch_rx) = mpsc::channel(64);
    let watcher = dir
        .register(&mallory, registration("mallory", 4004), watch_tx)
        .await
        .expect("register watcher");
    match watcher.watch("nobody-holds-this").await {
        Err(DiscoveryError::Refused(_)) => {}
        other => panic!("a watch on a name nobody holds must be refused, got {other:?}"),
    }
    let b = dir
        .register(&bob, registration("bob", 4005), tx.clone())
        .await
        .expect("register bob");
    b.deregister()
        .await
        .expect("bob goes away, keeping the name");
    watcher.watch("bob").await.expect("watch");
    let b = dir
        .register(&bob, registration("bob", 4005), tx.clone())
        .await
        .expect("register bob");
    expect_presence(&mut watch_rx, "bob", true, SUITE_EVENT_TIMEOUT).await;
    b.deregister().await.expect("deregister");
    expect_presence(&mut watch_rx, "bob", false, SUITE_EVENT_TIMEOUT).await;
    assert!(matches!(b.keep_alive().await, Err(DiscoveryError::Closed)));
    let record = a.lookup("bob").await.expect("lookup").expect("claim stays");
    assert!(!record.online, "a deregistered user is offline");
    assert_eq!(record.public_key, bob.public_key());

    // The owner may register again; dropping the session is going offline at once.
    let b = dir
        .register(&bob, registration("bob", 4006), tx.clone())
        .await
        .expect("the owner registers again");
    expect_presence(&mut watch_rx, "bob", true, SUITE_EVENT_TIMEOUT).await;
    drop(b);
    expect_presence(&mut watch_rx, "bob", false, SUITE_EVENT_TIMEOUT).await;

    // Missing keep-alives: offline after the presence TTL, pushed to watchers.
    let b = dir
        .register(&bob, registration("bob", 4007), tx.clone())
        .await
        .expect("register bob again");
    expect_presence(&mut watch_rx, "bob", true, SUITE_EVENT_TIMEOUT).await;
    expect_presence(
        &mut watch_rx,
        "bob",
        false,
        presence_ttl * 4 + Duration::from_secs(2),
    )
    .await;
    drop(b);

    // Paginated listing of many users: every online user exactly once, in order.
    let mut sessions = Vec::new();
    for i in 0..(2 * MAX_PAGE_SIZE + 7) {
        let id = Identity::generate();
        let s = dir
            .register(&id, registration(&format!("user{i:04}"), 5000), tx.clone())
            .await
            .expect("register many");
        sessions.push(s);
    }
    a.keep_alive().await.expect("keep alive");
    watcher.keep_alive().await.expect("keep alive");
    for s in &sessions {
        s.keep_alive().await.expect("keep alive");
    }
    let mut names = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = a
            .list_online(after.take(), MAX_PAGE_SIZE)
            .await
            .expect("list");
        assert!(page.users.len() <= MAX_PAGE_SIZE, "pages are bounded");
        assert!(page.users.iter().all(|u| u.online));
        names.extend(page.users.into_iter().map(|u| u.username));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(names, sorted, "listing is in name order without repeats");
    for i in 0..(2 * MAX_PAGE_SIZE + 7) {
        assert!(
            names.contains(&format!("user{i:04}")),
            "user{i:04} missing from the listing"
        );
    }
    assert!(names.contains(&"alice".to_owned()));
    assert!(
        !names.contains(&"bob".to_owned()),
        "offline users are not listed"
    );
}

// ---------------------------------------------------------------------------------------
// Offline store

fn stored(from: &str, to: &str, n: u32) -> StoredMessage {
    StoredMessage {
        id: MessageId::random(),
        from: from.to_owned(),
        to: to.to_owned(),
        token: shaped_token(format!("message {n}").as_bytes()),
        expires_at: SystemTime::now() + Duration::from_secs(3600),
    }
}

/// A token shaped like a Fernet token, holding `plaintext` under a throwaway key, stamped
/// now: what a server that checks the shape of deposits accepts (see
/// [`crate::crypto::check_token_shape`]), for tests that store tokens without opening them.
/// Tokens of the same plaintext length have the same length.
pub fn shaped_token(plaintext: &[u8]) -> String {
    let now = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    fernet::seal(&[7; fernet::KEY_LEN], now, [9; fernet::IV_LEN], plaintext)
}

/// Every user a [`store_conformance`] run acts as (a backend that needs users set up, such
/// as a server that takes deposits only for claimed names, sets these up first).
pub const STORE_SUITE_USERS: [&str; 8] = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "mallory",
];

/// The stores a [`store_conformance`] run acts through, one per user. Backends that trust
/// their caller ([`crate::MemoryStore`], a Redis store) hand every user the same store
/// ([`SharedStore`]); a store on an authenticated session (the server mailbox) hands each
/// user a store on that user's own session.
#[async_trait]
pub trait StoreAccess: Send + Sync {
    /// The store `user` acts through.
    async fn store_for(&self, user: &str) -> Arc<dyn OfflineStore>;
}

/// Every user acts through the same store.
#[derive(Debug, Clone)]
pub struct SharedStore(pub Arc<dyn OfflineStore>);

impl SharedStore {
    /// Shares `store` between every user of a conformance run.
    pub fn new(store: impl OfflineStore) -> Self {
        Self(Arc::new(store))
    }
}

#[async_trait]
impl StoreAccess for SharedStore {
    async fn store_for(&self, _user: &str) -> Arc<dyn OfflineStore> {
        self.0.clone()
    }
}

/// Checks the [`OfflineStore`] contract. `make(quotas)` returns access to fresh, empty
/// mailboxes under `quotas`.
pub async fn store_conformance<A, F, Fut>(make: F)
where
    A: StoreAccess,
    F: Fn(Quotas) -> Fut,
    Fut: Future<Output = A>,
{
    quota_conformance(&make).await;
    let access = make(Quotas::mailbox(50)).await;
    let alice = access.store_for("alice").await;
    let bob = access.store_for("bob").await;
    let mut notices = bob.subscribe("bob").await.expect("subscribe");

    // Put, then fetch in order without removing.
    let messages: Vec<StoredMessage> = (0..20).map(|n| stored("alice", "bob", n)).collect();
    for m in &messages {
        alice.put(m.clone()).await.expect("put");
    }
    within("a new-mail notice", notices.next())
        .await
        .expect("notice stream open");
    let first = bob.fetch("bob", 100).await.expect("fetch");
    assert_eq!(first, messages, "fetch returns messages in the order put");
    let again = bob.fetch("bob", 5).await.expect("fetch");
    assert_eq!(
        again,
        messages[..5],
        "fetch leaves messages in place and honours the limit"
    );
    let carol = access.store_for("carol").await;
    assert!(
        carol.fetch("carol", 10).await.expect("fetch").is_empty(),
        "mailboxes are per recipient"
    );

    // Idempotent put.
    alice.put(messages[3].clone()).await.expect("put again");
    assert_eq!(bob.fetch("bob", 100).await.expect("fetch").len(), 20);

    // Ack removes exactly the acknowledged ones; unknown keys are ignored.
    let acked: Vec<MailKey> = messages[..10].iter().map(MailKey::of).collect();
    let unknown = [
        MailKey {
            from: "alice".to_owned(),
            id: MessageId::random(),
        },
        MailKey {
            from: "mallory".to_owned(),
            id: messages[12].id,
        },
    ];
    bob.ack("bob", &[&acked[..], &unknown].concat())
        .await
        .expect("ack");
    assert_eq!(bob.fetch("bob", 100).await.expect("fetch"), messages[10..]);
    bob.ack("bob", &acked)
        .await
        .expect("acking twice is harmless");

    // An id names a message only with its sender: mallory, who saw the id of alice's
    // message go by, neither hides it (depositing first under the same id) nor removes it
    // (acknowledging the id as another sender's).
    let mallory = access.store_for("mallory").await;
    let grace = access.store_for("grace").await;
    let genuine = stored("alice", "grace", 100);
    let mut junk = stored("mallory", "grace", 101);
    junk.id = genuine.id;
    mallory.put(junk.clone()).await.expect("mallory's put");
    let outcome = alice.put_many(vec![genuine.clone()]).await;
    assert!(
        matches!(outcome[..], [Ok(Put::Stored)]),
        "another sender's message with the same id is stored, not a duplicate: {outcome:?}"
    );
    let again = alice.put_many(vec![genuine.clone()]).await;
    assert!(
        matches!(again[..], [Ok(_)]),
        "the same sender's message again is accepted: {again:?}"
    );
    assert_eq!(
        grace.fetch("grace", 10).await.expect("fetch"),
        vec![junk.clone(), genuine.clone()],
        "both are kept, once each, in the order put"
    );
    grace
        .ack(
            "grace",
            &[MailKey {
                from: "bob".to_owned(),
                id: genuine.id,
            }],
        )
        .await
        .expect("ack");
    grace
        .ack("grace", &[MailKey::of(&junk)])
        .await
        .expect("ack");
    assert_eq!(
        grace.fetch("grace", 10).await.expect("fetch"),
        vec![genuine.clone()],
        "acknowledging one sender's message leaves the other's"
    );
    grace
        .ack("grace", &[MailKey::of(&genuine)])
        .await
        .expect("ack");
    assert!(grace.fetch("grace", 10).await.expect("fetch").is_empty());
    // Nor does the expiry of mallory's message under that id touch alice's.
    let genuine = stored("alice", "grace", 102);
    let mut junk = stored("mallory", "grace", 103);
    junk.id = genuine.id;
    junk.expires_at = SystemTime::now() - Duration::from_secs(1);
    let _ = mallory.put(junk).await;
    alice.put(genuine.clone()).await.expect("put");
    let expired = mallory.take_expired("mallory").await.expect("take_expired");
    assert_eq!(expired.len(), 1, "mallory's message expires: {expired:?}");
    assert!(alice.take_expired("alice").await.expect("take").is_empty());
    alice.put(genuine.clone()).await.expect("put again");
    assert_eq!(
        grace.fetch("grace", 10).await.expect("fetch"),
        vec![genuine.clone()],
        "alice's message stays, once, after the other sender's one with its id expired"
    );
    grace
        .ack("grace", &[MailKey::of(&genuine)])
        .await
        .expect("ack");
    assert!(grace.fetch("grace", 10).await.expect("fetch").is_empty());

    // Quota.
    for n in 0..40 {
        match carol.put(stored("carol", "dave", n)).await {
            Ok(()) => {}
            Err(e) => panic!("put below quota failed: {e}"),
        }
    }
    let mut refused = false;
    for n in 40..60 {
        if let Err(StoreError::QuotaExceeded { recipient, .. }) =
            carol.put(stored("carol", "dave", n)).await
        {
            assert_eq!(recipient, "dave");
            refused = true;
        }
    }
    assert!(refused, "a full mailbox refuses with QuotaExceeded");
    let dave = access.store_for("dave").await;
    assert_eq!(dave.fetch("dave", 100).await.expect("fetch").len(), 50);

    // Expiry: never returned, reported once to the sender.
    let erin = access.store_for("erin").await;
    let frank = access.store_for("frank").await;
    let mut old = stored("erin", "frank", 0);
    old.expires_at = SystemTime::now() - Duration::from_secs(1);
    let old_id = old.id;
    let _ = erin.put(old).await;
    assert!(frank.fetch("frank", 10).await.expect("fetch").is_empty());
    let expired = erin.take_expired("erin").await.expect("take_expired");
    assert_eq!(expired.len(), 1, "the expired message is reported");
    assert_eq!(expired[0].id, old_id);
    assert_eq!(expired[0].to, "frank");
    assert!(
        erin.take_expired("erin")
            .await
            .expect("take_expired")
            .is_empty(),
        "each expiry is reported once"
    );
}

/// The [`Quotas`] part of [`store_conformance`]: each limit refuses the put that would pass
/// it, naming it, and stores nothing; the other parties are still served; what leaves
/// (acknowledged or expired) is counted out.
async fn quota_conformance<A, F, Fut>(make: &F)
where
    A: StoreAccess,
    F: Fn(Quotas) -> Fut,
    Fut: Future<Output = A>,
{
    async fn refused_by(store: &Arc<dyn OfflineStore>, message: StoredMessage) -> Option<Quota> {
        match store.put(message).await {
            Ok(()) => None,
            Err(StoreError::QuotaExceeded { limit, .. }) => Some(limit),
            Err(e) => panic!("a put failed with {e:?}, not a quota"),
        }
    }
    // Every message of the suite is the same size (same names' lengths, same plaintext
    // length): the byte limits are in messages of that size.
    let size = stored("alice", "erin", 0).charged_bytes();

    // Messages: per pair 3, per sender 5, per mailbox 4.
    let mut quotas = Quotas::unlimited();
    quotas.pair_messages = 3;
    quotas.sender_messages = 5;
    quotas.mailbox_messages = 4;
    let access = make(quotas).await;
    let [alice, frank, grace, erin] = [
        access.store_for("alice").await,
        access.store_for("frank").await,
        access.store_for("grace").await,
        access.store_for("erin").await,
    ];
    for n in 0..3 {
        assert_eq!(refused_by(&alice, stored("alice", "erin", n)).await, None);
    }
    assert_eq!(
        refused_by(&alice, stored("alice", "erin", 3)).await,
        Some(Quota::PairMessages),
        "a fourth message from one sender to one recipient"
    );
    for n in 0..2 {
        assert_eq!(refused_by(&alice, stored("alice", "grace", n)).await, None);
    }
    assert_eq!(
        refused_by(&alice, stored("alice", "grace", 2)).await,
        Some(Quota::SenderMessages),
        "a sixth message from one sender"
    );
    assert_eq!(refused_by(&frank, stored("frank", "erin", 0)).await, None);
    assert_eq!(
        refused_by(&grace, stored("grace", "erin", 0)).await,
        Some(Quota::MailboxMessages),
        "a fifth message for one recipient"
    );
    assert_eq!(
        erin.fetch("erin", 10).await.expect("fetch").len(),
        4,
        "refused puts stored nothing"
    );
    // An acknowledged message is counted out of the mailbox, the pair and the sender.
    let first = erin.fetch("erin", 1).await.expect("fetch");
    erin.ack("erin", &[MailKey::of(&first[0])])
        .await
        .expect("ack");
    assert_eq!(refused_by(&alice, stored("alice", "erin", 4)).await, None);
    // An expired message is counted out too (one already past its expiry is taken, and
    // expires at the next sweep, as in the expiry part below).
    let mut brief = stored("frank", "grace", 0);
    brief.expires_at = SystemTime::now() - Duration::from_secs(1);
    let _ = frank.put(brief).await;
    assert_eq!(
        refused_by(&grace, stored("grace", "frank", 0)).await,
        None,
        "other senders and recipients are served meanwhile"
    );
    let expired = frank.take_expired("frank").await.expect("take_expired");
    assert_eq!(expired.len(), 1, "{expired:?}");
    // grace holds alice's 2 and nothing else now: 2 more fit her 4, a third does not.
    assert_eq!(refused_by(&frank, stored("frank", "grace", 1)).await, None);
    assert_eq!(
        refused_by(&erin, stored("erin", "grace", 0)).await,
        None,
        "the expired message was counted out of grace's mailbox"
    );
    assert_eq!(
        refused_by(&erin, stored("erin", "grace", 1)).await,
        Some(Quota::MailboxMessages)
    );

    // Bytes: per pair 2 messages' worth, per sender 3, per mailbox 3, in all 5.
    let mut quotas = Quotas::unlimited();
    quotas.pair_bytes = 2 * size;
    quotas.sender_bytes = 3 * size;
    quotas.mailbox_bytes = 3 * size;
    quotas.total_bytes = 5 * size;
    let access = make(quotas).await;
    let [alice, frank, grace, dave] = [
        access.store_for("alice").await,
        access.store_for("frank").await,
        access.store_for("grace").await,
        access.store_for("dave").await,
    ];
    for n in 0..2 {
        assert_eq!(refused_by(&alice, stored("alice", "erin", n)).await, None);
    }
    assert_eq!(
        refused_by(&alice, stored("alice", "erin", 2)).await,
        Some(Quota::PairBytes)
    );
    assert_eq!(refused_by(&alice, stored("alice", "dave", 0)).await, None);
    assert_eq!(
        refused_by(&alice, stored("alice", "dave", 1)).await,
        Some(Quota::SenderBytes)
    );
    assert_eq!(refused_by(&frank, stored("frank", "erin", 0)).await, None);
    assert_eq!(
        refused_by(&grace, stored("grace", "erin", 0)).await,
        Some(Quota::MailboxBytes)
    );
    assert_eq!(refused_by(&grace, stored("grace", "dave", 0)).await, None);
    assert_eq!(
        refused_by(&dave, stored("dave", "carol", 0)).await,
        Some(Quota::TotalBytes),
        "a sixth message's bytes in the store"
    );
    let waiting = dave.fetch("dave", 10).await.expect("fetch");
    dave.ack("dave", &waiting.iter().map(MailKey::of).collect::<Vec<_>>())
        .await
        .expect("ack");
    assert_eq!(
        refused_by(&dave, stored("dave", "carol", 0)).await,
        None,
        "acknowledged bytes are counted out of the store's total"
    );
}

// ---------------------------------------------------------------------------------------
// Protocol-level tools

/// A peer speaking the wire protocol by hand, for tests that send what a [`crate::ChatNode`]
/// never would: replays, reflections, garbage.
pub struct RawPeer {
    reader: FrameReader,
    writer: FrameWriter,
}

impl std::fmt::Debug for RawPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawPeer")
    }
}

/// Why a [`RawPeer`] could not connect or send.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RawPeerError {
    /// The connection could not be made.
    #[error("dialing failed")]
    Dial(#[source] TransportError),
    /// The other side refused the handshake, or it broke.
    #[error("the handshake failed")]
    Handshake(#[source] Cause),
    /// A frame could not be written.
    #[error("writing a frame failed")]
    Write(#[source] ProtocolError),
}

impl RawPeer {
    /// Dials `addr` as `me` (holding `identity`) and completes the handshake with `peer`,
    /// whose key must be `peer_key`.
    pub async fn connect(
        transport: &dyn Transport,
        addr: SocketAddr,
        identity: &Identity,
        me: &str,
        peer: &str,
        peer_key: &PublicKey,
    ) -> Result<Self, RawPeerError> {
        let conn = transport.dial(addr).await.map_err(RawPeerError::Dial)?;
        let (mut reader, mut writer) = handshake::frames(conn);
        handshake::dial(&mut reader, &mut writer, identity, me, peer, peer_key)
            .await
            .map_err(|e| RawPeerError::Handshake(Cause::new(e)))?;
        Ok(Self { reader, writer })
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: PeerFrame) -> Result<(), RawPeerError> {
        self.writer.send(&frame).await.map_err(RawPeerError::Write)
    }

    /// The next frame, `None` at end of stream or on error.
    pub async fn recv(&mut self) -> Option<PeerFrame> {
        self.reader.next().await.and_then(Result::ok)
    }
}

/// A transport wrapper that records every byte written by either side of every connection,
/// to check what an observer of the network sees.
#[derive(Debug, Clone)]
pub struct RecordingTransport<T> {
    inner: T,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl<T: Transport> RecordingTransport<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            seen: Arc::default(),
        }
    }

    /// Everything written on every connection so far, concatenated.
    pub fn recorded(&self) -> Vec<u8> {
        self.seen.lock().clone()
    }
}

/// `conn` with its writes copied into `seen`.
fn tee(conn: Connection, seen: &Arc<Mutex<Vec<u8>>>) -> Connection {
    Connection {
        reader: conn.reader,
        writer: Box::new(Tee {
            inner: conn.writer,
            seen: seen.clone(),
        }),
        remote: conn.remote,
    }
}

#[async_trait]
impl<T: Transport> Transport for RecordingTransport<T> {
    async fn bind(&self, addr: SocketAddr) -> Result<Box<dyn Listener>, TransportError> {
        Ok(Box::new(RecordingListener {
            inner: self.inner.bind(addr).await?,
            seen: self.seen.clone(),
        }))
    }

    async fn dial(&self, addr: SocketAddr) -> Result<Connection, TransportError> {
        Ok(tee(self.inner.dial(addr).await?, &self.seen))
    }
}

#[derive(Debug)]
struct RecordingListener {
    inner: Box<dyn Listener>,
    seen: Arc<Mutex<Vec<u8>>>,
}

#[async_trait]
impl Listener for RecordingListener {
    fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr()
    }

    async fn accept(&mut self) -> Result<Connection, TransportError> {
        Ok(tee(self.inner.accept().await?, &self.seen))
    }
}

struct Tee {
    inner: crate::transport::WriteHalf,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl AsyncWrite for Tee {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &poll {
            self.seen.lock().extend_from_slice(&buf[..*n]);
        }
        poll
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
