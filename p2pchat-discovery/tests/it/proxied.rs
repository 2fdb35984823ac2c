//! Messages streaming through a fault-injecting proxy (`proxy.rs`) that cuts, delays and
//! blackholes (a) the link between two peers, (b) the nodes' sessions with the discovery
//! server. Every message is shown exactly once, and every send ends in one outcome: a
//! deposit that fails while the session is down is retried from the outbox (the sender is
//! told of the failed attempt) and stored once the session is back; none is reported
//! failed.

use std::path::Path;
use std::time::Duration;

use p2pchat_core::{ChatNode, DiscoveryClient, Identity, TcpTransport};

use super::counts::{Book, Outcome};
use super::proxy::{Mode, Proxy};
use super::util::*;

/// Messages streamed in each test.
const N: usize = 2_000;
/// One fault phase per slice of the stream, in the test through the server.
const SLICE: usize = N / PHASES.len();
/// The stream's pace through the server: a pause after every `BURST` messages.
const BURST: usize = 10;
const PAUSE: Duration = Duration::from_millis(10);
/// The sender's acknowledgement timeout: a blackhole is noticed after this.
const ACK_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest the test waits for the stream to settle after the faults.
const SETTLE: Duration = Duration::from_secs(30);

/// One fault, applied while part of the stream goes through.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Forward,
    Delay(Duration),
    /// Cut every connection while messages are in flight.
    Cut,
    /// Delay, and cut while messages are in flight (what the delay holds is lost).
    DelayThenCut(Duration),
    /// Swallow everything; lift once the side under test has noticed.
    Blackhole,
}

const PHASES: [Phase; 8] = [
    Phase::Forward,
    Phase::Delay(Duration::from_millis(20)),
    Phase::Cut,
    Phase::Blackhole,
    Phase::DelayThenCut(Duration::from_millis(50)),
    Phase::Cut,
    Phase::Blackhole,
    Phase::Delay(Duration::from_millis(5)),
];

fn node(name: &str, dir: &Path, directory: DiscoveryClient) -> p2pchat_core::ChatNodeBuilder {
    ChatNode::builder()
        .identity(Identity::generate())
        .username(name)
        .listen("127.0.0.1:0".parse().unwrap())
        .transport(TcpTransport::new())
        .discovery(directory)
        .data_dir(dir.join(name))
        .keep_alive_interval(TTL / 4)
}

fn mode_of(phase: Phase) -> Mode {
    match phase {
        Phase::Forward | Phase::Cut => Mode::Forward,
        Phase::Delay(d) | Phase::DelayThenCut(d) => Mode::Delay(d),
        Phase::Blackhole => Mode::Blackhole,
    }
}

/// Sends one slice from `from` to `to` at the stream's pace, cutting every proxied
/// connection halfway if the phase says so. Returns how many connections were cut.
async fn send_slice(
    book: &Book,
    from: &ChatNode,
    to: &str,
    first: usize,
    len: usize,
    phase: Phase,
    proxy: &Proxy,
) -> usize {
    let mut cut = 0;
    for i in first..first + len {
        let id = from
            .send(to, &format!("message {i}"))
            .await
            .unwrap_or_else(|e| panic!("send {i}: {e}"));
        book.sent(id, from.username(), to);
        if i - first == len / 2 && matches!(phase, Phase::Cut | Phase::DelayThenCut(_)) {
            cut += proxy.cut_all();
        }
        if (i + 1) % BURST == 0 {
            tokio::time::sleep(PAUSE).await;
        }
    }
    cut
}

/// Streams messages from alice to bob while faults hit the link, each fault only once the
/// link is live again after the last one.
struct PeerStream<'a> {
    book: &'a Book,
    alice: &'a ChatNode,
    proxy: &'a Proxy,
    next: usize,
    ids: Vec<p2pchat_core::MessageId>,
}

