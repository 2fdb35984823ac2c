//! Durable delivery: the inbox keeps every message for a reader that does not read, hands
//! unconfirmed messages out again (new streams, restarts), survives tampered frames by
//! resending, and keeps each sender's replay window to itself.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use p2pchat_core::crypto::{PairKey, Payload};
use p2pchat_core::protocol::PeerFrame;
use p2pchat_core::testing::RawPeer;
use p2pchat_core::{
    ChatNode, Confirm, Event, Events, Identity, MessageId, OfflineStore, StoredMessage,
    TcpTransport,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::util::{EVENT_TIMEOUT, World, buffered, wait_for};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// Counts of a run: how many were sent, shown, never shown, shown more than once.
fn counts(what: &str, sent: &[MessageId], shown: &[MessageId]) -> (usize, usize) {
    let mut times: HashMap<MessageId, usize> = HashMap::new();
    for id in shown {
        *times.entry(*id).or_default() += 1;
    }
    let lost = sent.iter().filter(|id| !times.contains_key(id)).count();
    let duplicated: usize = times.values().map(|&n| n.saturating_sub(1)).sum();
    eprintln!(
        "{what}: sent={} shown={} lost={lost} duplicated={duplicated}",
        sent.len(),
        shown.len()
    );
    (lost, duplicated)
}

/// Outcomes of `n` messages at the sender: the delivered ids, failing on anything but
/// `Delivered` (or, when `stored_ok`, `StoredOffline`).
async fn outcomes(events: &mut Events, n: usize, stored_ok: bool) -> HashSet<MessageId> {
    let mut done = HashSet::new();
    while done.len() < n {
        match wait_for(events, |e| {
            matches!(
                e,
                Event::Delivered { .. }
                    | Event::StoredOffline { .. }
                    | Event::SendFailed { .. }
                    | Event::Expired { .. }
                    | Event::Cancelled { .. }
            )
        })
        .await
        {
            Event::Delivered { id, .. } => assert!(done.insert(id), "one outcome per message"),
            Event::StoredOffline { id, .. } if stored_ok => {
                assert!(done.insert(id), "one outcome per message")
            }
            other => panic!("unexpected outcome: {other:?}"),
        }
    }
    done
}

/// The next `n` messages shown on `events`: (id, from, text). Other events are skipped; a
/// lag of other events is allowed (messages never lag).
async fn shown_n(events: &mut Events, n: usize) -> Vec<(MessageId, String, String)> {
    let mut got = Vec::with_capacity(n);
    tokio::time::timeout(EVENT_TIMEOUT * 4, async {
        while got.len() < n {
            match tokio::time::timeout(EVENT_TIMEOUT, events.next()).await {
                Ok(Some(Event::MessageReceived { id, from, text, .. })) => {
                    got.push((id, from, text))
                }
                Ok(Some(_)) => {}
                Ok(None) => panic!("the event stream ended after {} messages", got.len()),
                Err(_) => panic!("messages stopped arriving after {}", got.len()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{n} messages did not arrive in time"));
    got
}

// ---------------------------------------------------------------------------------------
// 1. A reader that does not read

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_does_not_read_for_20000_messages_then_reads_gets_all_in_order_none_twice()
{
    const N: usize = 20_000;
    let world = World::new();
    let alice = world.tcp_node("alice").await;
    let bob = world
        .builder("bob", Identity::generate(), None, TcpTransport::new())
        .event_capacity(64)
        .spawn()
        .await
        .expect("bob");
    // Bob's application holds its stream but does not poll it while alice sends.
    let mut bob_events = bob.events();
    let mut alice_events = alice.events();
    let delivered = tokio::spawn(async move {
        let d = outcomes(&mut alice_events, N, false).await;
        (d, alice_events)
    });
    let mut sent = Vec::with_capacity(N);
    for i in 0..N {
        sent.push(alice.send("bob", &format!("m{i}")).await.expect("send"));
    }
    let (delivered, _alice_events) = tokio::time::timeout(EVENT_TIMEOUT * 4, delivered)
        .await
        .expect("all delivered in time")
        .expect("delivered task");
    assert_eq!(delivered, sent.iter().copied().collect::<HashSet<_>>());

    // Now bob reads.
    let mut shown = Vec::with_capacity(N);
    let mut texts = Vec::with_capacity(N);
    let mut lagged = 0u64;
    tokio::time::timeout(EVENT_TIMEOUT * 2, async {
        while shown.len() < N {
            match tokio::time::timeout(EVENT_TIMEOUT, bob_events.next()).await {
                Ok(Some(Event::MessageReceived { id, from, text, .. })) => {
                    assert_eq!(from, "alice");
                    shown.push(id);
                    texts.push(text);
                }
                Ok(Some(Event::Lagged { missed })) => lagged += missed,
                Ok(Some(_)) => {}
                Ok(None) => panic!("bob's stream ended after {} messages", shown.len()),
                Err(_) => panic!("bob's messages stopped after {}", shown.len()),
            }
        }
    })
    .await
    .expect("bob reads everything in time");
    alice.shutdown().await.expect("shutdown");
    bob.shutdown().await.expect("shutdown");
    let extra: Vec<Event> = buffered(&mut bob_events)
        .into_iter()
        .filter(|e| matches!(e, Event::MessageReceived { .. }))
        .collect();
    shown.extend(extra.iter().filter_map(|e| match e {
        Event::MessageReceived { id, .. } => Some(*id),
        _ => None,
    }));
    eprintln!("slow reader: other events lagged (missed {lagged})");
    let (lost, duplicated) = counts("slow reader", &sent, &shown);
    assert_eq!((lost, duplicated), (0, 0));
    assert_eq!(shown, sent, "all in order, none twice");
    let expected: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, expected);
}

// ---------------------------------------------------------------------------------------
// 2. Unconfirmed messages are handed out again

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_message_is_handed_out_again_after_a_restart() {
    let world = World::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let bob_id = Identity::generate();
    let spawn_bob = || {
        world
            .builder("bob", bob_id.clone(), Some(dir.path()), TcpTransport::new())
            .confirm(Confirm::Explicit)
            .spawn()
    };
    let bob = spawn_bob().await.expect("bob");
    let alice = world
        .builder("alice", Identity::generate(), None, TcpTransport::new())
        .ack_timeout(Duration::from_secs(2))
        .spawn()
        .await
        .expect("alice");
    let mut alice_events = alice.events();
    let mut bob_events = bob.events();
    let mut sent = Vec::new();
    for i in 0..10 {
        sent.push(alice.send("bob", &format!("u{i}")).await.expect("send"));
    }
    outcomes(&mut alice_events, 10, false).await;
    let first: Vec<MessageId> = shown_n(&mut bob_events, 10)
        .await
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(first, sent, "all ten, in order");
    for id in &sent[..4] {
        assert!(bob.confirm("alice", *id).expect("confirm"), "{id} waits");
    }
    assert!(
        !bob.confirm("alice", sent[0]).expect("confirm"),
        "a confirmed message is not waiting any more"
    );

    // A second stream on the live node hands out the six unconfirmed ones again.
    let mut second = bob.events();
    let again: Vec<MessageId> = shown_n(&mut second, 6)
        .await
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(again, sent[4..], "the unconfirmed six, in order");
    assert!(
        !buffered(&mut second)
            .iter()
            .any(|e| matches!(e, Event::MessageReceived { .. })),
        "the second stream hands out nothing confirmed"
    );
    assert!(
        !buffered(&mut bob_events)
            .iter()
            .any(|e| matches!(e, Event::MessageReceived { .. })),
        "the first stream does not get them twice"
    );

    bob.simulate_crash().await;
    drop((bob_events, second));
    let bob = spawn_bob().await.expect("bob restarts");
    let mut bob_events = bob.events();
    let after: Vec<MessageId> = shown_n(&mut bob_events, 6)
        .await
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(
        after,
        sent[4..],
        "after a restart: the unconfirmed six, in order"
    );
    // Nothing else waits in the inbox: the next message shown is a new one.
    let marker = alice.send("bob", "after the restart").await.expect("send");
    outcomes(&mut alice_events, 1, true).await;
    let next = shown_n(&mut bob_events, 1).await;
    assert_eq!(
        (next[0].0, next[0].2.as_str()),
        (marker, "after the restart"),
        "no confirmed message is handed out again"
    );
    let (lost, duplicated) = counts("unconfirmed after restart", &sent, &first);
    assert_eq!((lost, duplicated), (0, 0));
    let confirmed_again = after.iter().filter(|id| sent[..4].contains(id)).count();
    eprintln!(
        "unconfirmed after restart: handed out again={} (of 6 unconfirmed), confirmed handed out again={confirmed_again}",
        after.len()
    );
    alice.shutdown().await.expect("shutdown");
    bob.shutdown().await.expect("shutdown");
}

// ---------------------------------------------------------------------------------------
// 4. A tampering proxy

/// A TCP proxy to `upstream` that flips one base64 character in the `every`-th chunk holding
/// a token-like run that a connection carries from client to upstream: once per connection
/// (the receiver closes a connection on a bad token, so later bytes on it would be lost
/// anyway), on the first `max_flips` connections. Returns its address, the flips made and the
/// connections accepted.
async fn tampering_proxy(
    upstream: SocketAddr,
    every: usize,
    max_flips: usize,
) -> (
    SocketAddr,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = listener.local_addr().expect("addr");
    let flips = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(AtomicUsize::new(0));
    let (flipped, connections) = (flips.clone(), accepted.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let Ok(server) = TcpStream::connect(upstream).await else {
                continue;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            accepted.fetch_add(1, Ordering::SeqCst);
            let flips = flips.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1024];
                let mut candidates = 0;
                let mut tampered = false;
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let chunk = &mut buf[..n];
                    if !tampered && let Some(at) = token_char(chunk) {
                        candidates += 1;
                        if candidates == every && flips.fetch_add(1, Ordering::SeqCst) < max_flips {
                            chunk[at] = if chunk[at] == b'A' { b'B' } else { b'A' };
                            tampered = true;
                        }
                    }
                    if sw.write_all(chunk).await.is_err() {
                        break;
                    }
                }
                let _ = sw.shutdown().await;
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
                let _ = cw.shutdown().await;
            });
        }
    });
    (addr, flipped, connections, task)
}

