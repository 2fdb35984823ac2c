//! Reachability through a real server on 127.0.0.1: the dial-back probe, connect-back, the
//! relay (what it carries, its limits), relays across instances sharing Redis, and a relayed
//! chat across a SIGKILL of the server binary, counting every message.
//!
//! A peer "behind a NAT" is simulated by the address it publishes: a listener that accepts
//! and drops every connection (as a port nobody forwards would, for the server's probe and
//! for any peer that dials it), or none at all (`dialable(false)`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use p2pchat_core::testing::connection_conformance;
use p2pchat_core::{
    ChatNode, ChatNodeBuilder, DiscoveryClient, Event, Identity, PeerPath, TcpTransport,
};
use p2pchat_discovery::{Config, RedisStorage, Storage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::counts::Book;
use super::util::*;

/// A free port on 127.0.0.1 (bound and released: nobody else takes it meanwhile in
/// practice).
fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// The test servers' settings, with the reachability probe as in production.
fn probing() -> Config {
    Config {
        probe_timeout: p2pchat_discovery::config::PROBE_TIMEOUT,
        ..fast_config()
    }
}

/// A listener that accepts and drops every connection: an address nobody can talk to.
struct Dropping {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    _task: JoinHandle<()>,
}

impl Dropping {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Self {
            addr,
            accepted,
            _task: task,
        }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Dropping {
    fn drop(&mut self) {
        self._task.abort();
    }
}

fn builder(name: &str, client: DiscoveryClient) -> ChatNodeBuilder {
    ChatNode::builder()
        .identity(Identity::generate())
        .username(name)
        .listen("127.0.0.1:0".parse().unwrap())
        .transport(TcpTransport::new())
        .discovery(client)
        .event_capacity(1 << 16)
        .keep_alive_interval(TTL / 4)
}

/// A node that publishes `hole` (where nothing answers) instead of its listener.
async fn behind_nat(name: &str, client: DiscoveryClient, hole: SocketAddr) -> ChatNode {
    builder(name, client)
        .announce(vec![hole])
        .spawn()
        .await
        .expect("node starts")
}

async fn reachability(node: &ChatNode) -> bool {
    let mut events = node.events();
    match wait_event(&mut events, |e| matches!(e, Event::Reachability { .. })).await {
        Event::Reachability { direct } => direct,
        _ => unreachable!(),
    }
}

/// Sends `text` and expects it delivered (not stored, not failed).
async fn delivered(from: &ChatNode, to: &str, text: &str) {
    let mut events = from.events();
    let id = from.send(to, text).await.expect("send");
    match wait_outcome(&mut events, id).await {
        Event::Delivered { .. } => {}
        other => panic!("{text:?} to {to} was not delivered directly: {other:?}"),
    }
}

async fn shown(node: &ChatNode, events: &mut p2pchat_core::Events, text: &str) -> bool {
    match wait_event(
        events,
        |e| matches!(e, Event::MessageReceived { text: t, .. } if t == text),
    )
    .await
    {
        Event::MessageReceived { offline, .. } => {
            let _ = node;
            offline
        }
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn the_server_publishes_only_the_addresses_its_probe_reaches() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(probing(), redb(dir.path())).await;
    let hole = Dropping::start().await;
    let alice = builder("alice", server.client()).spawn().await.unwrap();
    let bob = behind_nat("bob", server.client(), hole.addr).await;
    let carol = builder("carol", server.client())
        .dialable(false)
        .spawn()
        .await
        .unwrap();
    // mallory publishes alice's address: the probe there is answered with alice's key.
    let mallory = behind_nat("mallory", server.client(), alice.local_addr()).await;
    assert!(reachability(&alice).await, "alice is dialable");
    assert!(!reachability(&bob).await, "bob's address drops connections");
    assert!(
        !reachability(&carol).await,
        "carol says she is not dialable"
    );
    assert!(
        !reachability(&mallory).await,
        "an address that answers with another key"
    );
    assert_eq!(hole.accepted(), 1, "bob's address was probed once");

    let (observer, _events) = register(&server.client(), &Identity::generate(), "observer").await;
    let record = |name: &'static str| {
        let observer = &observer;
        async move { observer.lookup(name).await.unwrap().expect("claimed") }
    };
    assert_eq!(record("alice").await.addrs, [alice.local_addr()]);
    for name in ["bob", "carol", "mallory"] {
        let r = record(name).await;
        assert!(r.online, "{name} is online");
        assert!(r.addrs.is_empty(), "{name} has no published address");
    }
}

#[tokio::test]
async fn one_side_behind_a_nat_is_reached_by_connect_back_without_dialing_its_address() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(probing(), redb(dir.path())).await;
    let hole = Dropping::start().await;
    let alice = builder("alice", server.client()).spawn().await.unwrap();
    let bob = behind_nat("bob", server.client(), hole.addr).await;
    assert!(!reachability(&bob).await);
    let mut bob_events = bob.events();
    let mut alice_events = alice.events();
    delivered(&alice, "bob", "ping from alice").await;
    assert!(!shown(&bob, &mut bob_events, "ping from alice").await);
    assert_eq!(alice.path("bob"), Some(PeerPath::Direct));
    assert_eq!(server.server.open_relays(), 0, "no relay was needed");
    assert_eq!(hole.accepted(), 1, "only the probe went to bob's address");
    delivered(&bob, "alice", "pong from bob").await;
    assert!(!shown(&alice, &mut alice_events, "pong from bob").await);
}

/// A TCP proxy that keeps a copy of every byte it forwards, both ways.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<std::sync::Mutex<Vec<u8>>>,
    _task: JoinHandle<()>,
}

