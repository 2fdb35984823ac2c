//! Reaching a peer nobody can dial, in one run against one discovery server on 127.0.0.1:
//!
//! 1. **The first message to an undialable peer**, `--trials` times with freshly spawned
//!    nodes and fresh usernames (nothing cached: no key pinned, no connection, no lookup):
//!    (a) *connect-back*: alice is dialable, bob is `.dialable(false)`, so the server asks
//!    bob to dial alice; (b) *relay*: neither is dialable, so both open a connection to the
//!    server, which splices them. Both nodes have reported [`Event::Reachability`] before
//!    alice sends; the time is from just before `alice.send("bob", ..)` to bob's
//!    [`Event::MessageReceived`]. Prints p50 and p99 for each, and the path
//!    (`alice.path("bob")`) seen once alice has the acknowledgement: `Direct` for (a),
//!    `Relayed` for (b). The target is p50 < 200 ms. Then, `--baseline-trials` times,
//!    (c) *baseline: the old way*, as every message to such a peer went before connect-back
//!    and the relay: against a second server in this process with no reachability probe
//!    (`Config::probe_timeout` zero: nodes are published at whatever address they register)
//!    and no relay (`Config::max_relays` 0), alice is `.dialable(false)` (no connect-back)
//!    and bob announces the address of a blackhole, a listener on 127.0.0.1 that accepts
//!    connections and holds them without reading or writing: alice's dial connects, her
//!    handshake gets no answer, she waits out the node's 5 s `HANDSHAKE_TIMEOUT`, and the
//!    message goes through the server's mailbox (alice reports [`Event::StoredOffline`], bob
//!    gets it with `offline: true`). Timed the same way. Last,
//!    `speed-up p50: baseline/connect-back = x, baseline/relay = y`.
//! 2. **Relayed beside direct, alternating round by round**: one long-lived direct pair (both
//!    dialable) and one long-lived relayed pair (neither dialable), each warmed up with one
//!    message (the paths are checked: `Direct`, `Relayed`). Each round measures, for each
//!    side, throughput (`--messages` sent pipelined, timed until alice has every
//!    [`Event::Delivered`] and bob every [`Event::MessageReceived`]) and `--round-trips`
//!    send-to-[`Event::Delivered`] round trips, one message at a time, as the `compare`
//!    program does. For each body size it prints the median messages per second and the
//!    round trip p50 and p99 of each side, and
//!    `ratio <size>: relayed/direct throughput = x.xx, rtt p50 relayed/direct = x.xx`.
//!    Targets: relayed at least 100,000 msg/s at 64 B, relayed round trip p50 at most twice
//!    the direct one.
//!
//! ```text
//! cargo run --release -p p2pchat-benches --bin relay
//! cargo run --release -p p2pchat-benches --bin relay -- --trials 50 --rounds 3 --sizes 64,1024
//! cargo run --release -p p2pchat-benches --bin relay -- --baseline-trials 0
//! ```
//!
//! The server keeps its data in redb in a temporary directory. Its per-relay byte budget
//! (`Config::relay_bytes_per_second`, by default 1 MiB/s for both directions together: chat,
//! not bulk transfer) is lifted for the measurement, as are the per-address registration
//! rate and connection caps (every node here comes from 127.0.0.1); everything else is the
//! default `Config`. Each node keeps its database in a temporary data directory with the
//! default durability, and bob's application reads his messages as they arrive. `--trials 0`
//! skips part 1 (the baseline with it), `--baseline-trials 0` the baseline alone, `--rounds 0`
//! part 2. The machine is shared and noisy, so part 2's sides run alternately, round by
//! round, in one process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use p2pchat_core::node::HANDSHAKE_TIMEOUT;
use p2pchat_core::{ChatNode, DiscoveryClient, Event, Events, PeerPath, TcpTransport};
use p2pchat_discovery::{Config, Directory, RedbStorage, serve};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::task::AbortOnDropHandle;

/// Measures reaching undialable peers: connect-back and the relay.
#[derive(Debug, Parser)]
struct Args {
    /// First-message trials per path (connect-back, relay), each with fresh nodes.
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// First-message trials the old way (no connect-back, no relay: the mailbox after the
    /// 5 s handshake timeout), each with fresh nodes; each takes seconds. 0 skips them.
    #[arg(long, default_value_t = 3)]
    baseline_trials: usize,
    /// Alternating rounds per size (relayed beside direct).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Messages per throughput run.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Round trips sampled per round.
    #[arg(long, default_value_t = 500)]
    round_trips: usize,
    /// Body sizes in bytes.
    #[arg(long, value_delimiter = ',', default_values_t = [64])]
    sizes: Vec<usize>,
}

