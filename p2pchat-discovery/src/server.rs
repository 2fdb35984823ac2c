//! The server: its configuration, the state its sessions share, and the accept loop.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use p2pchat_core::discovery::{DEFAULT_CLAIM_LAPSE, DEFAULT_PRESENCE_TTL};
use p2pchat_core::protocol::discovery::Push;
use tokio::net::TcpListener;
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::limits::{ConnectionLimits, RegistrationRate};
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
}

/// The state shared by a server's sessions: configuration, storage, limits, and who is
/// connected here and watching whom.
#[derive(Debug)]
pub struct Server {
    pub(crate) config: Config,
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) connections: Arc<ConnectionLimits>,
    pub(crate) registrations: RegistrationRate,
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
            registrations: RegistrationRate::new(config.registrations_per_second_per_ip),
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
    pub(crate) fn add_session(&self, username: &str, id: SessionId) -> Arc<Notify> {
        let check = Arc::new(Notify::new());
        let old = lock(&self.sessions).insert(
            username.to_owned(),
            LocalSession {
                id,
                check: check.clone(),
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

    async fn dispatch_loop(
        self: Arc<Self>,
        mut feed: broadcast::Receiver<PresenceChange>,
        stop: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
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
                _ = cleanup.tick() => self.registrations.forget_idle(),
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
    tasks.spawn(server.clone().dispatch_loop(feed, stop.clone()));
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