impl Recorder {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                for (mut from, mut to) in [
                    (
                        Box::new(cr) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    ),
                    (Box::new(sr), Box::new(cw)),
                ] {
                    let record = record.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 << 10];
                        while let Ok(n) = from.read(&mut buf).await {
                            if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            record.lock().unwrap().extend_from_slice(&buf[..n]);
                        }
                        let _ = to.shutdown().await;
                    });
                }
            }
        });
        Self {
            addr,
            seen,
            _task: task,
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self._task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_behind_nats_chat_through_the_relay_which_sees_no_plaintext() {
    const N: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    // Every byte between the nodes and the server (sessions and relay legs) is recorded: the
    // recorder is the server's public address, where relays are joined too.
    let server_addr = free_addr();
    let recorder = Recorder::start(server_addr).await;
    let config = Config {
        relay_addr: Some(recorder.addr),
        ..probing()
    };
    let server = TestServer::start_at(server_addr, config, redb(dir.path())).await;
    let (hole_a, hole_b) = (Dropping::start().await, Dropping::start().await);
    let alice = behind_nat("alice", client(recorder.addr), hole_a.addr).await;
    let bob = behind_nat("bob", client(recorder.addr), hole_b.addr).await;
    assert!(!reachability(&alice).await && !reachability(&bob).await);
    let book = Book::new();
    let collectors = [
        book.collect("alice", alice.events()),
        book.collect("bob", bob.events()),
    ];
    for i in 0..N {
        for (from, to) in [(&alice, "bob"), (&bob, "alice")] {
            let id = from
                .send(
                    to,
                    &format!("attack at dawn, {} to {to} #{i}", from.username()),
                )
                .await
                .unwrap();
            book.sent(id, from.username(), to);
        }
    }
    book.until("every message shown", WAIT, |l| l.all_shown())
        .await;
    assert_eq!(alice.path("bob"), Some(PeerPath::Relayed));
    assert_eq!(bob.path("alice"), Some(PeerPath::Relayed));
    // Both dialed at once, so two relays may have opened: the nodes keep one, and the
    // other ends when they drop it.
    tokio::time::timeout(WAIT, async {
        while server.server.open_relays() != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} relays open, not one", server.server.open_relays()));
    assert_eq!(
        (hole_a.accepted(), hole_b.accepted()),
        (1, 1),
        "nobody dialed the holes but the probe"
    );
    alice.shutdown().await.unwrap();
    bob.shutdown().await.unwrap();
    for c in collectors {
        c.await.unwrap();
    }
    let counts = book.counts();
    counts.print("relay (both ways)");
    counts.assert_exactly_once();
    assert_eq!((counts.sent, counts.delivered), (2 * N, 2 * N));

    let seen = recorder.seen.lock().unwrap().clone();
    assert!(
        seen.len() > 2 * N * 100,
        "the relayed traffic went through the recorder ({} bytes)",
        seen.len()
    );
    let needle = b"attack at dawn";
    assert!(
        !seen.windows(needle.len()).any(|w| w == needle),
        "the server never sees a message's text"
    );
}

#[tokio::test]
async fn a_full_relay_falls_back_to_the_mailbox() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        max_relays: 0,
        ..probing()
    };
    let server = TestServer::start(config, redb(dir.path())).await;
    let alice = builder("alice", server.client())
        .dialable(false)
        .spawn()
        .await
        .unwrap();
    let bob = builder("bob", server.client())
        .dialable(false)
        .spawn()
        .await
        .unwrap();
    let mut bob_events = bob.events();
    let mut events = alice.events();
    let id = alice.send("bob", "through the mailbox").await.unwrap();
    match wait_outcome(&mut events, id).await {
        Event::StoredOffline { .. } => {}
        other => panic!("expected the mailbox, got {other:?}"),
    }
    assert!(
        shown(&bob, &mut bob_events, "through the mailbox").await,
        "shown as offline mail"
    );
    assert_eq!(alice.path("bob"), None);
}

