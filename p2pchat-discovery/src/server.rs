//! The server: its configuration, the state its sessions share, and the accept loop.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use p2pchat_core::announce::AnnouncementGuard;
use p2pchat_core::discovery::{DEFAULT_CLAIM_LAPSE, DEFAULT_PRESENCE_TTL};
use p2pchat_core::limits::ConnectionLimits;
use p2pchat_core::protocol::discovery::{Push, WireError};
use p2pchat_core::{Announcement, Identity, PublicKey};
use tokio::net::TcpListener;
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::limits::KeyedRate;
use crate::session;
use crate::storage::{PresenceChange, SessionId, Storage};

/// Where the binary listens unless told otherwise (as the original).
pub const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:5001";

/// Most connections the server holds at once. Default: 20,000.
pub const MAX_CONNECTIONS: usize = 20_000;

/// Most connections from one IP address. Default: 256 (a NAT can hide many users).
pub const MAX_CONNECTIONS_PER_IP: usize = 256;

/// Registrations per second allowed from one IP address (bursts of twice as many).
/// Default: 20.
pub const REGISTRATIONS_PER_SECOND_PER_IP: u32 = 20;

/// Deposits per second allowed from one user into the mailboxes (bursts of
/// [`DEPOSIT_BURST`]). Default: 1,000.
pub const DEPOSITS_PER_SECOND_PER_USER: u32 = 1_000;

/// Deposits one user may make at once: a node that lost a peer stores everything it had in
/// flight in one go. Default: 10,000.
pub const DEPOSIT_BURST: u32 = 10_000;

/// How long a new connection may take to register. A client that trickles its bytes is cut
/// off when it runs out. Default: 5 s.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Presence pushes queued for one session before further ones are dropped. Default: 64.
pub const SESSION_PUSH_CAPACITY: usize = 64;

/// How long sessions get to close when the server shuts down. Default: 5 s.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Wait after a failed `accept` (out of descriptors, say) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// How often the registration rate limiter forgets idle addresses.
const RATE_LIMITER_CLEANUP: Duration = Duration::from_secs(60);

/// Limits and timings of a server. Every field has a named default.
#[derive(Debug, Clone)]
pub struct Config {
    /// A session without keep-alive for this long goes offline.
    /// By default, [`DEFAULT_PRESENCE_TTL`] (30 s).
    pub presence_ttl: Duration,
    /// A name whose owner has not been seen for this long may be claimed by another key.
    /// By default, [`DEFAULT_CLAIM_LAPSE`] (180 days).
    pub claim_lapse: Duration,
    /// Time allowed from accepting a connection to its registration.
    /// By default, [`HANDSHAKE_TIMEOUT`].
    pub handshake_timeout: Duration,
    /// A session that sends nothing at all for this long is closed.
    /// By default, three presence TTLs.
    pub idle_timeout: Duration,
    /// By default, [`MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// By default, [`MAX_CONNECTIONS_PER_IP`].
    pub max_connections_per_ip: usize,
    /// 0 means unlimited. By default, [`REGISTRATIONS_PER_SECOND_PER_IP`].
    pub registrations_per_second_per_ip: u32,
    /// 0 means unlimited. By default, [`DEPOSITS_PER_SECOND_PER_USER`].
    pub deposits_per_second_per_user: u32,
    /// The key that signs announcements. Nodes learn its public half at registration and
    /// pin it. By default, none: the server relays no announcements.
    pub operator: Option<Identity>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            presence_ttl: DEFAULT_PRESENCE_TTL,
            claim_lapse: DEFAULT_CLAIM_LAPSE,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            idle_timeout: DEFAULT_PRESENCE_TTL * 3,
            max_connections: MAX_CONNECTIONS,
            max_connections_per_ip: MAX_CONNECTIONS_PER_IP,
            registrations_per_second_per_ip: REGISTRATIONS_PER_SECOND_PER_IP,
            deposits_per_second_per_user: DEPOSITS_PER_SECOND_PER_USER,
            operator: None,
        }
    }
}