impl PeerStream<'_> {
    async fn send(&mut self, n: usize, pace: Duration) {
        for _ in 0..n {
            let i = self.next;
            let id = self
                .alice
                .send("bob", &format!("message {i}"))
                .await
                .unwrap_or_else(|e| panic!("send {i}: {e}"));
            self.book.sent(id, "alice", "bob");
            self.ids.push(id);
            self.next += 1;
            tokio::time::sleep(pace).await;
        }
    }

    /// Sends one message at a time until one is acknowledged: the link is live.
    async fn until_live(&mut self) {
        let from = self.ids.len();
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            self.send(1, Duration::from_millis(20)).await;
            let live = {
                let l = self.book.ledger();
                self.ids[from..]
                    .iter()
                    .any(|id| l.outcome(id) == Some(&Outcome::Delivered))
            };
            if live {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the link did not come back within {SETTLE:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_link_through_a_proxy_that_cuts_delays_and_blackholes_shows_each_message_once() {
    let dir = tempfile::tempdir().unwrap();
    // The proxy is the only way between the two: bob is not asked to dial alice back (she
    // says she cannot be dialed) and the server relays nothing (see `reach` for those).
    let config = p2pchat_discovery::Config {
        max_relays: 0,
        ..fast_config()
    };
    let server = TestServer::start(config, redb(&dir.path().join("server"))).await;
    // bob publishes the proxy's address: alice reaches him only through it.
    let proxy = Proxy::start(None).await;
    let bob = node("bob", dir.path(), server.client())
        .announce(vec![proxy.addr()])
        .spawn()
        .await
        .unwrap();
    proxy.set_upstream(bob.local_addr());
    let alice = node("alice", dir.path(), server.client())
        .ack_timeout(ACK_TIMEOUT)
        .dialable(false)
        .spawn()
        .await
        .unwrap();
    let book = Book::new();
    let collectors = [
        book.collect("alice", alice.events()),
        book.collect("bob", bob.events()),
    ];
    let mut stream = PeerStream {
        book: &book,
        alice: &alice,
        proxy: &proxy,
        next: 0,
        ids: Vec::new(),
    };

    let started = std::time::Instant::now();
    let pace = Duration::from_millis(2);
    for (k, &phase) in PHASES.iter().enumerate() {
        proxy.set_mode(Mode::Forward);
        stream.until_live().await;
        let before = (proxy.stats(), book.counts());
        proxy.set_mode(mode_of(phase));
        let mut cut = 0;
        match phase {
            Phase::Forward => stream.send(50, pace).await,
            Phase::Delay(_) => {
                stream.send(100, pace).await;
                let upto = stream.next;
                book.until("the delayed messages acknowledged", SETTLE, |l| {
                    l.counts().delivered + l.counts().stored >= upto
                })
                .await;
            }
            Phase::Cut | Phase::DelayThenCut(_) => {
                // Messages in flight (and, delayed, in the proxy) when the cut comes.
                stream.send(30, Duration::ZERO).await;
                cut = stream.proxy.cut_all();
                assert!(cut > 0, "phase {k}: a live connection to cut");
                stream.send(20, pace).await;
            }
            Phase::Blackhole => {
                stream.send(50, pace).await;
                // alice's link gives up on the silent connection and stores what it holds.
                book.until("alice notices the blackhole", SETTLE, |l| {
                    l.counts().stored > before.1.stored
                })
                .await;
            }
        }
        proxy.set_mode(Mode::Forward);
        let (after, counts) = (proxy.stats(), book.counts());
        if let Phase::Blackhole = phase {
            assert!(after.swallowed > before.0.swallowed, "phase {k} swallowed");
        }
        println!(
            "proxy-peer: phase {k} {phase:?} done at {:.1?}: cut {cut}, accepted {}, swallowed \
             {} bytes; so far sent {} delivered {} stored {} shown {}",
            started.elapsed(),
            after.accepted - before.0.accepted,
            after.swallowed - before.0.swallowed,
            counts.sent,
            counts.delivered,
            counts.stored,
            counts.shown
        );
    }
    assert!(stream.next <= N, "the faults took {} messages", stream.next);
    stream.send(N - stream.next, pace).await;
    book.until("every message settled and shown", SETTLE, |l| l.all_shown())
        .await;
    alice.shutdown().await.unwrap();
    bob.shutdown().await.unwrap();
    for c in collectors {
        c.await.unwrap();
    }
    let counts = book.counts();
    let stats = proxy.stats();
    counts.print("proxy-peer");
    println!(
        "proxy-peer: proxy accepted {} connections, cut {}, forwarded {} bytes, swallowed {} \
         bytes; {:.1?}",
        stats.accepted,
        stats.cut,
        stats.forwarded,
        stats.swallowed,
        started.elapsed()
    );
    assert_eq!(counts.sent, N);
    counts.assert_exactly_once();
    assert_eq!(counts.shown, N, "every message shown");
    assert_eq!(counts.failed, 0, "every send delivered or stored");
    assert_eq!(counts.delivered + counts.stored, N);
    assert!(
        counts.stored > 0,
        "the blackholes sent messages the offline way"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_through_a_proxy_that_cuts_delays_and_blackholes_the_server_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(fast_config(), redb(&dir.path().join("server"))).await;
    let proxy = Proxy::start(Some(server.addr)).await;
    let via_proxy = || {
        DiscoveryClient::new(proxy.addr().to_string())
            .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(400))
            .request_timeout(Duration::from_secs(1))
    };
    // carol has a name and is away: messages to her can only be deposited on the server.
    let carol_id = Identity::generate();
    let carol = node("carol", dir.path(), via_proxy())
        .identity(carol_id.clone())
        .spawn()
        .await
        .unwrap();
    carol.shutdown().await.unwrap();
    let alice = node("alice", dir.path(), via_proxy())
        .spawn()
        .await
        .unwrap();
    let bob = node("bob", dir.path(), via_proxy()).spawn().await.unwrap();
    let book = Book::new();
    let mut collectors = vec![
        book.collect("alice", alice.events()),
        book.collect("bob", bob.events()),
    ];

    let started = std::time::Instant::now();
    let to_carol_per_slice = 10;
    for (k, &phase) in PHASES.iter().enumerate() {
        // Each fault hits sessions that are registered and healthy.
        proxy.set_mode(Mode::Forward);
        tokio::time::timeout(SETTLE, async {
            while server.server.registered_sessions() != 2 || proxy.open() != 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("both sessions back with the server");
        let before = proxy.stats();
        proxy.set_mode(mode_of(phase));
        let mut cut = send_slice(&book, &alice, "bob", k * SLICE, SLICE, phase, &proxy).await;
        cut += send_slice(
            &book,
            &alice,
            "carol",
            k * to_carol_per_slice,
            to_carol_per_slice,
            phase,
            &proxy,
        )
        .await;
        if let Phase::Blackhole = phase {
            // Both sessions give up on the silent server and dial again.
            proxy.accepted_at_least(before.accepted + 2, SETTLE).await;
            proxy.set_mode(Mode::Forward);
            assert!(
                proxy.stats().swallowed > before.swallowed,
                "phase {k} swallowed"
            );
        }
        let after = proxy.stats();
        let (to_bob, to_carol) = {
            let l = book.ledger();
            (l.counts_to(|r| r == "bob"), l.counts_to(|r| r == "carol"))
        };
        println!(
            "proxy-server: phase {k} {phase:?} at {:.1?}: cut {cut}, accepted {}, swallowed {} \
             bytes; so far to bob delivered {} shown {}, to carol stored {} failed {} \
             retried {}",
            started.elapsed(),
            after.accepted - before.accepted,
            after.swallowed - before.swallowed,
            to_bob.delivered,
            to_bob.shown,
            to_carol.stored,
            to_carol.failed,
            to_carol.retried,
        );
    }
    proxy.set_mode(Mode::Forward);
    // Both sessions are back.
    let (observer, _o) = register(&server.client(), &Identity::generate(), "observer").await;
    until_online(observer.as_ref(), "alice", true).await;
    until_online(observer.as_ref(), "bob", true).await;
    book.until("every message to bob shown", SETTLE, |l| {
        l.sent
            .iter()
            .filter(|(_, (_, to))| to == "bob")
            .all(|(id, _)| l.shown.contains_key(id))
    })
    .await;
    book.until("an outcome for every message", SETTLE, |l| l.all_settled())
        .await;

    // carol comes back and drains what was deposited for her.
    let carol = node("carol", dir.path(), via_proxy())
        .identity(carol_id)
        .spawn()
        .await
        .unwrap();
    collectors.push(book.collect("carol", carol.events()));
    book.until("carol shown her mail", SETTLE, |l| l.all_shown())
        .await;
    for n in [&alice, &bob, &carol] {
        n.shutdown().await.unwrap();
    }
    for c in collectors {
        c.await.unwrap();
    }

    server.stop().await;
    let l = book.ledger();
    let to_bob = l.counts_to(|r| r == "bob");
    let to_carol = l.counts_to(|r| r == "carol");
    to_bob.print("proxy-server (alice to bob, peer link direct)");
    to_carol.print("proxy-server (alice to carol, away: server mailbox only)");
    let stats = proxy.stats();
    println!(
        "proxy-server: proxy accepted {} connections, cut {}, forwarded {} bytes, swallowed {} \
         bytes; {:.1?}",
        stats.accepted,
        stats.cut,
        stats.forwarded,
        stats.swallowed,
        started.elapsed()
    );
    let failures: Vec<&String> = l
        .outcomes
        .values()
        .flatten()
        .filter_map(|o| match o {
            Outcome::Failed(why) => Some(why),
            _ => None,
        })
        .collect();
    let retries: Vec<&String> = l.retries.values().flatten().collect();
    if let Some(why) = retries.first() {
        println!("proxy-server: a failed attempt reads: {why}");
    }
    // The peer connection does not need the server: every message delivered at once.
    assert_eq!(to_bob.sent, N);
    to_bob.assert_exactly_once();
    assert_eq!(to_bob.delivered, N, "{to_bob:?}");
    // A deposit can only fail while the session is down; the sender is told of the failed
    // attempt and the message is deposited on a retry.
    assert_eq!(to_carol.sent, PHASES.len() * to_carol_per_slice);
    to_carol.assert_exactly_once();
    assert_eq!(to_carol.delivered, 0);
    assert!(failures.is_empty(), "no message fails: {failures:?}");
    assert_eq!(to_carol.stored, to_carol.sent, "every deposit went through");
    assert!(
        retries
            .iter()
            .all(|why| why.contains("offline store failed")),
        "{retries:?}"
    );
    assert_eq!(
        to_carol.shown_offline, to_carol.shown,
        "carol's mail is shown marked offline"
    );
    assert!(stats.cut > 0 && stats.swallowed > 0);
}

/// The client's request deadline: a session whose server answers at once keeps going for
/// many request timeouts (the deadline timer may go off early, and is then moved on, never
/// cutting a live session), and a server that falls silent is given up on after the
/// timeout, not never.
#[tokio::test]
async fn the_request_deadline_keeps_a_busy_session_and_gives_up_on_a_silent_server() {
    let timeout = Duration::from_millis(300);
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(fast_config(), redb(dir.path())).await;
    let proxy = Proxy::start(Some(server.addr)).await;
    let client = DiscoveryClient::new(proxy.addr().to_string())
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(400))
        .request_timeout(timeout);
    let (session, _rx) = register(&client, &Identity::generate(), "busy").await;

    let started = std::time::Instant::now();
    let mut answered = 0u64;
    while started.elapsed() < timeout * 10 {
        session
            .keep_alive()
            .await
            .expect("a server that answers keeps the session");
        answered += 1;
    }
    assert_eq!(
        proxy.stats().accepted,
        1,
        "one connection all along ({answered} keep-alives)"
    );

    proxy.set_mode(Mode::Blackhole);
    let asked = std::time::Instant::now();
    let outcome = tokio::time::timeout(timeout * 10, session.keep_alive())
        .await
        .expect("a silent server is given up on");
    let waited = asked.elapsed();
    assert!(outcome.is_err(), "no answer is an error: {outcome:?}");
    assert!(
        waited >= timeout,
        "given up after {waited:?}, before the {timeout:?} timeout"
    );
    server.stop().await;
}
