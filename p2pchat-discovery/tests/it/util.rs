//! Shared helpers: servers on 127.0.0.1, clients, storages, waiting for events.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use p2pchat_core::discovery::{DiscoveryEvent, Registration};
use p2pchat_core::testing::TestRedis;
use p2pchat_core::{Discovery, DiscoveryClient, DiscoverySession, Identity};
use p2pchat_discovery::{Config, Directory, RedbStorage, RedisStorage, Storage, serve};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// The longest any test waits for one thing to happen.
pub const WAIT: Duration = Duration::from_secs(15);

/// Presence TTL of the test servers.
pub const TTL: Duration = Duration::from_secs(1);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Short timings and no per-address caps (every test client comes from 127.0.0.1). No
/// reachability probe: nodes are published at the addresses they register (most tests
/// register made-up ports); the probe's own tests (`reach`) turn it on.
pub fn fast_config() -> Config {
    Config {
        presence_ttl: TTL,
        idle_timeout: Duration::from_secs(30),
        handshake_timeout: Duration::from_secs(2),
        max_connections_per_ip: 10_000,
        registrations_per_second_per_ip: 0,
        new_claims_per_hour_per_ip: 0,
        lookups_per_second_per_session: 0,
        lookups_per_second_per_ip: 0,
        probe_timeout: Duration::ZERO,
        ..Config::default()
    }
}

/// A server running `serve` on 127.0.0.1 in this runtime.
pub struct TestServer {
    pub addr: SocketAddr,
    pub server: Arc<Directory>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(config: Config, storage: Arc<dyn Storage>) -> Self {
        Self::start_at("127.0.0.1:0".parse().unwrap(), config, storage).await
    }

    pub async fn start_at(addr: SocketAddr, config: Config, storage: Arc<dyn Storage>) -> Self {
        init_tracing();
        let listener = TcpListener::bind(addr).await.expect("bind the test server");
        let addr = listener.local_addr().unwrap();
        let server = Directory::with_storage(config, storage);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, server.clone(), async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            server,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A client of this server that reconnects quickly.
    pub fn client(&self) -> DiscoveryClient {
        client(self.addr)
    }

    /// Hands a signed announcement to this server, as the operator's tool does.
    pub async fn announce(
        &self,
        announcement: &p2pchat_core::Announcement,
    ) -> Result<u64, p2pchat_discovery::RelayError> {
        p2pchat_discovery::relay_announcement(&self.addr.to_string(), announcement).await
    }

    /// Shuts the server down gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("server stops in time")
                .expect("server task");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

pub fn client(addr: SocketAddr) -> DiscoveryClient {
    DiscoveryClient::new(addr.to_string())
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(400))
        .request_timeout(Duration::from_secs(5))
}

pub fn redb(dir: &std::path::Path) -> Arc<dyn Storage> {
    Arc::new(RedbStorage::open(dir).expect("open redb"))
}

/// A Redis storage under a fresh key prefix (so tests sharing a Redis do not meet).
pub async fn redis_storage(url: &str) -> Arc<dyn Storage> {
    let prefix = format!("test{:016x}", rand::random::<u64>());
    Arc::new(
        RedisStorage::connect_with_prefix(url, &prefix)
            .await
            .expect("connect to redis"),
    )
}

pub fn redis() -> TestRedis {
    TestRedis::from_env_or_start()
}

pub fn registration(name: &str, port: u16) -> Registration {
    Registration {
        username: name.to_owned(),
        listen_port: port,
        announce: Vec::new(),
        dialable: true,
    }
}

/// Registers `name` with a fresh channel for its pushes.
pub async fn register(
    client: &DiscoveryClient,
    identity: &Identity,
    name: &str,
) -> (Box<dyn DiscoverySession>, mpsc::Receiver<DiscoveryEvent>) {
    let (tx, rx) = mpsc::channel(256);
    let session = client
        .register(identity, registration(name, 7000), tx)
        .await
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    (session, rx)
}

/// Waits for a presence push about `who`.
pub async fn expect_presence(rx: &mut mpsc::Receiver<DiscoveryEvent>, who: &str, online: bool) {
    tokio::time::timeout(WAIT, async {
        loop {
            match rx.recv().await.expect("push channel open") {
                DiscoveryEvent::PeerOnline { username } if username == who && online => return,
                DiscoveryEvent::PeerOffline { username } if username == who && !online => return,
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no push: {who} online={online}"));
}

/// Polls `lookup` until `who` has the wanted presence (used across a server restart, when
/// no session can watch).
pub async fn until_online(session: &dyn DiscoverySession, who: &str, online: bool) {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Some(r)) = session.lookup(who).await
                && r.online == online
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{who} never became online={online}"));
}

/// The texts of the messages already buffered in `events`, without waiting (unconstrained:
/// tokio's cooperative budget would otherwise report "pending" after 128 ready events).
pub fn buffered_texts(events: &mut p2pchat_core::Events) -> Vec<String> {
    use futures::{FutureExt, StreamExt};
    let mut out = Vec::new();
    while let Some(Some(event)) = tokio::task::unconstrained(events.next()).now_or_never() {
        if let p2pchat_core::Event::MessageReceived { text, .. } = event {
            out.push(text);
        }
    }
    out
}

/// Waits for the first event matching `pred`, failing the test after [`WAIT`].
pub async fn wait_event(
    events: &mut p2pchat_core::Events,
    mut pred: impl FnMut(&p2pchat_core::Event) -> bool,
) -> p2pchat_core::Event {
    use futures::StreamExt;
    tokio::time::timeout(WAIT, async {
        loop {
            let event = events.next().await.expect("events open");
            if pred(&event) {
                return event;
            }
        }
    })
    .await
    .expect("event in time")
}

/// Waits for how message `id` left the outbox: the first event about it that is not a step
/// on the way (`Queued`, first or after a failed attempt, and `Sent` are skipped).
pub async fn wait_outcome(
    events: &mut p2pchat_core::Events,
    id: p2pchat_core::MessageId,
) -> p2pchat_core::Event {
    use p2pchat_core::Event;
    wait_event(events, |e| match e {
        Event::Queued { .. } | Event::Sent { .. } => false,
        Event::Delivered { id: got, .. }
        | Event::StoredOffline { id: got, .. }
        | Event::Expired { id: got, .. }
        | Event::Cancelled { id: got, .. }
        | Event::SendFailed { id: got, .. } => *got == id,
        _ => false,
    })
    .await
}

pub use p2pchat_discovery::testing::DiscoveryProcess;

/// The real `p2pchat-discovery` binary of this build, started with `args` and `--data-dir`;
/// killed when dropped.
pub async fn discovery_process(data_dir: &Path, args: &[&str]) -> DiscoveryProcess {
    let binary = Path::new(env!("CARGO_BIN_EXE_p2pchat-discovery"));
    DiscoveryProcess::start(binary, data_dir, args)
        .await
        .expect("p2pchat-discovery starts")
}