#[tokio::test]
async fn a_relay_is_refused_beyond_the_per_user_limit_and_the_peer_gets_mail_instead() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        max_relays_per_user: 1,
        ..probing()
    };
    let server = TestServer::start(config, redb(dir.path())).await;
    let [alice, bob, carol] = {
        let mut nodes = Vec::new();
        for name in ["alice", "bob", "carol"] {
            nodes.push(
                builder(name, server.client())
                    .dialable(false)
                    .spawn()
                    .await
                    .unwrap(),
            );
        }
        nodes.try_into().unwrap()
    };
    delivered(&alice, "bob", "one relay").await;
    assert_eq!(alice.path("bob"), Some(PeerPath::Relayed));
    let mut events = alice.events();
    let id = alice.send("carol", "a second one").await.unwrap();
    match wait_outcome(&mut events, id).await {
        Event::StoredOffline { .. } => {}
        other => panic!("expected the mailbox, got {other:?}"),
    }
    let mut carol_events = carol.events();
    assert!(shown(&carol, &mut carol_events, "a second one").await);
    drop(bob);
}

#[tokio::test]
async fn a_relayed_connection_through_the_server_is_a_transport_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(probing(), redb(dir.path())).await;
    let (alice, _a) = register_undialable(&server.client(), "alice").await;
    let (bob, bob_events) = register_undialable(&server.client(), "bob").await;
    let (alice, bob) = (Arc::new(alice), Arc::new(bob));
    let offers = Arc::new(tokio::sync::Mutex::new(bob_events));
    connection_conformance(|| {
        let (alice, bob, offers) = (alice.clone(), bob.clone(), offers.clone());
        async move {
            // alice's side waits for bob's: both at once.
            let (dialed, accepted) = tokio::join!(alice.relay("bob"), async {
                let ticket = loop {
                    let event = offers.lock().await.recv().await.expect("bob's events");
                    if let p2pchat_core::discovery::DiscoveryEvent::RelayOffer { ticket, .. } =
                        event
                    {
                        break ticket;
                    }
                };
                bob.join_relay(&ticket).await.expect("bob joins")
            });
            (dialed.expect("alice's side"), accepted)
        }
    })
    .await;
}