/// A session's entry in the server's tables.
#[derive(Debug)]
pub(crate) struct LocalSession {
    pub(crate) id: SessionId,
    /// Woken when the same user may have registered again (here or on another instance).
    /// A hint only: the session asks the storage, whose last `set_online` wins, so two
    /// racing registrations never both lose.
    pub(crate) check: Arc<Notify>,
    /// Its push queue, for announcements.
    pub(crate) pushes: mpsc::Sender<Push>,
}

/// The state shared by a server's sessions: configuration, storage, limits, and who is
/// connected here and watching whom.
#[derive(Debug)]
pub struct Server {
    pub(crate) config: Config,
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) connections: Arc<ConnectionLimits>,
    pub(crate) registrations: KeyedRate<IpAddr>,
    pub(crate) deposits: KeyedRate<String>,
    /// The operator key's public half, if the server has one.
    pub(crate) operator_key: Option<PublicKey>,
    /// Announcements relayed recently (no replays through this server).
    announced: Mutex<AnnouncementGuard>,
    /// watched username → watching sessions here → their push queues.
    watchers: Mutex<HashMap<String, HashMap<SessionId, mpsc::Sender<Push>>>>,
    /// username → the session registered here.
    sessions: Mutex<HashMap<String, LocalSession>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Server {
    /// A server over `storage`.
    pub fn new(config: Config, storage: impl Storage) -> Arc<Self> {
        Self::with_storage(config, Arc::new(storage))
    }

    /// A server over shared `storage`.
    pub fn with_storage(config: Config, storage: Arc<dyn Storage>) -> Arc<Self> {
        Arc::new(Self {
            connections: ConnectionLimits::new(
                config.max_connections,
                config.max_connections_per_ip,
            ),
            registrations: KeyedRate::new(
                config.registrations_per_second_per_ip,
                config.registrations_per_second_per_ip.saturating_mul(2),
            ),
            deposits: KeyedRate::new(config.deposits_per_second_per_user, DEPOSIT_BURST),
            operator_key: config.operator.as_ref().map(Identity::public_key),
            announced: Mutex::new(AnnouncementGuard::default()),
            config,
            storage,
            watchers: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Connections open now (registered or not).
    pub fn open_connections(&self) -> usize {
        self.connections.open_connections()
    }

    /// Sessions registered with this instance now.
    pub fn registered_sessions(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// Records `username`'s new session here; an older one is told to check whether it was
    /// replaced. Returns the new session's check signal.
    pub(crate) fn add_session(
        &self,
        username: &str,
        id: SessionId,
        pushes: mpsc::Sender<Push>,
    ) -> Arc<Notify> {
        let check = Arc::new(Notify::new());
        let old = lock(&self.sessions).insert(
            username.to_owned(),
            LocalSession {
                id,
                check: check.clone(),
                pushes,
            },
        );
        if let Some(old) = old {
            old.check.notify_one();
        }
        check
    }

    /// Forgets `username`'s session `id` (if it is still the current one).
    pub(crate) fn remove_session(&self, username: &str, id: SessionId) {
        let mut sessions = lock(&self.sessions);
        if sessions.get(username).is_some_and(|s| s.id == id) {
            sessions.remove(username);
        }
    }

    pub(crate) fn watch(&self, target: &str, id: SessionId, pushes: mpsc::Sender<Push>) {
        lock(&self.watchers)
            .entry(target.to_owned())
            .or_default()
            .insert(id, pushes);
    }

    pub(crate) fn unwatch(&self, target: &str, id: SessionId) {
        let mut watchers = lock(&self.watchers);
        if let Some(w) = watchers.get_mut(target) {
            w.remove(&id);
            if w.is_empty() {
                watchers.remove(target);
            }
        }
    }

    /// Applies one presence change: replaces sessions of a user who registered elsewhere,
    /// and pushes the change to the sessions here that watch the user.
    fn dispatch(&self, change: PresenceChange) {
        let (username, push) = match change {
            PresenceChange::Online { username, session } => {
                if let Some(local) = lock(&self.sessions).get(&username)
                    && local.id != session
                {
                    local.check.notify_one();
                }
                let push = Push::PeerOnline {
                    username: username.clone(),
                };
                (username, push)
            }
            PresenceChange::Offline { username } => {
                let push = Push::PeerOffline {
                    username: username.clone(),
                };
                (username, push)
            }
        };
        if let Some(watching) = lock(&self.watchers).get(&username) {
            for (id, pushes) in watching {
                if pushes.try_send(push.clone()).is_err() {
                    // Presence is a hint: a client that does not keep up re-resolves later.
                    tracing::debug!(session = %id, user = %username, "push queue full; dropped");
                }
            }
        }
    }

    /// Checks an announcement submitted to this server: signed by its operator key, fresh,
    /// not relayed before.
    pub(crate) fn admit_announcement(&self, a: &Announcement) -> Result<(), WireError> {
        let Some(operator) = self.operator_key else {
            return Err(WireError::Forbidden(
                "this server has no operator key; it relays no announcements".into(),
            ));
        };
        lock(&self.announced)
            .admit(a, &operator, SystemTime::now())
            .map_err(|e| WireError::Forbidden(format!("announcement refused: {e}")))
    }

    /// Sends an announcement to every session registered here; returns how many.
    fn relay(&self, a: &Announcement) -> u64 {
        let sessions = lock(&self.sessions);
        let mut sent = 0;
        for (user, session) in sessions.iter() {
            match session
                .pushes
                .try_send(Push::Announcement(Box::new(a.clone())))
            {
                Ok(()) => sent += 1,
                Err(_) => tracing::debug!(%user, "push queue full; announcement dropped"),
            }
        }
        sent
    }

    /// Relays an announcement from the feed if the operator key signed it (on Redis anyone
    /// can publish on the channel; nodes check again with the key they pinned).
    fn relay_from_feed(&self, a: &Announcement) -> u64 {
        match self.operator_key.map(|key| a.verify(&key)) {
            Some(Ok(())) => self.relay(a),
            _ => {
                tracing::debug!(id = %a.id, "not relaying an announcement the operator did not sign");
                0
            }
        }
    }

    async fn dispatch_loop(
        self: Arc<Self>,
        mut feed: broadcast::Receiver<PresenceChange>,
        mut announcements: broadcast::Receiver<Announcement>,
        stop: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                a = announcements.recv() => match a {
                    Ok(a) => {
                        let sent = self.relay_from_feed(&a);
                        tracing::info!(id = %a.id, sessions = sent, "announcement relayed");
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "announcement feed lagged");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                change = feed.recv() => match change {
                    Ok(change) => self.dispatch(change),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "presence feed lagged; some pushes were not sent");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }

    async fn sweep_loop(self: Arc<Self>, stop: CancellationToken) {
        let every =
            (self.config.presence_ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut sweep = tokio::time::interval(every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cleanup = tokio::time::interval(RATE_LIMITER_CLEANUP);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = sweep.tick() => {
                    if let Err(e) = self.storage.sweep().await {
                        tracing::warn!(error = %e, "presence sweep failed");
                    }
                }
                _ = cleanup.tick() => {
                    self.registrations.forget_idle();
                    self.deposits.forget_idle();
                }
            }
        }
    }
}

/// Serves discovery sessions on `listener` until `shutdown` completes.
///
/// On shutdown it stops accepting, tells every session the server is going away (each
/// marks its user offline), and waits up to [`SHUTDOWN_GRACE`] for them to finish.
pub async fn serve(listener: TcpListener, server: Arc<Server>, shutdown: impl Future<Output = ()>) {
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    // Subscribe before the first session can register, so no change is missed.
    let feed = server.storage.presence_changes();
    let announcements = server.storage.announcements();
    tasks.spawn(
        server
            .clone()
            .dispatch_loop(feed, announcements, stop.clone()),
    );
    tasks.spawn(server.clone().sweep_loop(stop.clone()));
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving discovery sessions");
    }
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let span = tracing::info_span!("session", %peer);
                    tasks.spawn(session::run(server.clone(), stream, peer, stop.clone()).instrument(span));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    tracing::info!("shutting down");
    stop.cancel();
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("sessions still open after the shutdown grace period");
    }
}
