//! Load: 1,000 nodes in one process against one discovery server (the library's `serve`, on
//! its embedded redb store in a temporary directory), every peer link over TCP on 127.0.0.1.
//! Each node sends to random contacts while a fifth of the nodes shut down and come back (same
//! identity, same data directory), round after round. Every message is shown exactly once to
//! its recipient; messages sent to a node while it was down wait in the server mailbox and
//! arrive after it comes back, marked offline; the process's memory stays bounded.
//!
//! A test target of its own rather than a module of `tests`: the resident set size and the
//! open-file limit are per process, and other tests running in the same process would move
//! the first and compete for the second.

// Helpers outside `#[test]` functions too: in tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::StreamExt;
use p2pchat_core::node::NodeError;
use p2pchat_core::{ChatNode, DiscoveryClient, Event, Events, Identity, MessageId, TcpTransport};
use p2pchat_discovery::{Config, Directory, RedbStorage, serve};
use tokio::sync::Notify;

/// Nodes in the test.
const NODES: usize = 1_000;
/// Random pairings of the nodes: each gives every node one more contact, both ways, so each
/// node writes to (and hears from) this many random peers over one connection each. Every
/// new connection costs a handshake with two Ed25519 verifications (about 9 ms each in a
/// debug build), so this and [`ROUNDS`] set most of the test's time.
const CONTACTS: usize = 2;
/// Churn rounds: a fifth of the nodes shut down, then come back.
const ROUNDS: usize = 3;
/// Nodes taken down in each round.
const CHURN: usize = NODES / 5;
/// Messages sent to nodes that are down, per round, before they come back.
const TO_OFFLINE_PER_ROUND: usize = 300;
/// Messages per second the senders aim at during the rounds.
const RATE: u64 = 1_000;
/// Sends in progress at once.
const SENDS_IN_PROGRESS: usize = 256;
/// Nodes starting or stopping at once.
const SPAWNS_IN_PROGRESS: usize = 50;
/// Events buffered per node (a collector reads each node's stream all the time).
const EVENT_CAPACITY: usize = 512;
/// The longest any one phase may take.
const PHASE_TIMEOUT: Duration = Duration::from_secs(60);

fn name(i: usize) -> String {
    format!("n{i:04}")
}

fn index(name: &str) -> usize {
    name[1..].parse().unwrap()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Online,
    GoingDown,
    Offline,
    ComingUp,
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Delivered,
    Stored {
        /// The recipient's epoch when the store was reported.
        epoch: u64,
    },
    Failed,
}

#[derive(Debug)]
struct Sent {
    from: usize,
    to: usize,
    /// The recipient's epoch at the start of `send` if it was down then.
    to_offline_epoch: Option<u64>,
}

#[derive(Debug)]
struct Shown {
    by: usize,
    from: usize,
    offline: bool,
}

/// Everything counted, under one lock.
#[derive(Debug, Default)]
struct Tally {
    state: Vec<State>,
    /// Bumped when a node has finished going down and when it starts coming back, so a
    /// message sent in between can be told apart.
    epoch: Vec<u64>,
    sent: HashMap<MessageId, Sent>,
    /// `send` refused because the sender was shutting down (not sent).
    refused: usize,
    send_errors: Vec<String>,
    outcomes: HashMap<MessageId, Outcome>,
    extra_outcomes: usize,
    failures: Vec<String>,
    shown: HashMap<MessageId, Shown>,
    duplicated: usize,
    lagged: u64,
    errors: Vec<String>,
    /// Sent to a node while it was down, in this round, and not shown yet.
    round_offline_pending: HashSet<MessageId>,
    round_to_offline: usize,
}

impl Tally {
    fn summary(&self) -> String {
        let shown_sent = self
            .sent
            .keys()
            .filter(|id| self.shown.contains_key(id))
            .count();
        format!(
            "sent={} outcomes={} shown={} (of sent: {shown_sent}) duplicated={} failed={} \
             lagged={} round_offline_pending={}",
            self.sent.len(),
            self.outcomes.len(),
            self.shown.len(),
            self.duplicated,
            self.failures.len(),
            self.lagged,
            self.round_offline_pending.len()
        )
    }

    /// Every message sent has its outcome and every one not failed has been shown.
    fn settled(&self) -> bool {
        self.sent.iter().all(|(id, _)| match self.outcomes.get(id) {
            None => false,
            Some(Outcome::Failed) => true,
            Some(_) => self.shown.contains_key(id),
        })
    }
}