async fn register_undialable(
    client: &DiscoveryClient,
    name: &str,
) -> (
    Box<dyn p2pchat_core::DiscoverySession>,
    tokio::sync::mpsc::Receiver<p2pchat_core::discovery::DiscoveryEvent>,
) {
    use p2pchat_core::Discovery;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut reg = registration(name, 0);
    reg.dialable = false;
    let session = client
        .register(&Identity::generate(), reg, tx)
        .await
        .expect("registers");
    (session, rx)
}

#[tokio::test]
async fn peers_on_two_instances_sharing_redis_are_relayed_and_connected_back() {
    let redis = redis();
    let prefix = format!("test{:016x}", rand::random::<u64>());
    let storage = || async {
        Arc::new(
            RedisStorage::connect_with_prefix(&redis.url(), &prefix)
                .await
                .unwrap(),
        ) as Arc<dyn Storage>
    };
    let one = TestServer::start(probing(), storage().await).await;
    let two = TestServer::start(probing(), storage().await).await;
    let alice = builder("alice", one.client())
        .dialable(false)
        .spawn()
        .await
        .unwrap();
    let bob = builder("bob", two.client())
        .dialable(false)
        .spawn()
        .await
        .unwrap();
    let carol = builder("carol", two.client()).spawn().await.unwrap();
    assert!(reachability(&carol).await);
    let mut bob_events = bob.events();
    // alice (on one) to bob (on two): both behind NATs, relayed by the instance alice asked.
    delivered(&alice, "bob", "across instances").await;
    assert!(!shown(&bob, &mut bob_events, "across instances").await);
    assert_eq!(alice.path("bob"), Some(PeerPath::Relayed));
    assert_eq!((one.server.open_relays(), two.server.open_relays()), (1, 0));
    // carol (on two, dialable) to alice (on one, not): alice is asked to connect back.
    delivered(&carol, "alice", "dial me").await;
    assert_eq!(carol.path("alice"), Some(PeerPath::Direct));
    delivered(&alice, "bob", "still relayed").await;
}