/// The middle of the first run of 48 or more base64url characters in `chunk`: inside a
/// Fernet token (past its version and timestamp), where any change fails authentication.
fn token_char(chunk: &[u8]) -> Option<usize> {
    let is_b64 = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    let mut start = None;
    for (i, &b) in chunk.iter().enumerate() {
        if is_b64(b) {
            let s = *start.get_or_insert(i);
            if i - s + 1 >= 48 {
                return Some(s + 24);
            }
        } else {
            start = None;
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampering_proxy_delays_messages_but_loses_none() {
    const N: usize = 500;
    const FLIPS: usize = 5;
    const WAVES: usize = 10;
    let world = World::new();
    // Bob publishes the proxy's address: alice reaches him only through it. The proxy's
    // port is needed before bob spawns, bob's before the proxy forwards: a listener bound
    // first, handed to the proxy once bob is up.
    let bob_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let bob_addr = bob_listener.local_addr().expect("addr");
    drop(bob_listener);
    let (proxy_addr, flips, connections, proxy) = tampering_proxy(bob_addr, 2, FLIPS).await;
    let bob = ChatNode::builder()
        .identity(Identity::generate())
        .username("bob")
        .listen(bob_addr)
        .announce(vec![proxy_addr])
        .transport(TcpTransport::new())
        .discovery(world.directory.clone())
        .offline_store(world.store.clone())
        .event_capacity(1 << 16)
        .spawn()
        .await
        .expect("bob");
    let alice = world
        .builder("alice", Identity::generate(), None, TcpTransport::new())
        .ack_timeout(Duration::from_millis(500))
        .spawn()
        .await
        .expect("alice");
    let (mut alice_events, mut bob_events) = (alice.events(), bob.events());
    let reader = tokio::spawn(async move {
        let got = shown_n(&mut bob_events, N).await;
        (got, bob_events)
    });
    let (settled_tx, mut settled) = tokio::sync::watch::channel(0usize);
    let outcome_task = tokio::spawn(async move {
        let mut delivered = HashSet::new();
        let mut stored = HashSet::new();
        let mut retries = 0usize;
        tokio::time::timeout(EVENT_TIMEOUT * 4, async {
            while delivered.len() + stored.len() < N {
                match alice_events.next().await.expect("alice's events") {
                    Event::Delivered { id, .. } => assert!(delivered.insert(id)),
                    Event::StoredOffline { id, .. } => assert!(stored.insert(id)),
                    Event::Queued { retry: Some(_), .. } => retries += 1,
                    e @ (Event::SendFailed { .. } | Event::Expired { .. }) => panic!("{e:?}"),
                    Event::Lagged { .. } => panic!("alice's events lagged"),
                    _ => continue,
                }
                settled_tx.send_replace(delivered.len() + stored.len());
            }
        })
        .await
        .expect("every message has an outcome in time");
        (delivered, stored, retries)
    });
    // In waves, each settled before the next, so that every wave finds a connection to
    // tamper with (a tampered connection still delivers the rest of the batch bob read).
    let mut sent = Vec::with_capacity(N);
    for wave in 0..WAVES {
        for i in 0..N / WAVES {
            sent.push(
                alice
                    .send("bob", &format!("through the proxy {wave}.{i}"))
                    .await
                    .expect("send"),
            );
        }
        let upto = sent.len();
        tokio::time::timeout(EVENT_TIMEOUT, settled.wait_for(|&n| n >= upto))
            .await
            .unwrap_or_else(|_| panic!("wave {wave} not settled in time"))
            .expect("outcomes");
    }
    let (delivered, stored, retries) = outcome_task.await.expect("outcomes");
    let (got, mut bob_events) = reader.await.expect("reader");
    alice.shutdown().await.expect("shutdown");
    bob.shutdown().await.expect("shutdown");
    proxy.abort();
    let mut shown: Vec<MessageId> = got.iter().map(|(id, _, _)| *id).collect();
    for e in buffered(&mut bob_events) {
        if let Event::MessageReceived { id, .. } = e {
            shown.push(id);
        }
    }
    let flips = flips.load(Ordering::SeqCst).min(FLIPS);
    let connections = connections.load(Ordering::SeqCst);
    eprintln!(
        "tampering proxy: flips={flips} connections={connections} delivered={} stored={} retries={retries}",
        delivered.len(),
        stored.len()
    );
    let (lost, duplicated) = counts("tampering proxy", &sent, &shown);
    assert_eq!(flips, FLIPS, "the proxy tampered with {FLIPS} connections");
    assert!(
        connections > FLIPS,
        "each tampered connection was closed and alice connected again ({connections} connections)"
    );
    assert_eq!((lost, duplicated), (0, 0));
    assert_eq!(
        shown.iter().copied().collect::<HashSet<_>>(),
        sent.iter().copied().collect::<HashSet<_>>()
    );
}

// ---------------------------------------------------------------------------------------
// 5. Replay windows per sender

/// Registers `name` with a real node (so the directory vouches for its key), then speaks as
/// that user to `bob` by hand.
async fn raw_user(world: &World, name: &str, bob: &ChatNode) -> (Identity, RawPeer, PairKey) {
    let id = Identity::generate();
    let node = world
        .node_with(name, id.clone(), None, TcpTransport::new())
        .await;
    let raw = raw_connect(&id, name, bob).await;
    node.shutdown().await.expect("the real node is not needed");
    let pair = PairKey::derive(&id, &bob.public_key()).expect("derive");
    (id, raw, pair)
}

async fn raw_connect(id: &Identity, name: &str, bob: &ChatNode) -> RawPeer {
    RawPeer::connect(
        &TcpTransport::new(),
        bob.local_addr(),
        id,
        name,
        "bob",
        &bob.public_key(),
    )
    .await
    .expect("handshake")
}

/// A token from `from` to bob numbered `seq`, stamped `sent_at_ms` by the sender's clock.
fn token(
    pair: &PairKey,
    id: MessageId,
    from: &str,
    seq: u64,
    sent_at_ms: u64,
    body: &str,
) -> String {
    pair.seal(&Payload {
        id,
        from: from.into(),
        to: "bob".into(),
        sent_at_ms,
        seq,
        body: body.into(),
    })
}

/// Sends `frames` in batches, waiting after each for bob to acknowledge all of it (answering
/// pings meanwhile). Every message is acknowledged, shown or dropped as a duplicate.
async fn send_acked(raw: &mut RawPeer, frames: Vec<(MessageId, String)>) {
    for batch in frames.chunks(512) {
        let mut waiting: HashSet<MessageId> = batch.iter().map(|(id, _)| *id).collect();
        for (id, token) in batch {
            raw.send(PeerFrame::Message {
                id: *id,
                token: token.clone(),
            })
            .await
            .expect("send");
        }
        tokio::time::timeout(EVENT_TIMEOUT, async {
            while !waiting.is_empty() {
                match raw.recv().await.expect("bob keeps the connection open") {
                    PeerFrame::Ack { ids, .. } => {
                        for id in ids {
                            waiting.remove(&id);
                        }
                    }
                    PeerFrame::Ping(n) => raw.send(PeerFrame::Pong(n)).await.expect("pong"),
                    PeerFrame::Reject { id, detail, .. } => panic!("{id} refused: {detail}"),
                    PeerFrame::Error { detail, .. } => panic!("bob: {detail}"),
                    _ => {}
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{} messages not acknowledged", waiting.len()));
    }
}

/// Mallory's flood does not reopen alice's replay window; alice's own window, once full,
/// refuses what is older than it, by her numbers: her clock stepping back an hour midway
/// (which the window ignores) loses none of her messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_partys_flood_does_not_reopen_another_senders_replay_window() {
    const FLOOD: usize = 20_000;
    const WINDOW: usize = p2pchat_core::node::DEDUP_WINDOW;
    const { assert!(FLOOD > WINDOW) };
    let world = World::new();
    let bob = world.tcp_node("bob").await;
    let mut bob_events = bob.events();
    let (alice_id, mut alice, alice_pair) = raw_user(&world, "alice", &bob).await;
    let (_, mut mallory, mallory_pair) = raw_user(&world, "mallory", &bob).await;
    // Alice's numbers, as her payloads say: counting up one per message, as a genuine
    // sender's do. Her clock, though, steps back by an hour halfway (`sent_at`): that
    // changes nothing, the window is in her numbers.
    let base = 1_000_000;
    let clock = |i: u64| now_ms() - if i > 5_000 { 3_600_000 } else { 0 };

    // A genuine alice → bob message, shown.
    let recorded = MessageId::random();
    let recorded_token = token(&alice_pair, recorded, "alice", base, clock(0), "recorded");
    send_acked(&mut alice, vec![(recorded, recorded_token.clone())]).await;
    let shown = shown_n(&mut bob_events, 1).await;
    assert_eq!((shown[0].0, shown[0].2.as_str()), (recorded, "recorded"));

    // Mallory floods bob with more messages than a window holds.
    let flood: Vec<(MessageId, String)> = (0..FLOOD)
        .map(|i| {
            let id = MessageId::random();
            let body = format!("flood {i}");
            (
                id,
                token(&mallory_pair, id, "mallory", i as u64, now_ms(), &body),
            )
        })
        .collect();
    let flood_ids: Vec<MessageId> = flood.iter().map(|(id, _)| *id).collect();
    let reader = tokio::spawn(async move {
        let got = shown_n(&mut bob_events, FLOOD).await;
        (got, bob_events)
    });
    send_acked(&mut mallory, flood).await;
    let (got, mut bob_events) = reader.await.expect("reader");
    assert!(got.iter().all(|(_, from, _)| from == "mallory"));
    let flood_shown: Vec<MessageId> = got.iter().map(|(id, _, _)| *id).collect();
    let (lost, duplicated) = counts("mallory's flood", &flood_ids, &flood_shown);
    assert_eq!((lost, duplicated), (0, 0));

    // The recorded alice token, replayed live (a fresh connection as alice) and through
    // the mailbox: acknowledged as a duplicate, not shown.
    drop(alice);
    let mut alice = raw_connect(&alice_id, "alice", &bob).await;
    send_acked(&mut alice, vec![(recorded, recorded_token.clone())]).await;
    world
        .store
        .put(StoredMessage {
            id: recorded,
            from: "alice".into(),
            to: "bob".into(),
            token: recorded_token.clone(),
            expires_at: SystemTime::now() + Duration::from_secs(3600),
        })
        .await
        .expect("plant");
    tokio::time::timeout(EVENT_TIMEOUT, async {
        while !world
            .store
            .fetch("bob", 10)
            .await
            .expect("fetch")
            .is_empty()
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("bob takes the planted replay from the mailbox");
    let control = MessageId::random();
    send_acked(
        &mut alice,
        vec![(
            control,
            token(
                &alice_pair,
                control,
                "alice",
                base + 10,
                clock(10),
                "control",
            ),
        )],
    )
    .await;
    let next = shown_n(&mut bob_events, 1).await;
    assert_eq!(
        (next[0].0, next[0].2.as_str()),
        (control, "control"),
        "the replay after mallory's flood was shown again"
    );

    // Alice's own window overflows: WINDOW + 100 more from her, sent after the recorded one.
    let own: Vec<(MessageId, String)> = (0..WINDOW + 100)
        .map(|i| {
            let id = MessageId::random();
            let body = format!("own {i}");
            let n = 1_000 + i as u64;
            (
                id,
                token(&alice_pair, id, "alice", base + n, clock(n), &body),
            )
        })
        .collect();
    let own_ids: Vec<MessageId> = own.iter().map(|(id, _)| *id).collect();
    let first_own = own[0].clone();
    let reader = tokio::spawn(async move {
        let got = shown_n(&mut bob_events, WINDOW + 100).await;
        (got, bob_events)
    });
    send_acked(&mut alice, own).await;
    let (got, mut bob_events) = reader.await.expect("reader");
    let own_shown: Vec<MessageId> = got.iter().map(|(id, _, _)| *id).collect();
    let (lost, duplicated) = counts("alice's own window", &own_ids, &own_shown);
    assert_eq!((lost, duplicated), (0, 0));
    assert_eq!(own_shown, own_ids, "in order");

    // Now older than alice's oldest remembered id: an evicted token replayed, a genuine
    // token with a fresh id and an old number, and the recorded one once more.
    let old_fresh = MessageId::random();
    send_acked(
        &mut alice,
        vec![
            first_own,
            (
                old_fresh,
                token(
                    &alice_pair,
                    old_fresh,
                    "alice",
                    base + 500,
                    clock(0),
                    "old but new id",
                ),
            ),
            (recorded, recorded_token),
        ],
    )
    .await;
    let control = MessageId::random();
    send_acked(
        &mut alice,
        vec![(
            control,
            token(
                &alice_pair,
                control,
                "alice",
                base + 100_000,
                clock(100_000),
                "control 2",
            ),
        )],
    )
    .await;
    let next = shown_n(&mut bob_events, 1).await;
    assert_eq!(
        (next[0].0, next[0].2.as_str()),
        (control, "control 2"),
        "a token older than alice's window was shown"
    );
    bob.shutdown().await.expect("shutdown");
    assert!(
        !buffered(&mut bob_events)
            .iter()
            .any(|e| matches!(e, Event::MessageReceived { .. })),
        "nothing else shown"
    );
    drop(mallory);
}

// ---------------------------------------------------------------------------------------
// A key change mid-conversation

/// Carol talks to alice, leaves, and her name passes to a new key: messages sent before the
/// change (live, and waiting in the mailbox under the old key) and after it (live, and in
/// the mailbox under the new key) are all shown exactly once. Those under the new key wait,
/// durable but hidden, until alice trusts it; none is refused, and the new carol is never
/// told a message failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_change_mid_conversation_loses_no_message_and_shows_each_once_after_trust() {
    const EACH: usize = 20;
    const LAPSE: Duration = Duration::from_secs(2);
    let world = World {
        directory: p2pchat_core::MemoryDiscovery::with_timeouts(Duration::from_secs(30), LAPSE),
        ..World::new()
    };
    let alice_dir = tempfile::tempdir().expect("tempdir");
    let alice_id = Identity::generate();
    // Alice's keep-alives keep her claim from lapsing while she is online.
    let start_alice = || async {
        world
            .builder(
                "alice",
                alice_id.clone(),
                Some(alice_dir.path()),
                world.network.clone(),
            )
            .keep_alive_interval(Duration::from_millis(100))
            .spawn()
            .await
            .expect("alice starts")
    };
    let alice = start_alice().await;
    let mut alice_events = alice.events();
    let carol1 = world.memory_node("carol").await;
    let mut carol1_events = carol1.events();
    let old_key = carol1.public_key().fingerprint();

    let send_all = |node: &ChatNode, to: &'static str, label: &'static str| {
        let node = node.clone();
        async move {
            let mut ids = Vec::new();
            for i in 0..EACH {
                ids.push(node.send(to, &format!("{label} {i}")).await.expect("send"));
            }
            ids
        }
    };
    let texts = |got: &[(MessageId, String, String)]| -> Vec<String> {
        got.iter().map(|(_, _, t)| t.clone()).collect()
    };
    let labelled =
        |label: &str| -> Vec<String> { (0..EACH).map(|i| format!("{label} {i}")).collect() };

    // 1. Live, both ways, under the old key.
    let mut sent = send_all(&carol1, "alice", "before, live").await;
    outcomes(&mut carol1_events, EACH, false).await;
    let got = shown_n(&mut alice_events, EACH).await;
    assert_eq!(texts(&got), labelled("before, live"));
    let mut shown: Vec<MessageId> = got.into_iter().map(|(id, _, _)| id).collect();
    send_all(&alice, "carol", "to the old carol").await;
    outcomes(&mut alice_events, EACH, false).await;
    assert_eq!(shown_n(&mut carol1_events, EACH).await.len(), EACH);

    // 2. Alice away: the old carol's messages wait in the mailbox, under the old key.
    alice.shutdown().await.expect("alice leaves");
    sent.extend(send_all(&carol1, "alice", "before, offline").await);
    outcomes(&mut carol1_events, EACH, true).await;
    carol1.shutdown().await.expect("the old carol leaves");

    // 3. Alice returns and reads them; carol's claim lapses meanwhile, not alice's.
    let alice = start_alice().await;
    let mut alice_events = alice.events();
    let got = shown_n(&mut alice_events, EACH).await;
    assert_eq!(texts(&got), labelled("before, offline"));
    shown.extend(got.into_iter().map(|(id, _, _)| id));
    tokio::time::sleep(LAPSE + Duration::from_millis(500)).await;

    // 4. A new key registers "carol" and writes live: acknowledged (durable, held), with
    // a warning at alice, and nothing shown.
    let carol2 = world.memory_node("carol").await;
    let mut carol2_events = carol2.events();
    assert_ne!(carol2.public_key().fingerprint(), old_key);
    sent.extend(send_all(&carol2, "alice", "after, live").await);
    outcomes(&mut carol2_events, EACH, false).await;
    let Event::KeyChanged { username, old, new } =
        wait_for(&mut alice_events, |e| matches!(e, Event::KeyChanged { .. })).await
    else {
        unreachable!()
    };
    assert_eq!(
        (username.as_str(), old, new),
        ("carol", old_key, carol2.public_key().fingerprint())
    );

    // 5. Alice away again: the new carol's messages wait in the mailbox, under the new key.
    alice.shutdown().await.expect("alice leaves");
    assert!(
        !buffered(&mut alice_events)
            .iter()
            .any(|e| matches!(e, Event::MessageReceived { .. })),
        "nothing under the untrusted key was shown"
    );
    sent.extend(send_all(&carol2, "alice", "after, offline").await);
    outcomes(&mut carol2_events, EACH, true).await;

    // 6. Alice returns: the mail under the new key is held too; trust releases everything
    // held, in order. Then alice writes to the new carol.
    let alice = start_alice().await;
    let mut alice_events = alice.events();
    wait_for(&mut alice_events, |e| matches!(e, Event::KeyChanged { .. })).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !buffered(&mut alice_events)
            .iter()
            .any(|e| matches!(e, Event::MessageReceived { .. })),
        "nothing under the untrusted key is shown before trust"
    );
    alice.trust("carol").await.expect("trust");
    let got = shown_n(&mut alice_events, 2 * EACH).await;
    let mut expected = labelled("after, live");
    expected.extend(labelled("after, offline"));
    assert_eq!(texts(&got), expected, "every held message, once, in order");
    shown.extend(got.into_iter().map(|(id, _, _)| id));
    send_all(&alice, "carol", "to the new carol").await;
    outcomes(&mut alice_events, EACH, false).await;
    let got = shown_n(&mut carol2_events, EACH).await;
    assert_eq!(texts(&got), labelled("to the new carol"));

    tokio::time::sleep(Duration::from_millis(200)).await;
    for e in buffered(&mut alice_events)
        .into_iter()
        .chain(buffered(&mut carol2_events))
    {
        assert!(
            !matches!(e, Event::MessageReceived { .. } | Event::SendFailed { .. }),
            "nothing shown twice, nothing failed: {e:?}"
        );
    }
    let (lost, duplicated) = counts("key change", &sent, &shown);
    assert_eq!((lost, duplicated), (0, 0));
    alice.shutdown().await.expect("shutdown");
    carol2.shutdown().await.expect("shutdown");
}