struct Net {
    server: SocketAddr,
    root: PathBuf,
    identities: Vec<Identity>,
    contacts: Vec<Vec<usize>>,
    nodes: Vec<Mutex<Option<ChatNode>>>,
    tally: Mutex<Tally>,
    changed: Notify,
    seq: AtomicU64,
    /// The tasks counting each node's events, one per life.
    collectors: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Net {
    fn tally(&self) -> MutexGuard<'_, Tally> {
        self.tally.lock().unwrap()
    }

    fn node(&self, i: usize) -> Option<ChatNode> {
        self.nodes[i].lock().unwrap().clone()
    }

    /// Waits until `cond` holds, re-checking after every counted event.
    async fn until(&self, what: &str, cond: impl Fn(&Tally) -> bool) {
        let deadline = tokio::time::Instant::now() + PHASE_TIMEOUT;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if cond(&self.tally()) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "{what}: not within {PHASE_TIMEOUT:?}; {}",
                    self.tally().summary()
                );
            }
        }
    }
}

/// Starts node `i` (again) and a task counting its events until its stream ends.
async fn spawn_node(net: &Arc<Net>, i: usize) {
    let node = ChatNode::builder()
        .identity(net.identities[i].clone())
        .username(name(i))
        .listen("127.0.0.1:0".parse().unwrap())
        .transport(TcpTransport::new())
        .discovery(
            DiscoveryClient::new(net.server.to_string())
                .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500)),
        )
        .data_dir(net.root.join(name(i)))
        .event_capacity(EVENT_CAPACITY)
        .spawn()
        .await
        .unwrap_or_else(|e| panic!("{} starts: {e}", name(i)));
    let events = node.events();
    *net.nodes[i].lock().unwrap() = Some(node);
    let collector = tokio::spawn(collect(net.clone(), i, events));
    net.collectors.lock().unwrap().push(collector);
}

async fn collect(net: Arc<Net>, me: usize, mut events: Events) {
    while let Some(event) = events.next().await {
        let mut t = net.tally();
        match event {
            Event::MessageReceived {
                id, from, offline, ..
            } => {
                let first = Shown {
                    by: me,
                    from: index(&from),
                    offline,
                };
                match t.shown.entry(id) {
                    std::collections::hash_map::Entry::Occupied(_) => t.duplicated += 1,
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(first);
                        t.round_offline_pending.remove(&id);
                    }
                }
            }
            Event::Delivered { id, .. } => record_outcome(&mut t, id, Outcome::Delivered),
            Event::StoredOffline { id, to } => {
                let epoch = t.epoch[index(&to)];
                record_outcome(&mut t, id, Outcome::Stored { epoch });
            }
            Event::SendFailed { id, to, reason } => {
                t.failures.push(format!("{} -> {to}: {reason}", name(me)));
                record_outcome(&mut t, id, Outcome::Failed);
            }
            Event::Lagged { missed } => t.lagged += missed,
            Event::Error { message } => t.errors.push(format!("{}: {message}", name(me))),
            _ => {}
        }
        drop(t);
        net.changed.notify_waiters();
    }
}

fn record_outcome(t: &mut Tally, id: MessageId, outcome: Outcome) {
    if t.outcomes.insert(id, outcome).is_some() {
        t.extra_outcomes += 1;
    }
}

/// One message from `from` to `to`, counted as sent only if `send` accepted it.
async fn send_one(net: Arc<Net>, from: usize, to: usize) {
    let Some(node) = net.node(from) else { return };
    let to_offline_epoch = {
        let t = net.tally();
        (t.state[to] == State::Offline).then_some(t.epoch[to])
    };
    let n = net.seq.fetch_add(1, Ordering::Relaxed);
    let result = node
        .send(&name(to), &format!("{} to {} #{n}", name(from), name(to)))
        .await;
    let mut t = net.tally();
    match result {
        Ok(id) => {
            if to_offline_epoch.is_some() && !t.shown.contains_key(&id) {
                t.round_offline_pending.insert(id);
            }
            if to_offline_epoch.is_some() {
                t.round_to_offline += 1;
            }
            t.sent.insert(
                id,
                Sent {
                    from,
                    to,
                    to_offline_epoch,
                },
            );
        }
        Err(NodeError::ShutDown) => t.refused += 1,
        Err(e) => t
            .send_errors
            .push(format!("{} -> {}: {e}", name(from), name(to))),
    }
    drop(t);
    net.changed.notify_waiters();
}