/// The server binary, killed with SIGKILL and restarted on its port and data directory.
async fn binary(data_dir: &Path, listen: &str) -> DiscoveryProcess {
    discovery_process(data_dir, &["--listen", listen, "--presence-ttl", "2"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_chat_survives_a_sigkill_of_the_server_and_shows_each_message_once() {
    const N: usize = 600;
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let server_dir = dir.path().join("server");
    let mut server = binary(&server_dir, "127.0.0.1:0").await;
    let addr = server.addr;
    let fast = || {
        DiscoveryClient::new(addr.to_string())
            .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(400))
            .request_timeout(Duration::from_secs(2))
    };
    let node = |name: &str| {
        builder(name, fast())
            .dialable(false)
            .data_dir(dir.path().join(name))
            .keep_alive_interval(Duration::from_millis(250))
    };
    let alice = node("alice").spawn().await.unwrap();
    let bob = node("bob").spawn().await.unwrap();
    let book = Book::new();
    let collectors = [
        book.collect("alice", alice.events()),
        book.collect("bob", bob.events()),
    ];
    // Both stream to each other; the server dies at a random point of the stream.
    let kill_after = N / 4 + (rand::random::<u32>() as usize) % (N / 2);
    let streams: Vec<_> = [(alice.clone(), "bob"), (bob.clone(), "alice")]
        .into_iter()
        .map(|(from, to)| {
            let book = book.clone();
            tokio::spawn(async move {
                for i in 0..N {
                    let id = from
                        .send(to, &format!("{} to {to} #{i}", from.username()))
                        .await
                        .unwrap();
                    book.sent(id, from.username(), to);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect();
    book.until("the relayed stream under way", WAIT, |l| {
        l.shown_to("bob") >= kill_after
    })
    .await;
    assert_eq!(alice.path("bob"), Some(PeerPath::Relayed));
    server.child.start_kill().expect("SIGKILL the server");
    server.child.wait().await.unwrap();
    let killed_at = started.elapsed();
    let shown_at_kill = book.ledger().shown_to("bob");
    let server = binary(&server_dir, &addr.to_string()).await;
    for s in streams {
        s.await.unwrap();
    }
    book.until("every message shown", Duration::from_secs(60), |l| {
        l.all_shown()
    })
    .await;
    alice.shutdown().await.unwrap();
    bob.shutdown().await.unwrap();
    for c in collectors {
        c.await.unwrap();
    }
    drop(server);
    let counts = book.counts();
    println!(
        "relay-server-kill: SIGKILL at {killed_at:.1?} with {shown_at_kill} of {N} shown to bob; \
         done in {:.1?}",
        started.elapsed()
    );
    counts.print("relay-server-kill (both ways)");
    counts.assert_exactly_once();
    assert_eq!(counts.sent, 2 * N);
    assert!(shown_at_kill < N, "the kill came mid-stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_path_that_goes_silent_is_replaced_by_a_connect_back_losing_nothing() {
    use super::proxy::{Mode, Proxy};
    const N: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    // bob is published at a proxy to his listener (the probe passes through it) until it
    // goes silent. alice can be dialed.
    let server = TestServer::start(probing(), redb(dir.path())).await;
    let bob_addr = free_addr();
    let proxy = Proxy::start(Some(bob_addr)).await;
    let bob = builder("bob", server.client())
        .listen(bob_addr)
        .announce(vec![proxy.addr()])
        .spawn()
        .await
        .unwrap();
    assert!(
        reachability(&bob).await,
        "bob is dialable through the proxy"
    );
    let alice = builder("alice", server.client())
        .ack_timeout(Duration::from_secs(1))
        .spawn()
        .await
        .unwrap();
    assert!(reachability(&alice).await);
    let book = Book::new();
    let collectors = [
        book.collect("alice", alice.events()),
        book.collect("bob", bob.events()),
    ];
    let send = |range: std::ops::Range<usize>| {
        let (book, alice) = (book.clone(), alice.clone());
        async move {
            for i in range {
                let id = alice.send("bob", &format!("m{i}")).await.unwrap();
                book.sent(id, "alice", "bob");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    };
    send(0..N / 2).await;
    book.until("the first half shown", WAIT, |l| l.shown_to("bob") >= N / 2)
        .await;
    assert_eq!(
        proxy.stats().accepted,
        2,
        "the probe and then the first half went through the proxy"
    );
    // The proxy goes silent both ways (bob's side of the connection stays open).
    proxy.set_mode(Mode::Blackhole);
    send(N / 2..N).await;
    book.until("every message shown", Duration::from_secs(60), |l| {
        l.all_shown()
    })
    .await;
    book.counts().print("silent path → connect-back");
    assert_eq!(alice.path("bob"), Some(PeerPath::Direct));
    alice.shutdown().await.unwrap();
    bob.shutdown().await.unwrap();
    for c in collectors {
        c.await.unwrap();
    }
    let counts = book.counts();
    counts.assert_exactly_once();
    assert_eq!(
        (counts.sent, counts.delivered),
        (N, N),
        "all delivered directly: bob dialed back"
    );
}

/// A server from before reachability: it refuses `RegisterReachable` as an unknown first
/// frame (as those servers did) and takes `Register`. Returns its address and how many
/// registrations of each kind it saw.
async fn old_server() -> (SocketAddr, Arc<[AtomicU64; 2]>) {
    use futures::{SinkExt, StreamExt};
    use p2pchat_core::protocol::FrameCodec;
    use p2pchat_core::protocol::discovery::{ClientFrame, Registered, ServerFrame, WireError};
    use tokio_util::codec::{FramedRead, FramedWrite};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let (r, w) = stream.into_split();
                let mut reader = FramedRead::new(r, FrameCodec::<ClientFrame>::default());
                let mut writer = FramedWrite::new(w, FrameCodec::<ServerFrame>::default());
                writer
                    .send(ServerFrame::Challenge { nonce: [1; 32] })
                    .await
                    .unwrap();
                match reader.next().await {
                    Some(Ok(ClientFrame::Register(_))) => {
                        count[0].fetch_add(1, Ordering::SeqCst);
                        let registered = Registered {
                            observed: peer,
                            addrs: vec![peer],
                            presence_ttl_ms: 30_000,
                            operator_key: None,
                        };
                        writer
                            .send(ServerFrame::Registered(Box::new(registered)))
                            .await
                            .unwrap();
                        // Held open, answering nothing (the test makes no request).
                        while let Some(Ok(_)) = reader.next().await {}
                    }
                    Some(Ok(ClientFrame::RegisterReachable(_))) => {
                        count[1].fetch_add(1, Ordering::SeqCst);
                        let error =
                            WireError::BadFrame("the first frame must be a registration".into());
                        let _ = writer.send(ServerFrame::Error(error)).await;
                    }
                    _ => {}
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn a_server_from_before_reachability_is_registered_with_the_older_way_and_never_asked_to_relay()
 {
    use p2pchat_core::discovery::DiscoveryError;
    let (addr, seen) = old_server().await;
    let (session, _events) = register(&client(addr), &Identity::generate(), "alice").await;
    assert_eq!(
        [
            seen[0].load(Ordering::SeqCst),
            seen[1].load(Ordering::SeqCst)
        ],
        [1, 1],
        "one refused RegisterReachable, then one Register"
    );
    assert!(matches!(
        session.relay("bob").await,
        Err(DiscoveryError::Unsupported(_))
    ));
    assert!(matches!(
        session.connect_back("bob").await,
        Err(DiscoveryError::Unsupported(_))
    ));
}

#[tokio::test]
async fn a_node_from_before_reachability_is_sent_no_new_push_and_gets_mail_instead() {
    use futures::{SinkExt, StreamExt};
    use p2pchat_core::protocol::FrameCodec;
    use p2pchat_core::protocol::discovery::{
        Claim, ClientFrame, Push, RegisterRequest, ServerFrame, register_transcript,
    };
    use tokio_util::codec::{FramedRead, FramedWrite};
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(probing(), redb(dir.path())).await;
    // bob registers as nodes did before reachability, publishing a port nobody listens on.
    let bob = Identity::generate();
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let (r, w) = stream.into_split();
    let mut reader = FramedRead::new(r, FrameCodec::<ServerFrame>::default());
    let mut writer = FramedWrite::new(w, FrameCodec::<ClientFrame>::default());
    let Some(Ok(ServerFrame::Challenge { nonce })) = reader.next().await else {
        panic!("a challenge first")
    };
    let claim = Claim {
        username: "bob".into(),
        public_key: bob.public_key(),
        listen_port: 1,
        announce: Vec::new(),
    };
    let signature = bob.sign(&register_transcript(&nonce, &claim));
    writer
        .send(ClientFrame::Register(Box::new(RegisterRequest {
            claim,
            signature,
        })))
        .await
        .unwrap();
    assert!(matches!(
        reader.next().await,
        Some(Ok(ServerFrame::Registered(_)))
    ));
    let alice = builder("alice", server.client()).spawn().await.unwrap();
    assert!(reachability(&alice).await);
    let mut events = alice.events();
    let id = alice.send("bob", "the old way").await.unwrap();
    match wait_outcome(&mut events, id).await {
        Event::StoredOffline { .. } => {}
        other => panic!("expected the mailbox, got {other:?}"),
    }
    // Nothing bob's version cannot read was pushed to him (only mail notices may come).
    while let Ok(Some(frame)) =
        tokio::time::timeout(Duration::from_millis(200), reader.next()).await
    {
        match frame.unwrap() {
            ServerFrame::Push(Push::NewMail) => {}
            other => panic!("pushed to an old node: {other:?}"),
        }
    }
}

#[tokio::test]
async fn connect_back_is_refused_to_a_user_whose_addresses_the_probe_did_not_verify() {
    use p2pchat_core::discovery::DiscoveryError;
    let dir = tempfile::tempdir().unwrap();
    // Probing off: every address is published as claimed, so none is verified.
    let server = TestServer::start(fast_config(), redb(dir.path())).await;
    let (bob, _b) = register_undialable(&server.client(), "bob").await;
    let (alice, _a) = register(&server.client(), &Identity::generate(), "alice").await;
    match alice.connect_back("bob").await {
        Err(DiscoveryError::Refused(why)) => assert!(why.contains("probe"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop(bob);
}

/// Registers `name` over a pipe as a client the server sees at `observed`, announcing
/// `announce` the older way (no probe), and returns the published addresses.
async fn published_for(
    server: &TestServer,
    name: &str,
    observed: SocketAddr,
    announce: Vec<SocketAddr>,
) -> Vec<SocketAddr> {
    use futures::{SinkExt, StreamExt};
    use p2pchat_core::protocol::FrameCodec;
    use p2pchat_core::protocol::discovery::{
        Claim, ClientFrame, RegisterRequest, ServerFrame, register_transcript,
    };
    use tokio_util::codec::{FramedRead, FramedWrite};
    let (client, server_end) = tokio::io::duplex(64 << 10);
    let (read, write) = tokio::io::split(server_end);
    let stop = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(p2pchat_discovery::serve_connection(
        server.server.clone(),
        read,
        write,
        observed,
        stop.clone(),
    ));
    let (r, w) = tokio::io::split(client);
    let mut reader = FramedRead::new(r, FrameCodec::<ServerFrame>::default());
    let mut writer = FramedWrite::new(w, FrameCodec::<ClientFrame>::default());
    let Some(Ok(ServerFrame::Challenge { nonce })) = reader.next().await else {
        panic!("a challenge first")
    };
    let identity = Identity::generate();
    let claim = Claim {
        username: name.into(),
        public_key: identity.public_key(),
        listen_port: 7000,
        announce,
    };
    let signature = identity.sign(&register_transcript(&nonce, &claim));
    writer
        .send(ClientFrame::Register(Box::new(RegisterRequest {
            claim,
            signature,
        })))
        .await
        .unwrap();
    let Some(Ok(ServerFrame::Registered(registered))) = reader.next().await else {
        panic!("registered")
    };
    stop.cancel();
    let _ = serving.await;
    registered.addrs
}

#[tokio::test]
async fn a_node_cannot_publish_targets_inside_other_peoples_networks() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(fast_config(), redb(dir.path())).await;
    let targets: Vec<SocketAddr> = [
        "10.0.0.5:6379",
        "127.0.0.1:22",
        "192.168.1.1:80",
        "[fe80::1]:22",
        "0.0.0.0:7000",
        "198.51.100.7:0",
        "198.51.100.7:6000",
    ]
    .iter()
    .map(|a| a.parse().unwrap())
    .collect();
    // Seen from a public address: only the public target with a real port is published.
    let public = published_for(
        &server,
        "mallory",
        "203.0.113.9:40000".parse().unwrap(),
        targets.clone(),
    )
    .await;
    assert_eq!(public, ["198.51.100.7:6000".parse::<SocketAddr>().unwrap()]);
    // Seen on a private network: its private addresses may be where the node is; loopback
    // may not.
    let private = published_for(
        &server,
        "lan",
        "10.1.2.3:40000".parse().unwrap(),
        targets.clone(),
    )
    .await;
    let expected: Vec<SocketAddr> = [
        "10.0.0.5:6379",
        "192.168.1.1:80",
        "[fe80::1]:22",
        "198.51.100.7:6000",
    ]
    .iter()
    .map(|a| a.parse().unwrap())
    .collect();
    assert_eq!(private, expected);
    // Nothing announced: the observed address with the listen port, public or not.
    let observed = published_for(
        &server,
        "plain",
        "203.0.113.9:40000".parse().unwrap(),
        Vec::new(),
    )
    .await;
    assert_eq!(
        observed,
        ["203.0.113.9:7000".parse::<SocketAddr>().unwrap()]
    );
}
