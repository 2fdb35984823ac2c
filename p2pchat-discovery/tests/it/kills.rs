//! Services killed under the nodes' feet, counting every message: the `p2pchat-discovery`
//! binary killed with SIGKILL (mid-stream between peers, mid-drain of a mailbox, with mail
//! waiting) and restarted on the same port and data directory; `redis-server` killed and
//! restarted while nodes keep their offline mail in it through `RedisStore`.
//!
//! An outage of the offline store does not fail a message: the sender is told of each
//! failed attempt (`Event::Queued` with a retry reason), the message stays in its outbox
//! and is retried with backoff, and once the store is back it is stored and later shown,
//! exactly once. Nothing sent during an outage is lost or reported failed.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use p2pchat_core::store::{MAX_FETCH_BATCH, MailKey};
use p2pchat_core::testing::RedisServer;
use p2pchat_core::{
    ChatNode, ChatNodeBuilder, DiscoveryClient, Identity, MessageId, OfflineStore, RedisStore,
    StoredMessage, TcpTransport,
};

use super::counts::{Book, Outcome};
use super::proxy::{Mode, Proxy};
use super::util::*;

/// The longest a test waits for one stage.
const STAGE: Duration = Duration::from_secs(30);

/// The server binary, as the tests here run it: short presence TTL, killed with SIGKILL.
struct Binary(DiscoveryProcess);

impl Binary {
    async fn start(data_dir: &Path, listen: &str) -> Self {
        Self(discovery_process(data_dir, &["--listen", listen, "--presence-ttl", "2"]).await)
    }

    /// SIGKILL, and wait for the process to be gone.
    async fn kill(&mut self) {
        self.0.child.start_kill().expect("SIGKILL the server");
        self.0.child.wait().await.unwrap();
    }
}

fn fast_client(addr: impl ToString) -> DiscoveryClient {
    DiscoveryClient::new(addr.to_string())
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(400))
        .request_timeout(Duration::from_secs(2))
}

fn builder(name: &str, id: &Identity, dir: &Path, directory: DiscoveryClient) -> ChatNodeBuilder {
    ChatNode::builder()
        .identity(id.clone())
        .username(name)
        .listen("127.0.0.1:0".parse().unwrap())
        .transport(TcpTransport::new())
        .discovery(directory)
        .data_dir(dir.join(name))
        .keep_alive_interval(Duration::from_millis(250))
}

/// Sends `n` messages from `from` to `to`, recording each, pausing `pace` after each.
async fn send_n(
    book: &Book,
    from: &ChatNode,
    to: &str,
    n: usize,
    pace: Duration,
) -> Vec<p2pchat_core::MessageId> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let id = from
            .send(to, &format!("{} to {to} #{i}", from.username()))
            .await
            .unwrap_or_else(|e| panic!("send {i} to {to}: {e}"));
        book.sent(id, from.username(), to);
        ids.push(id);
        if !pace.is_zero() {
            tokio::time::sleep(pace).await;
        }
    }
    ids
}

/// The failure reasons of the attempts to deliver `ids`, one per message (its first).
fn retry_reasons(book: &Book, ids: &[p2pchat_core::MessageId]) -> Vec<String> {
    let l = book.ledger();
    ids.iter()
        .filter_map(|id| l.retries.get(id).and_then(|r| r.first()).cloned())
        .collect()
}

fn settled_to(to: &str) -> impl Fn(&super::counts::Ledger) -> bool {
    let to = to.to_owned();
    move |l| {
        l.sent
            .iter()
            .filter(|(_, (_, r))| *r == to)
            .all(|(id, _)| l.outcomes.contains_key(id))
    }
}