/// Sends from random online nodes to random contacts at [`RATE`] until `stop`.
async fn drive(net: Arc<Net>, stop: Arc<AtomicBool>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(SENDS_IN_PROGRESS));
    let tick = Duration::from_millis(10);
    let per_tick = (RATE / 100).max(1);
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sends = tokio::task::JoinSet::new();
    while !stop.load(Ordering::Relaxed) {
        ticks.tick().await;
        for _ in 0..per_tick {
            let from = rand::random_range(0..NODES);
            if net.tally().state[from] != State::Online {
                continue;
            }
            let to = net.contacts[from][rand::random_range(0..net.contacts[from].len())];
            let permit = permits.clone().acquire_owned().await.unwrap();
            let net = net.clone();
            sends.spawn(async move {
                send_one(net, from, to).await;
                drop(permit);
            });
        }
        while sends.try_join_next().is_some() {}
    }
    while let Some(joined) = sends.join_next().await {
        joined.unwrap();
    }
}

/// Resident set size of this process, in KiB (`VmRSS`, the resident pages of
/// `/proc/self/statm` in KiB).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn open_files() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Raises the open-file limit as far as allowed; returns the soft limit now in force.
fn raise_nofile(wanted: u64) -> u64 {
    use rlimit::Resource;
    let (soft, hard) = rlimit::getrlimit(Resource::NOFILE).unwrap();
    if soft >= wanted {
        return soft;
    }
    // Privileged: raise both. Otherwise up to the hard limit.
    if rlimit::setrlimit(Resource::NOFILE, wanted, wanted.max(hard)).is_err() {
        let _ = rlimit::setrlimit(Resource::NOFILE, wanted.min(hard), hard);
    }
    rlimit::getrlimit(Resource::NOFILE).unwrap().0
}

/// `n` distinct random indices below `NODES`.
fn sample(n: usize) -> Vec<usize> {
    let mut picked = HashSet::new();
    while picked.len() < n {
        picked.insert(rand::random_range(0..NODES));
    }
    picked.into_iter().collect()
}

/// [`CONTACTS`] random pairings of the nodes (a pair drawn twice counts once): the pairs, and
/// each node's contacts.
fn pairings() -> (Vec<(usize, usize)>, Vec<Vec<usize>>) {
    let mut pairs = HashSet::new();
    for _ in 0..CONTACTS {
        let mut order: Vec<usize> = (0..NODES).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rand::random_range(0..=i));
        }
        for two in order.chunks_exact(2) {
            pairs.insert((two[0].min(two[1]), two[0].max(two[1])));
        }
    }
    let mut contacts = vec![Vec::new(); NODES];
    for &(a, b) in &pairs {
        contacts[a].push(b);
        contacts[b].push(a);
    }
    (pairs.into_iter().collect(), contacts)
}

async fn start_all(net: &Arc<Net>, which: &[usize]) {
    futures::stream::iter(which.iter().copied())
        .map(|i| {
            let net = net.clone();
            async move { spawn_node(&net, i).await }
        })
        .buffer_unordered(SPAWNS_IN_PROGRESS)
        .collect::<Vec<()>>()
        .await;
}