/// The longest any single wait (one event, one registration) may take.
const WAIT: Duration = Duration::from_secs(30);

/// The target for the first message to an undialable peer (p50).
const FIRST_MESSAGE_TARGET: Duration = Duration::from_millis(200);

/// The relayed throughput target at 64 B, in messages per second.
const RELAYED_RATE_TARGET: f64 = 100_000.0;

// ---------------------------------------------------------------------------------------
// The discovery server, in this process.

struct Server {
    addr: SocketAddr,
    directory: Arc<Directory>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start() -> anyhow::Result<Self> {
        Self::with(Config {
            relay_bytes_per_second: 0,
            registrations_per_second_per_ip: 0,
            new_claims_per_hour_per_ip: 0,
            lookups_per_second_per_ip: 0,
            max_connections_per_ip: 100_000,
            ..Config::default()
        })
        .await
    }

    /// The server as it was before reachability: no probe (a node is published at whatever
    /// address it registers), so no connect-back for undialable nodes, and no relay. The
    /// per-address caps are lifted as for [`Server::start`].
    async fn baseline() -> anyhow::Result<Self> {
        Self::with(Config {
            probe_timeout: Duration::ZERO,
            max_relays: 0,
            registrations_per_second_per_ip: 0,
            new_claims_per_hour_per_ip: 0,
            lookups_per_second_per_ip: 0,
            max_connections_per_ip: 100_000,
            ..Config::default()
        })
        .await
    }