fn shown_to(to: &str) -> impl Fn(&super::counts::Ledger) -> bool {
    let to = to.to_owned();
    move |l| {
        l.sent
            .iter()
            .filter(|(_, (_, r))| *r == to)
            .all(|(id, _)| match l.outcome(id) {
                None => false,
                Some(Outcome::Failed(_)) => true,
                Some(_) => l.shown.contains_key(id),
            })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_killed_mid_stream_and_mid_drain_keeps_the_mail_and_shows_each_message_once() {
    const MAIL: usize = 1_000;
    const STREAM: usize = 2_000;
    const OUTAGE: usize = 20;
    const AFTER: usize = 50;
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    let mut server = Binary::start(&server_dir, "127.0.0.1:0").await;
    let addr = server.0.addr;
    // bob reaches the server through a proxy that will slow his session down, so that his
    // drain of a thousand messages is still going when the server dies.
    let proxy = Proxy::start(Some(addr)).await;
    let [alice_id, bob_id, carol_id, dave_id] = std::array::from_fn(|_| Identity::generate());
    let nodes = dir.path();
    // bob and dave have names and are away.
    for (name, id, client) in [
        ("bob", &bob_id, fast_client(proxy.addr())),
        ("dave", &dave_id, fast_client(addr)),
    ] {
        let n = builder(name, id, nodes, client).spawn().await.unwrap();
        n.shutdown().await.unwrap();
    }
    let alice = builder("alice", &alice_id, nodes, fast_client(addr))
        .spawn()
        .await
        .unwrap();
    let carol = builder("carol", &carol_id, nodes, fast_client(addr))
        .spawn()
        .await
        .unwrap();
    let book = Book::new();
    let mut collectors = vec![
        book.collect("alice", alice.events()),
        book.collect("carol", carol.events()),
    ];

    // Mail waits on the server for bob, and one message for dave (so alice's link to dave
    // exists when the server is gone).
    send_n(&book, &alice, "bob", MAIL, Duration::ZERO).await;
    send_n(&book, &alice, "dave", 1, Duration::ZERO).await;
    book.until("the mail deposited", STAGE, |l| l.all_settled())
        .await;
    assert!(
        book.ledger()
            .outcomes
            .values()
            .all(|o| o == &[Outcome::Stored]),
        "mail for bob and dave is deposited"
    );

    // alice streams to carol; bob comes back through the slow link and drains meanwhile.
    let stream = {
        let (book, alice) = (book.clone(), alice.clone());
        tokio::spawn(async move {
            send_n(&book, &alice, "carol", STREAM, Duration::from_millis(2)).await;
        })
    };
    book.until("the stream under way", STAGE, |l| {
        l.shown_to("carol") >= 100
    })
    .await;
    proxy.set_mode(Mode::Delay(Duration::from_millis(60)));
    let bob = builder("bob", &bob_id, nodes, fast_client(proxy.addr()))
        .spawn()
        .await
        .unwrap();
    collectors.push(book.collect("bob", bob.events()));
    // The first batch of bob's mail is shown; its acknowledgement is on the slow link.
    book.until("bob's drain under way", STAGE, |l| l.shown_to("bob") >= 1)
        .await;
    server.kill().await;
    let (bob_at_kill, carol_at_kill) = {
        let l = book.ledger();
        (l.shown_to("bob"), l.shown_to("carol"))
    };
    let killed_at = started.elapsed();

    // While the server is down, mail for dave cannot be deposited: alice is told of the
    // failed attempts, and the messages wait in her outbox to be retried.
    let outage = send_n(&book, &alice, "dave", OUTAGE, Duration::ZERO).await;
    book.until(
        "a failed attempt for each of the outage's messages",
        STAGE,
        |l| outage.iter().all(|id| l.retried(id)),
    )
    .await;
    let outage_reasons = retry_reasons(&book, &outage);
    let outage_retried = outage_reasons
        .iter()
        .filter(|why| why.contains("offline store failed"))
        .count();
    let outage_settled_while_down = outage
        .iter()
        .filter(|id| book.ledger().outcome(id).is_some())
        .count();

    // The server comes back on the same port and data directory.
    let mut server = Binary::start(&server_dir, &addr.to_string()).await;
    let restarted_at = started.elapsed();
    proxy.set_mode(Mode::Forward);
    let (observer, _o) = register(&fast_client(addr), &Identity::generate(), "observer").await;
    for who in ["alice", "bob", "carol"] {
        until_online(observer.as_ref(), who, true).await;
    }
    stream.await.unwrap();
    book.until("the stream to carol shown", STAGE, shown_to("carol"))
        .await;
    book.until("bob's mail shown", STAGE, shown_to("bob")).await;

    // Once the server is back, the outage's messages are deposited on a retry.
    book.until("the outage's messages deposited", STAGE, settled_to("dave"))
        .await;
    // dave comes back: the message from before, the outage's and what follows all arrive.
    let dave = builder("dave", &dave_id, nodes, fast_client(addr))
        .spawn()
        .await
        .unwrap();
    collectors.push(book.collect("dave", dave.events()));
    send_n(&book, &alice, "dave", AFTER, Duration::ZERO).await;
    book.until("dave's mail shown", STAGE, shown_to("dave"))
        .await;
    for n in [&alice, &bob, &carol, &dave] {
        n.shutdown().await.unwrap();
    }
    for c in collectors {
        c.await.unwrap();
    }
    server.kill().await;

    let l = book.ledger();
    let to_bob = l.counts_to(|r| r == "bob");
    let to_carol = l.counts_to(|r| r == "carol");
    let to_dave = l.counts_to(|r| r == "dave");
    println!(
        "server-kill: SIGKILL at {killed_at:.1?} with {bob_at_kill} of bob's {MAIL} messages \
         and {carol_at_kill} of carol's {STREAM} shown; restarted at {restarted_at:.1?}; \
         {OUTAGE} sent to dave during the outage, {outage_retried} told of a failed attempt \
         and retried, {outage_settled_while_down} settled while it was down; done in {:.1?}",
        started.elapsed()
    );
    to_bob.print("server-kill (mail for bob, drained across the kill)");
    to_carol.print("server-kill (alice to carol, peer link)");
    to_dave.print("server-kill (dave: 1 before, 20 during the outage, 50 after)");
    let all = l.counts();
    all.print("server-kill (all)");

    assert!(
        bob_at_kill < MAIL,
        "the kill came in the middle of bob's drain"
    );
    to_bob.assert_exactly_once();
    assert_eq!(
        (to_bob.sent, to_bob.stored, to_bob.shown),
        (MAIL, MAIL, MAIL)
    );
    assert_eq!(to_bob.shown_offline, MAIL, "bob's mail is marked offline");
    assert!(carol_at_kill < STREAM, "the kill came mid-stream");
    to_carol.assert_exactly_once();
    assert_eq!(
        (to_carol.sent, to_carol.delivered, to_carol.shown),
        (STREAM, STREAM, STREAM),
        "the peer link does not need the server"
    );
    to_dave.assert_exactly_once();
    assert_eq!(
        outage_retried, OUTAGE,
        "every deposit during the outage is reported failed and retried: {outage_reasons:?}"
    );
    assert_eq!(
        outage_settled_while_down, 0,
        "nothing settles while the store is down"
    );
    assert_eq!(to_dave.failed, 0, "an outage fails no message");
    assert_eq!(
        (
            to_dave.sent,
            to_dave.stored + to_dave.delivered,
            to_dave.shown
        ),
        (1 + OUTAGE + AFTER, 1 + OUTAGE + AFTER, 1 + OUTAGE + AFTER),
        "every message to dave delivered or deposited, and shown once"
    );
    assert!(
        to_dave.stored > OUTAGE,
        "the outage's messages were deposited"
    );
    all.assert_exactly_once();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_keeps_stored_mail_and_outage_sends_are_retried_and_stored_once()
{
    const MAIL: usize = 500;
    const WAITED_OUT: usize = 2;
    const RACING: usize = 20;
    const AFTER: usize = 100;
    let started = Instant::now();
    let mut redis = RedisServer::start_with_appendonly();
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(fast_config(), redb(&dir.path().join("server"))).await;
    // Each node its own RedisStore, as separate processes would have.
    let url = redis.url();
    let store = || async { RedisStore::connect(&url).await.unwrap() };
    let (alice_id, bob_id) = (Identity::generate(), Identity::generate());
    let nodes = dir.path();
    let bob = builder("bob", &bob_id, nodes, server.client())
        .offline_store(store().await)
        .spawn()
        .await
        .unwrap();
    bob.shutdown().await.unwrap();
    let alice = builder("alice", &alice_id, nodes, server.client())
        .offline_store(store().await)
        .spawn()
        .await
        .unwrap();
    let book = Book::new();
    let mut collectors = vec![book.collect("alice", alice.events())];

    // Mail for bob, in Redis before it dies.
    send_n(&book, &alice, "bob", MAIL, Duration::ZERO).await;
    book.until("the mail stored", STAGE, |l| l.all_settled())
        .await;
    assert_eq!(book.counts().stored, MAIL);

    redis.kill();
    let killed_at = started.elapsed();
    // Redis stays down: each put waits out the store's reconnection attempts and fails; the
    // sender is told of the failed attempt and the message waits in the outbox.
    let waited_out = send_n(&book, &alice, "bob", WAITED_OUT, Duration::ZERO).await;
    book.until("the sends during the outage retried", STAGE, |l| {
        waited_out.iter().all(|id| l.retried(id))
    })
    .await;
    let retried_at = started.elapsed();
    let settled_while_down = waited_out
        .iter()
        .filter(|id| book.ledger().outcome(id).is_some())
        .count();
    // Sent while down, with Redis restarted right after: each ends stored, at once or on a
    // retry.
    let racing = send_n(&book, &alice, "bob", RACING, Duration::ZERO).await;
    tokio::task::block_in_place(|| redis.restart());
    let restarted_at = started.elapsed();
    book.until("every send stored", STAGE, |l| l.all_settled())
        .await;
    let racing_retried = racing.iter().filter(|id| book.ledger().retried(id)).count();

    // bob comes back and drains: the mail from before the kill and the outage's messages.
    let bob = builder("bob", &bob_id, nodes, server.client())
        .offline_store(store().await)
        .spawn()
        .await
        .unwrap();
    collectors.push(book.collect("bob", bob.events()));
    book.until("bob's mail shown", STAGE, |l| l.all_shown())
        .await;
    // And live again.
    send_n(&book, &alice, "bob", AFTER, Duration::ZERO).await;
    book.until("the messages after the restart shown", STAGE, |l| {
        l.all_shown()
    })
    .await;
    alice.shutdown().await.unwrap();
    bob.shutdown().await.unwrap();
    for c in collectors {
        c.await.unwrap();
    }

    server.stop().await;
    let l = book.ledger();
    let counts = l.counts();
    let reasons: Vec<&String> = l.retries.values().flatten().collect();
    println!(
        "redis-kill: SIGKILL at {killed_at:.1?}; {WAITED_OUT} sends while down told of a \
         failed attempt by {retried_at:.1?} ({settled_while_down} settled while down); \
         {RACING} more sent, Redis restarted at {restarted_at:.1?}: {racing_retried} of them \
         retried before being stored; done in {:.1?}",
        started.elapsed()
    );
    if let Some(why) = reasons.first() {
        println!("redis-kill: a failed attempt reads: {why}");
    }
    counts.print("redis-kill");
    counts.assert_exactly_once();
    assert_eq!(counts.sent, MAIL + WAITED_OUT + RACING + AFTER);
    assert_eq!(
        settled_while_down, 0,
        "nothing settles while Redis stays down"
    );
    assert_eq!(counts.failed, 0, "an outage fails no message");
    assert!(counts.retried >= WAITED_OUT, "{counts:?}");
    assert!(
        reasons
            .iter()
            .all(|why| why.contains("offline store failed")),
        "{reasons:?}"
    );
    assert_eq!(counts.shown, counts.sent, "every message shown");
    let mail_shown_offline = l
        .sent
        .keys()
        .filter(|id| matches!(l.outcome(id), Some(Outcome::Stored)))
        .all(|id| l.shown[id].iter().all(|s| s.offline));
    assert!(mail_shown_offline, "stored mail is shown marked offline");
}

/// The server binary SIGKILLed at a random moment while a sender streams deposit batches
/// (`MailboxStore::put_many`, the node's own path): after a restart on the same data
/// directory every message answered "stored" (or "duplicate") is in the mailbox, once.
/// Messages whose batch failed with the kill were not promised; they are counted apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_killed_during_a_stream_of_deposit_batches_loses_no_stored_message() {
    const BATCH: usize = 32;
    // Far more than can be sent before the kill (the stream stops at its first failure):
    // the kill must land mid-stream however fast the build.
    const BATCHES: usize = 5_000;
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    let mut server = Binary::start(&server_dir, "127.0.0.1:0").await;
    let addr = server.0.addr;
    let (alice_id, bob_id) = (Identity::generate(), Identity::generate());
    let (bob, _b) = register(&fast_client(addr), &bob_id, "bob").await;
    drop(bob);
    let (alice, _a) = register(&fast_client(addr), &alice_id, "alice").await;
    let mailbox = alice.mailbox().expect("the server keeps mailboxes");

    let (first_answer, answered) = tokio::sync::oneshot::channel();
    let stream = tokio::spawn(async move {
        let (mut sent, mut stored, mut failed) = (0, Vec::new(), 0);
        let mut first_answer = Some(first_answer);
        for _ in 0..BATCHES {
            let batch: Vec<StoredMessage> = (0..BATCH)
                .map(|i| StoredMessage {
                    id: MessageId::random(),
                    from: "alice".into(),
                    to: "bob".into(),
                    token: format!("gAAAAA-{i:04}-sealed"),
                    expires_at: SystemTime::now() + Duration::from_secs(3600),
                })
                .collect();
            let ids: Vec<MessageId> = batch.iter().map(|m| m.id).collect();
            sent += ids.len();
            let results = mailbox.put_many(batch).await;
            if let Some(tx) = first_answer.take() {
                let _ = tx.send(());
            }
            let mut any_failed = false;
            for (id, result) in ids.into_iter().zip(results) {
                match result {
                    Ok(_) => stored.push(id),
                    Err(_) => {
                        failed += 1;
                        any_failed = true;
                    }
                }
            }
            if any_failed {
                break;
            }
        }
        (sent, stored, failed)
    });
    answered.await.expect("the first batch is answered");
    // A random moment within the stream: somewhere among its first few hundred batches.
    let delay = Duration::from_millis(rand::random_range(5..150));
    tokio::time::sleep(delay).await;
    server.kill().await;
    let (sent, stored, failed) = stream.await.unwrap();
    drop(alice);

    let server = Binary::start(&server_dir, "127.0.0.1:0").await;
    let (bob, _b) = register(&fast_client(server.0.addr), &bob_id, "bob").await;
    let mailbox = bob.mailbox().unwrap();
    let mut held: Vec<MessageId> = Vec::new();
    loop {
        let batch = mailbox.fetch("bob", MAX_FETCH_BATCH).await.unwrap();
        if batch.is_empty() {
            break;
        }
        let acked: Vec<MailKey> = batch.iter().map(MailKey::of).collect();
        mailbox.ack("bob", &acked).await.unwrap();
        held.extend(acked.into_iter().map(|k| k.id));
    }
    let held_set: std::collections::HashSet<MessageId> = held.iter().copied().collect();
    let lost = stored.iter().filter(|id| !held_set.contains(id)).count();
    let duplicated = held.len() - held_set.len();
    println!(
        "deposit-kill: SIGKILL {delay:?} after the first answer; sent={sent} stored={} \
         failed-with-the-kill={failed} in-mailbox={} lost={lost} duplicated={duplicated}",
        stored.len(),
        held.len()
    );
    assert!(
        failed > 0,
        "the kill came while batches were still being sent"
    );
    assert_eq!(lost, 0, "every message answered stored survives the kill");
    assert_eq!(duplicated, 0, "nothing is in the mailbox twice");
    assert!(held.len() >= stored.len());
}