async fn stop_all(net: &Arc<Net>, which: &[usize]) {
    futures::stream::iter(which.iter().copied())
        .map(|i| {
            let node = net.nodes[i].lock().unwrap().take();
            async move {
                if let Some(node) = node {
                    node.shutdown()
                        .await
                        .unwrap_or_else(|e| panic!("{} shuts down: {e}", name(i)));
                }
            }
        })
        .buffer_unordered(SPAWNS_IN_PROGRESS)
        .collect::<Vec<()>>()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_nodes_with_churn_show_every_message_once_in_bounded_memory() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let started = Instant::now();
    // Per node: its listener, its session (both ends), its node database (`node.lock`,
    // `node.redb`, the journal); per peer connection (one per pair of contacts): both ends.
    // Plus the server's redb file and some slack.
    let wanted = (NODES * (6 + CONTACTS) + 4_096) as u64;
    let limit = raise_nofile(wanted);
    assert!(
        limit >= wanted,
        "the test needs {wanted} open files; the limit is {limit} and cannot be raised"
    );

    // Thousands of small files: on a disk mounted with `discard` creating and deleting them
    // takes seconds, so they go to tmpfs when there is one. (The server's redb file too:
    // durability is not what this test is about.)
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::Builder::new()
            .prefix("p2pchat-load-")
            .tempdir_in(shm)
            .unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let config = Config {
        max_connections_per_ip: 4 * NODES,
        registrations_per_second_per_ip: 0,
        new_claims_per_hour_per_ip: 0,
        lookups_per_second_per_ip: 0,
        ..Config::default()
    };
    let storage = RedbStorage::open(&dir.path().join("server")).unwrap();
    let server = Directory::new(config, storage);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = listener.local_addr().unwrap();
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(serve(listener, server, async move {
        let _ = server_stopped.await;
    }));

    let (pairs, contacts) = pairings();
    let net = Arc::new(Net {
        server: server_addr,
        root: dir.path().join("nodes"),
        identities: (0..NODES).map(|_| Identity::generate()).collect(),
        contacts,
        nodes: (0..NODES).map(|_| Mutex::new(None)).collect(),
        tally: Mutex::new(Tally {
            state: vec![State::Online; NODES],
            epoch: vec![0; NODES],
            ..Tally::default()
        }),
        changed: Notify::new(),
        seq: AtomicU64::new(0),
        collectors: Mutex::new(Vec::new()),
    });
    let rss_start = rss_kib();

    // Warm-up: every node up, and one message across each pair of contacts (which opens the
    // pair's connection).
    let all: Vec<usize> = (0..NODES).collect();
    start_all(&net, &all).await;
    let spawned_in = started.elapsed();
    futures::stream::iter(pairs.iter().copied())
        .map(|(from, to)| send_one(net.clone(), from, to))
        .buffer_unordered(SENDS_IN_PROGRESS)
        .collect::<Vec<()>>()
        .await;
    net.until("warm-up messages shown", Tally::settled).await;
    let warm_sent = net.tally().sent.len();
    let warm_at = started.elapsed();
    let rss_warm = rss_kib();
    let fds_warm = open_files();
    println!(
        "load: {NODES} nodes up in {spawned_in:.1?}; warm-up of {warm_sent} messages done at \
         {warm_at:.1?}; RSS {rss_start} KiB at start, {rss_warm} KiB after warm-up; {fds_warm} \
         open files (limit {limit})"
    );

    // Rounds: senders keep going while a fifth of the nodes go down and come back.
    let stop = Arc::new(AtomicBool::new(false));
    let driver = tokio::spawn(drive(net.clone(), stop.clone()));
    let mut certainly_offline_total = 0;
    for round in 0..ROUNDS {
        let round_started = Instant::now();
        let victims = {
            let mut t = net.tally();
            t.round_to_offline = 0;
            t.round_offline_pending.clear();
            let victims = sample(CHURN);
            for &v in &victims {
                t.state[v] = State::GoingDown;
            }
            victims
        };
        stop_all(&net, &victims).await;
        {
            let mut t = net.tally();
            for &v in &victims {
                t.state[v] = State::Offline;
                t.epoch[v] += 1;
            }
        }
        net.changed.notify_waiters();
        let down_in = round_started.elapsed();
        net.until("messages to the nodes that are down", |t| {
            t.round_to_offline >= TO_OFFLINE_PER_ROUND
        })
        .await;
        {
            let mut t = net.tally();
            for &v in &victims {
                t.state[v] = State::ComingUp;
                t.epoch[v] += 1;
            }
        }
        let back_from = Instant::now();
        start_all(&net, &victims).await;
        {
            let mut t = net.tally();
            for &v in &victims {
                t.state[v] = State::Online;
            }
        }
        let up_in = back_from.elapsed();
        net.until("mail for the returning nodes shown", |t| {
            t.round_offline_pending.is_empty()
        })
        .await;
        let t = net.tally();
        certainly_offline_total += t.round_to_offline;
        println!(
            "load: round {round}: {CHURN} down in {down_in:.1?}, {} messages sent to them while \
             down, back up in {up_in:.1?}, their mail shown; round took {:.1?}; RSS {} KiB; {}",
            t.round_to_offline,
            round_started.elapsed(),
            rss_kib(),
            t.summary()
        );
    }
    stop.store(true, Ordering::Relaxed);
    driver.await.unwrap();
    net.until("every message settled", Tally::settled).await;
    let rss_end = rss_kib();
    let fds_end = open_files();
    let rounds_at = started.elapsed();

    // Everyone down: every stream ends, so nothing shown late escapes the count.
    stop_all(&net, &all).await;
    let collectors = std::mem::take(&mut *net.collectors.lock().unwrap());
    for c in collectors {
        c.await.unwrap();
    }
    let _ = stop_server.send(());
    serving.await.unwrap();

    let t = net.tally();
    let sent = t.sent.len();
    let shown_sent = t.sent.keys().filter(|id| t.shown.contains_key(*id)).count();
    let failed = t
        .outcomes
        .values()
        .filter(|o| matches!(o, Outcome::Failed))
        .count();
    let stored = t
        .outcomes
        .values()
        .filter(|o| matches!(o, Outcome::Stored { .. }))
        .count();
    let delivered = t
        .outcomes
        .values()
        .filter(|o| matches!(o, Outcome::Delivered))
        .count();
    let lost = t
        .sent
        .iter()
        .filter(|(id, _)| !matches!(t.outcomes.get(*id), Some(Outcome::Failed)))
        .filter(|(id, _)| !t.shown.contains_key(*id))
        .count();
    let unknown_shown = t.shown.keys().filter(|id| !t.sent.contains_key(id)).count();
    let misrouted = t
        .sent
        .iter()
        .filter(|(id, s)| {
            t.shown
                .get(*id)
                .is_some_and(|sh| sh.by != s.to || sh.from != s.from)
        })
        .count();
    let offline_shown = t.shown.values().filter(|s| s.offline).count();
    // Sent while the recipient was down, stored before it started coming back: these can
    // only have come through the mailbox.
    let certainly_offline: Vec<&MessageId> = t
        .sent
        .iter()
        .filter(|(id, s)| match (s.to_offline_epoch, t.outcomes.get(*id)) {
            (Some(at_send), Some(Outcome::Stored { epoch })) => *epoch == at_send,
            _ => false,
        })
        .map(|(id, _)| id)
        .collect();
    let certainly_offline_live = certainly_offline
        .iter()
        .filter(|id| t.shown.get(**id).is_some_and(|s| !s.offline))
        .count();
    let messages_in_rounds = sent - warm_sent;
    println!(
        "load: sent={sent} shown={shown_sent} lost={lost} duplicated={} (delivered={delivered} \
         stored={stored} failed={failed} refused_while_stopping={} send_errors={} \
         extra_outcomes={} shown_offline={offline_shown} sent_to_down_nodes={certainly_offline_total} \
         stored_while_down={} of_those_shown_live={certainly_offline_live} misrouted={misrouted} \
         unknown_shown={unknown_shown} lagged={})",
        t.duplicated,
        t.refused,
        t.send_errors.len(),
        t.extra_outcomes,
        certainly_offline.len(),
        t.lagged,
    );
    let growth = rss_end.saturating_sub(rss_warm);
    // What legitimately grows: this test's own books (an entry per message in `sent`,
    // `outcomes` and `shown`, about 200 bytes together), each recipient's window of seen ids
    // (about 50 bytes a message), the server's redb cache behind the mailbox traffic; and
    // memory the allocator keeps for reuse after hundreds of node restarts (a node is about
    // 200 KiB). The bound: 64 MiB for the last, 2 KiB a message (ten times the books) for the
    // rest. Measured on a 2-core machine: 20 to 22 MiB over 3 rounds (about 5,300 messages,
    // 600 restarts), 58 MiB over 10 rounds (18,500 messages, 2,000 restarts), growing more
    // slowly each round. The old node never freed at each restart (600 times about 200 KiB)
    // would cross it.
    let bound = 64 * 1024 + 2 * messages_in_rounds as u64;
    println!(
        "load: RSS after warm-up {rss_warm} KiB, after {ROUNDS} rounds {rss_end} KiB: growth \
         {growth} KiB for {messages_in_rounds} messages and {} restarts (bound {bound} KiB); \
         open files {fds_warm} -> {fds_end}; {} errors reported by nodes; rounds done at \
         {rounds_at:.1?}, all stopped at {:.1?}",
        ROUNDS * CHURN,
        t.errors.len(),
        started.elapsed()
    );
    for e in t.errors.iter().take(10) {
        println!("load: node error: {e}");
    }
    for e in t.failures.iter().chain(&t.send_errors).take(10) {
        println!("load: failure: {e}");
    }
    assert_eq!(lost, 0, "every message not reported failed is shown");
    assert_eq!(t.duplicated, 0, "no message shown twice");
    assert_eq!(failed, 0, "no send failed");
    assert!(t.send_errors.is_empty(), "{:?}", t.send_errors);
    assert_eq!(t.extra_outcomes, 0, "one outcome per message");
    assert_eq!(t.lagged, 0, "no event stream lagged");
    assert_eq!(misrouted, 0, "shown by its recipient, from its sender");
    assert_eq!(unknown_shown, 0, "nothing shown that was not sent");
    assert!(
        certainly_offline.len() >= ROUNDS * TO_OFFLINE_PER_ROUND / 2,
        "the rounds sent messages to nodes that were down"
    );
    assert_eq!(
        certainly_offline_live, 0,
        "mail for a node that was down arrives marked offline"
    );
    assert!(
        growth <= bound,
        "RSS grew by {growth} KiB, more than {bound} KiB"
    );
}