    async fn with(config: Config) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("a temporary directory for the server")?;
        let storage = RedbStorage::open(dir.path()).context("open the server's redb")?;
        let directory = Directory::with_storage(config, Arc::new(storage));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the server")?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, directory.clone(), async move {
            let _ = stopped.await;
        }));
        Ok(Self {
            addr,
            directory,
            stop,
            task,
            _dir: dir,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .context("the server did not stop in time")?
            .context("the server task")?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Nodes.

/// A node registered with the server, with its first event stream (which starts at spawn,
/// so it holds the node's [`Event::Reachability`]) and its data directory.
struct Node {
    node: ChatNode,
    events: Events,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn spawn(server: &Server, name: &str, dialable: bool) -> anyhow::Result<Self> {
        Self::spawn_announcing(server, name, dialable, Vec::new()).await
    }

    /// As [`Node::spawn`], publishing `announce` (if not empty) instead of the address the
    /// server sees.
    async fn spawn_announcing(
        server: &Server,
        name: &str,
        dialable: bool,
        announce: Vec<SocketAddr>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("a temporary data directory")?;
        let node = ChatNode::builder()
            .username(name)
            .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
            .announce(announce)
            .transport(TcpTransport::new())
            .discovery(DiscoveryClient::new(server.addr.to_string()))
            .dialable(dialable)
            .data_dir(dir.path())
            .event_capacity(1 << 17);
        let node = tokio::time::timeout(WAIT, node.spawn())
            .await
            .with_context(|| format!("{name} did not start in time"))?
            .with_context(|| format!("spawn {name}"))?;
        let events = node.events();
        Ok(Self {
            node,
            events,
            _dir: dir,
        })
    }

    fn name(&self) -> &str {
        self.node.username()
    }

    /// Waits for the node's [`Event::Reachability`] (skipping anything before it).
    async fn reachability(&mut self) -> anyhow::Result<bool> {
        loop {
            if let Event::Reachability { direct } =
                next(&mut self.events, self.node.username()).await?
            {
                return Ok(direct);
            }
        }
    }

    async fn shutdown(self) -> anyhow::Result<()> {
        self.node
            .shutdown()
            .await
            .with_context(|| format!("shut {} down", self.node.username()))
    }
}

/// The next event of `who`, within [`WAIT`].
async fn next(events: &mut Events, who: &str) -> anyhow::Result<Event> {
    tokio::time::timeout(WAIT, events.next())
        .await
        .with_context(|| format!("{who} reported nothing for {WAIT:?}"))?
        .with_context(|| format!("{who}'s event stream ended"))
}

/// Waits for `n` [`Event::Delivered`] at the sender; anything but direct delivery (or a
/// lost event) is an error.
async fn delivered(events: &mut Events, who: &str, n: usize) -> anyhow::Result<()> {
    let mut got = 0;
    while got < n {
        match next(events, who).await? {
            Event::Delivered { .. } => got += 1,
            Event::StoredOffline { to, .. } => {
                anyhow::bail!("a message from {who} to {to} went to the mailbox, not the peer")
            }
            Event::SendFailed { to, reason, .. } => {
                anyhow::bail!("a message from {who} to {to} failed: {reason}")
            }
            Event::Lagged { missed } => {
                anyhow::bail!("{who}'s event reader lagged and missed {missed} events")
            }
            _ => {}
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 1. The first message to an undialable peer.

/// One trial: fresh alice (dialable or not) and bob (not dialable); returns the time from
/// `send` to bob's `MessageReceived`, and alice's path to bob once she has the ack.
async fn first_message(
    server: &Server,
    trial: usize,
    alice_dialable: bool,
) -> anyhow::Result<(Duration, Option<PeerPath>)> {
    let tag = if alice_dialable { "cb" } else { "relay" };
    let mut alice = Node::spawn(server, &format!("alice-{tag}-{trial}"), alice_dialable).await?;
    let mut bob = Node::spawn(server, &format!("bob-{tag}-{trial}"), false).await?;
    let (alice_direct, bob_direct) = tokio::try_join!(alice.reachability(), bob.reachability())?;
    anyhow::ensure!(
        alice_direct == alice_dialable,
        "{} reported direct={alice_direct}, expected {alice_dialable}",
        alice.name()
    );
    anyhow::ensure!(!bob_direct, "{} reported itself dialable", bob.name());
    let (alice_name, bob_name) = (alice.name().to_owned(), bob.name().to_owned());

    let started = Instant::now();
    alice
        .node
        .send(&bob_name, "the first message")
        .await
        .with_context(|| format!("{alice_name} sends to {bob_name}"))?;
    loop {
        if let Event::MessageReceived { from, offline, .. } =
            next(&mut bob.events, &bob_name).await?
            && from == alice_name
        {
            anyhow::ensure!(
                !offline,
                "{bob_name} got the message from the mailbox, not from {alice_name}"
            );
            break;
        }
    }
    let took = started.elapsed();
    delivered(&mut alice.events, &alice_name, 1).await?;
    let path = alice.node.path(&bob_name);
    alice.shutdown().await?;
    bob.shutdown().await?;
    Ok((took, path))
}

/// How often each path was seen, e.g. `Direct x20`.
fn paths_seen(paths: &[Option<PeerPath>]) -> String {
    let mut counts: Vec<(Option<PeerPath>, usize)> = Vec::new();
    for path in paths {
        match counts.iter_mut().find(|(p, _)| p == path) {
            Some((_, n)) => *n += 1,
            None => counts.push((*path, 1)),
        }
    }
    counts
        .iter()
        .map(|(path, n)| match path {
            Some(path) => format!("{path:?} x{n}"),
            None => format!("no connection x{n}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A TCP listener on 127.0.0.1 that accepts connections and holds them open without
/// reading or writing, until it is dropped: a dialer's connection is made, but its
/// handshake is never answered, as for a peer whose port drops incoming connections.
struct Blackhole {
    addr: SocketAddr,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
    _task: AbortOnDropHandle<()>,
}

impl Blackhole {
    async fn open() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the blackhole")?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = AbortOnDropHandle::new(tokio::spawn(async move {
            // Held, never read nor written, until the task is dropped.
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                held.push(socket);
            }
        }));
        Ok(Self {
            addr,
            accepted,
            _task: task,
        })
    }
}

/// One baseline trial, the old way, against the [`Server::baseline`] server: fresh alice
/// (not dialable, so no connect-back) and bob (published, unprobed, at a blackhole); returns
/// the time from `send` to bob's `MessageReceived`, which comes from the mailbox.
async fn baseline_message(server: &Server, trial: usize) -> anyhow::Result<Duration> {
    let hole = Blackhole::open().await?;
    let mut alice = Node::spawn(server, &format!("alice-base-{trial}"), false).await?;
    let mut bob =
        Node::spawn_announcing(server, &format!("bob-base-{trial}"), true, vec![hole.addr]).await?;
    let (alice_direct, bob_direct) = tokio::try_join!(alice.reachability(), bob.reachability())?;
    anyhow::ensure!(!alice_direct, "{} reported itself dialable", alice.name());
    anyhow::ensure!(
        bob_direct,
        "{} was not published at the blackhole (no probe expected)",
        bob.name()
    );
    let (alice_name, bob_name) = (alice.name().to_owned(), bob.name().to_owned());

    let started = Instant::now();
    alice
        .node
        .send(&bob_name, "the first message")
        .await
        .with_context(|| format!("{alice_name} sends to {bob_name}"))?;
    loop {
        if let Event::MessageReceived { from, offline, .. } =
            next(&mut bob.events, &bob_name).await?
            && from == alice_name
        {
            anyhow::ensure!(
                offline,
                "{bob_name} got the message from {alice_name} directly, not from the mailbox"
            );
            break;
        }
    }
    let took = started.elapsed();
    loop {
        match next(&mut alice.events, &alice_name).await? {
            Event::StoredOffline { .. } => break,
            Event::Delivered { to, .. } => {
                anyhow::bail!("{alice_name}'s message to {to} was delivered, not stored")
            }
            Event::SendFailed { to, reason, .. } => {
                anyhow::bail!("{alice_name}'s message to {to} failed: {reason}")
            }
            Event::Lagged { missed } => {
                anyhow::bail!("{alice_name}'s event reader lagged and missed {missed} events")
            }
            _ => {}
        }
    }
    let accepted = hole.accepted.load(Ordering::Relaxed);
    anyhow::ensure!(
        accepted > 0,
        "{alice_name} never connected to the blackhole {}",
        hole.addr
    );
    anyhow::ensure!(
        took >= HANDSHAKE_TIMEOUT,
        "the message arrived after {took:?}, before the {HANDSHAKE_TIMEOUT:?} handshake \
         timeout: not the old way"
    );
    alice.shutdown().await?;
    bob.shutdown().await?;
    drop(hole);
    Ok(took)
}

/// One result line of part 1.
fn first_message_line(label: &str, times: &mut [Duration], after: &str) -> Duration {
    let (p50, p99) = (percentile(times, 0.50), percentile(times, 0.99));
    println!(
        "  {label:<36} p50 {:>9}  p99 {:>9}  min {:>9}  max {:>9}  {after}",
        millis(p50),
        millis(p99),
        millis(times.first().copied().unwrap_or_default()),
        millis(times.last().copied().unwrap_or_default()),
    );
    p50
}

async fn first_messages(
    server: &Server,
    trials: usize,
    baseline_trials: usize,
) -> anyhow::Result<()> {
    println!("first message to an undialable peer ({trials} trials each, fresh nodes and names):");
    let mut met = Vec::new();
    let mut p50s = Vec::new();
    for (alice_dialable, label, expected) in [
        (true, "(a) connect-back (alice dialable)", PeerPath::Direct),
        (false, "(b) relay (neither dialable)", PeerPath::Relayed),
    ] {
        let mut times = Vec::with_capacity(trials);
        let mut paths = Vec::with_capacity(trials);
        for trial in 0..trials {
            let (took, path) = first_message(server, trial, alice_dialable)
                .await
                .with_context(|| format!("{label}, trial {trial}"))?;
            times.push(took);
            paths.push(path);
        }
        let unexpected = paths.iter().filter(|p| **p != Some(expected)).count();
        let p50 = first_message_line(
            label,
            &mut times,
            &format!(
                "path after: {}{}",
                paths_seen(&paths),
                if unexpected == 0 {
                    String::new()
                } else {
                    format!("  (expected {expected:?}: {unexpected} trials were not)")
                }
            ),
        );
        met.push((label, p50 < FIRST_MESSAGE_TARGET));
        p50s.push(p50);
    }
    if baseline_trials > 0 {
        let label = "(c) baseline: the old way";
        let baseline = Server::baseline().await.context("the baseline server")?;
        println!(
            "  {label}: {baseline_trials} trials, fresh nodes and names, against a second \
             server on {} (no reachability probe, no relay); alice not dialable, bob published \
             at a blackhole",
            baseline.addr
        );
        let mut times = Vec::with_capacity(baseline_trials);
        for trial in 0..baseline_trials {
            let took = baseline_message(&baseline, trial)
                .await
                .with_context(|| format!("{label}, trial {trial}"))?;
            times.push(took);
        }
        baseline.stop().await.context("the baseline server")?;
        let p50 = first_message_line(
            label,
            &mut times,
            &format!("via the mailbox x{baseline_trials} (offline, StoredOffline)"),
        );
        let ratio = |other: Duration| p50.as_secs_f64() / other.as_secs_f64();
        println!(
            "speed-up p50: baseline/connect-back = {:.1}, baseline/relay = {:.1}",
            ratio(p50s[0]),
            ratio(p50s[1])
        );
    }
    for (label, ok) in met {
        println!(
            "  target p50 < {} ms, {label}: {}",
            FIRST_MESSAGE_TARGET.as_millis(),
            if ok { "met" } else { "NOT met" }
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 2. Relayed beside direct.

/// A long-lived pair: alice sends, bob's application reads every message as it arrives.
struct Pair {
    alice: Node,
    bob_name: String,
    bob: ChatNode,
    /// Messages bob's application has read so far.
    received: watch::Receiver<u64>,
    _bob_reader: AbortOnDropHandle<()>,
    _bob_dir: tempfile::TempDir,
}

impl Pair {
    async fn start(server: &Server, label: &str, dialable: bool) -> anyhow::Result<Self> {
        let mut alice = Node::spawn(server, &format!("{label}-alice"), dialable).await?;
        let mut bob = Node::spawn(server, &format!("{label}-bob"), dialable).await?;
        let (a, b) = tokio::try_join!(alice.reachability(), bob.reachability())?;
        anyhow::ensure!(
            a == dialable && b == dialable,
            "{label}: the nodes reported direct={a} and {b}, expected {dialable}"
        );
        let Node {
            node,
            events: mut bob_events,
            _dir: bob_dir,
        } = bob;
        let (count, received) = watch::channel(0u64);
        let bob_reader = AbortOnDropHandle::new(tokio::spawn(async move {
            let mut n = 0;
            while let Some(event) = bob_events.next().await {
                if let Event::MessageReceived { .. } = event {
                    n += 1;
                    count.send_replace(n);
                }
            }
        }));
        let mut pair = Self {
            alice,
            bob_name: node.username().to_owned(),
            bob: node,
            received,
            _bob_reader: bob_reader,
            _bob_dir: bob_dir,
        };
        // Open the connection before measuring, and check which way it went.
        pair.round_trip("warm up").await.context("warm up")?;
        let expected = if dialable {
            PeerPath::Direct
        } else {
            PeerPath::Relayed
        };
        let path = pair.alice.node.path(&pair.bob_name);
        anyhow::ensure!(
            path == Some(expected),
            "{label}: alice is connected to bob by {path:?}, expected {expected:?}"
        );
        Ok(pair)
    }

    /// `n` messages pipelined: until alice has every ack and bob has read every message.
    async fn throughput(&mut self, body: &str, n: usize) -> anyhow::Result<Duration> {
        let target = *self.received.borrow() + n as u64;
        let started = Instant::now();
        let (alice, to, body) = (
            self.alice.node.clone(),
            self.bob_name.clone(),
            body.to_owned(),
        );
        let sending = AbortOnDropHandle::new(tokio::spawn(async move {
            for _ in 0..n {
                alice.send(&to, &body).await?;
            }
            anyhow::Ok(())
        }));
        let name = self.alice.node.username().to_owned();
        let acks = delivered(&mut self.alice.events, &name, n);
        let read = bob_read(&mut self.received, &self.bob_name, target);
        tokio::try_join!(acks, read)?;
        let took = started.elapsed();
        sending.await.context("the sending task")??;
        Ok(took)
    }

    /// One message: send, wait for its ack.
    async fn round_trip(&mut self, body: &str) -> anyhow::Result<Duration> {
        let target = *self.received.borrow() + 1;
        let started = Instant::now();
        self.alice
            .node
            .send(&self.bob_name, body)
            .await
            .context("send")?;
        let name = self.alice.node.username().to_owned();
        delivered(&mut self.alice.events, &name, 1).await?;
        let took = started.elapsed();
        // Bob's application has read it (it was in his inbox before the ack).
        bob_read(&mut self.received, &self.bob_name, target).await?;
        Ok(took)
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.alice.shutdown().await?;
        self.bob
            .shutdown()
            .await
            .with_context(|| format!("shut {} down", self.bob_name))
    }
}

/// Waits until bob's application has read `target` messages in all.
async fn bob_read(
    received: &mut watch::Receiver<u64>,
    bob: &str,
    target: u64,
) -> anyhow::Result<()> {
    let mut last = *received.borrow();
    while last < target {
        tokio::time::timeout(WAIT, received.changed())
            .await
            .with_context(|| format!("{bob} read nothing for {WAIT:?} ({last} of {target})"))?
            .with_context(|| format!("{bob}'s event stream ended"))?;
        last = *received.borrow();
    }
    Ok(())
}

/// What one side measured at one size.
#[derive(Default)]
struct Figures {
    rates: Vec<f64>,
    rtts: Vec<Duration>,
}

impl Figures {
    fn rate(&self) -> f64 {
        median(self.rates.clone())
    }

    fn p50(&mut self) -> Duration {
        percentile(&mut self.rtts, 0.50)
    }

    fn p99(&mut self) -> Duration {
        percentile(&mut self.rtts, 0.99)
    }
}

async fn relayed_beside_direct(server: &Server, args: &Args) -> anyhow::Result<()> {
    println!(
        "relayed beside direct: {} rounds per size, alternating; {} messages per throughput \
         run, {} round trips per round",
        args.rounds, args.messages, args.round_trips
    );
    let direct = Pair::start(server, "direct", true)
        .await
        .context("the direct pair")?;
    let relayed = Pair::start(server, "relayed", false)
        .await
        .context("the relayed pair")?;
    println!(
        "  paths: direct pair {:?}, relayed pair {:?}; relays open on the server: {}",
        direct.alice.node.path(&direct.bob_name),
        relayed.alice.node.path(&relayed.bob_name),
        server.directory.open_relays()
    );
    let mut sides = [
        ("direct  (both dialable)", direct),
        ("relayed (neither dialable)", relayed),
    ];
    for &size in &args.sizes {
        let body = "x".repeat(size);
        let mut figures = [Figures::default(), Figures::default()];
        for _ in 0..args.rounds {
            for ((label, pair), figures) in sides.iter_mut().zip(&mut figures) {
                let took = pair
                    .throughput(&body, args.messages)
                    .await
                    .with_context(|| format!("{label}: throughput at {size} B"))?;
                figures
                    .rates
                    .push(args.messages as f64 / took.as_secs_f64());
            }
            for _ in 0..args.round_trips {
                for ((label, pair), figures) in sides.iter_mut().zip(&mut figures) {
                    let took = pair
                        .round_trip(&body)
                        .await
                        .with_context(|| format!("{label}: round trip at {size} B"))?;
                    figures.rtts.push(took);
                }
            }
        }
        println!("size {size} B:");
        for ((label, _), figures) in sides.iter().zip(&mut figures) {
            println!(
                "  {label:<28} {:>10.0} msg/s   round trip p50 {:>9}  p99 {:>9}",
                figures.rate(),
                micros(figures.p50()),
                micros(figures.p99())
            );
        }
        let [d, r] = &mut figures;
        let (rate_ratio, rtt_ratio) = (
            r.rate() / d.rate(),
            r.p50().as_secs_f64() / d.p50().as_secs_f64(),
        );
        println!(
            "ratio {size}: relayed/direct throughput = {rate_ratio:.2}, rtt p50 relayed/direct = \
             {rtt_ratio:.2}"
        );
        if size == 64 {
            println!(
                "  target relayed >= {:.0} msg/s at 64 B: {}",
                RELAYED_RATE_TARGET,
                if r.rate() >= RELAYED_RATE_TARGET {
                    "met"
                } else {
                    "NOT met"
                }
            );
        }
        println!(
            "  target relayed rtt p50 <= 2x direct: {}",
            if rtt_ratio <= 2.0 { "met" } else { "NOT met" }
        );
    }
    for (_, pair) in sides {
        pair.stop().await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

fn percentile(xs: &mut [Duration], p: f64) -> Duration {
    xs.sort();
    let i = ((xs.len().saturating_sub(1)) as f64 * p).round() as usize;
    xs.get(i).copied().unwrap_or_default()
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Everything is driven from a runtime worker, as an application's tasks would be, not
    // from the main thread's `block_on` (whose wake-ups go through a condition variable).
    tokio::spawn(run(args)).await?
}

async fn run(args: Args) -> anyhow::Result<()> {
    let server = Server::start().await?;
    println!(
        "discovery server on {} (redb in a temporary directory; per-relay byte budget lifted, \
         default {} B/s)",
        server.addr,
        Config::default().relay_bytes_per_second
    );
    if args.trials > 0 {
        first_messages(&server, args.trials, args.baseline_trials).await?;
    }
    if args.rounds > 0 && !args.sizes.is_empty() {
        relayed_beside_direct(&server, &args).await?;
    }
    server.stop().await
}
