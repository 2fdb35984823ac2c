//! The directory: the state a server's sessions share (sessions here, watchers, limits,
//! mailboxes, the operator key), behind methods, and the tasks that relay presence changes
//! and announcements to the sessions and sweep expired presence.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use p2pchat_core::announce::AnnouncementGuard;
use p2pchat_core::error::chain;
use p2pchat_core::limits::ConnectionLimits;
use p2pchat_core::protocol::discovery::{Push, WireError};
use p2pchat_core::store::MAX_MESSAGE_TTL;
use p2pchat_core::{Announcement, Identity, PublicKey};
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::limits::KeyedRate;
use crate::mail::{Mail, storage_error};
use crate::relay::Relays;
use crate::storage::{PresenceChange, SessionId, Signal, Storage};

/// How often the registration rate limiter forgets idle addresses.
const RATE_LIMITER_CLEANUP: Duration = Duration::from_secs(60);

/// A session's entry in the server's tables.
#[derive(Debug)]
struct LocalSession {
    id: SessionId,
    /// Woken when the same user may have registered again (here or on another instance).
    /// A hint only: the session asks the storage, whose last `set_online` wins, so two
    /// racing registrations never both lose.
    check: Arc<Notify>,
    /// Its push queue, for announcements, connect-back requests and relay offers.
    pushes: mpsc::Sender<Push>,
    /// It registered with `RegisterReachable`: it understands connect-back and relay pushes.
    reach: bool,
}

/// The directory: what a server's sessions share, behind methods. Its configuration and
/// storage, the connection and registration limits, the mailboxes with their rules, who is
/// connected here and who watches whom, and the relay of presence changes and
/// announcements to them.
#[derive(Debug)]
pub struct Directory {
    pub(crate) config: Config,
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) connections: Arc<ConnectionLimits>,
    pub(crate) registrations: KeyedRate<IpAddr>,
    /// New names claimed per address and hour.
    pub(crate) new_claims: KeyedRate<IpAddr>,
    /// Lookups and listing pages per address.
    pub(crate) lookups: KeyedRate<IpAddr>,
    /// Watch entries held here, all sessions together.
    watch_count: std::sync::atomic::AtomicUsize,
    /// The mailboxes, with the deposit rules.
    pub(crate) mail: Mail,
    /// The operator key's public half, if the server has one.
    pub(crate) operator_key: Option<PublicKey>,
    /// Announcements relayed recently (no replays through this server, whichever way they
    /// come: an operator's connection or the Redis channel), seeded at start from the
    /// storage's record, so a restart does not relay one again.
    announced: Mutex<AnnouncementGuard>,
    /// watched username → watching sessions here → their push queues.
    watchers: Mutex<HashMap<String, HashMap<SessionId, mpsc::Sender<Push>>>>,
    /// username → the session registered here.
    sessions: Mutex<HashMap<String, LocalSession>>,
    /// The relays this instance holds.
    pub(crate) relays: Relays,
    /// Connect-back and relay requests per user.
    pub(crate) reach_requests: KeyedRate<String>,
    /// Connect-back requests per target user.
    pub(crate) connect_backs: KeyedRate<String>,
    /// Reachability probes under way at once, across registrations.
    pub(crate) probes: tokio::sync::Semaphore,
    /// Where this instance listens (set by [`crate::serve`]).
    listen_addr: OnceLock<SocketAddr>,
}

impl Directory {
    /// A directory over `storage`.
    pub fn new(config: Config, storage: impl Storage) -> Arc<Self> {
        Self::with_storage(config, Arc::new(storage))
    }

    /// A directory over shared `storage`.
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
            mail: Mail::new(
                storage.clone(),
                config.deposits_per_second_per_user,
                config.message_ttl.min(MAX_MESSAGE_TTL),
            ),
            new_claims: KeyedRate::per_hour(config.new_claims_per_hour_per_ip),
            lookups: KeyedRate::new(
                config.lookups_per_second_per_ip,
                config.lookups_per_second_per_ip.saturating_mul(2),
            ),
            watch_count: std::sync::atomic::AtomicUsize::new(0),
            reach_requests: KeyedRate::new(
                config.reach_requests_per_second_per_user,
                config.reach_requests_per_second_per_user.saturating_mul(2),
            ),
            connect_backs: KeyedRate::new(
                config.reach_requests_per_second_per_user,
                config.reach_requests_per_second_per_user.saturating_mul(2),
            ),
            relays: Relays::default(),
            probes: tokio::sync::Semaphore::new(crate::config::MAX_PROBES_IN_FLIGHT),
            listen_addr: OnceLock::new(),
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
        self.sessions.lock().len()
    }

    /// Relays open on this instance now (joined, or waiting for their sides).
    pub fn open_relays(&self) -> usize {
        self.relays.open_count()
    }

    /// Records where this instance listens (the default relay address).
    pub(crate) fn set_listen_addr(&self, addr: SocketAddr) {
        let _ = self.listen_addr.set(addr);
    }

    /// Where nodes of other instances join this instance's relays: the configured address,
    /// or the listening address when it is a specific one.
    pub(crate) fn relay_addr(&self) -> Option<SocketAddr> {
        self.config.relay_addr.or_else(|| {
            self.listen_addr
                .get()
                .copied()
                .filter(|a| !a.ip().is_unspecified())
        })
    }

    /// Whether `username`'s session is here and takes connect-back and relay pushes
    /// (`None`: not registered here).
    pub(crate) fn takes_pushes(&self, username: &str) -> Option<bool> {
        self.sessions.lock().get(username).map(|s| s.reach)
    }

    /// Pushes `push` to `username`'s session, here or (through the storage) on the instance
    /// that holds it.
    pub(crate) async fn signal(&self, username: &str, push: Push) -> Result<(), WireError> {
        let local = self
            .sessions
            .lock()
            .get(username)
            .map(|s| (s.reach, s.pushes.clone()));
        match local {
            Some((false, _)) => Err(WireError::Forbidden(format!(
                "{username}'s node does not take connect-back requests or relays (an older version)"
            ))),
            Some((true, pushes)) => pushes.try_send(push).map_err(|_| {
                WireError::LimitExceeded(format!("{username}'s session is not keeping up"))
            }),
            None => match self.storage.online(username).await {
                Ok(Some(_)) => {
                    let signal = Signal {
                        to: username.to_owned(),
                        push,
                    };
                    self.storage
                        .publish_signal(&signal)
                        .await
                        .map_err(storage_error)
                }
                Ok(None) => Err(WireError::Forbidden(format!("{username} is not online"))),
                Err(e) => Err(storage_error(e)),
            },
        }
    }

    /// Delivers a signal from another instance to its session, if it is here.
    fn deliver(&self, signal: Signal) {
        let sessions = self.sessions.lock();
        if let Some(session) = sessions.get(&signal.to)
            && session.reach
            && session.pushes.try_send(signal.push).is_err()
        {
            tracing::debug!(user = %signal.to, "push queue full; signal dropped");
        }
    }

    /// Records `username`'s new session here; an older one is told to check whether it was
    /// replaced. Returns the new session's check signal.
    pub(crate) fn add_session(
        &self,
        username: &str,
        id: SessionId,
        pushes: mpsc::Sender<Push>,
        reach: bool,
    ) -> Arc<Notify> {
        let check = Arc::new(Notify::new());
        let old = self.sessions.lock().insert(
            username.to_owned(),
            LocalSession {
                id,
                check: check.clone(),
                pushes,
                reach,
            },
        );
        if let Some(old) = old {
            old.check.notify_one();
        }
        check
    }

    /// Forgets `username`'s session `id` (if it is still the current one).
    pub(crate) fn remove_session(&self, username: &str, id: SessionId) {
        let mut sessions = self.sessions.lock();
        if sessions.get(username).is_some_and(|s| s.id == id) {
            sessions.remove(username);
        }
    }

    /// Adds a watch of `target` by session `id`; `false` when the server holds
    /// [`Config::max_total_watches`] already.
    pub(crate) fn watch(&self, target: &str, id: SessionId, pushes: mpsc::Sender<Push>) -> bool {
        use std::sync::atomic::Ordering;
        let max = self.config.max_total_watches;
        let taken = self
            .watch_count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        if taken.is_err() {
            return false;
        }
        let replaced = self
            .watchers
            .lock()
            .entry(target.to_owned())
            .or_default()
            .insert(id, pushes);
        if replaced.is_some() {
            self.watch_count.fetch_sub(1, Ordering::AcqRel);
        }
        true
    }

    /// Watches held on this instance now.
    pub fn watches(&self) -> usize {
        self.watch_count.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn unwatch(&self, target: &str, id: SessionId) {
        let mut watchers = self.watchers.lock();
        if let Some(w) = watchers.get_mut(target) {
            if w.remove(&id).is_some() {
                self.watch_count
                    .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            }
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
                if let Some(local) = self.sessions.lock().get(&username)
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
        if let Some(watching) = self.watchers.lock().get(&username) {
            for (id, pushes) in watching {
                if pushes.try_send(push.clone()).is_err() {
                    // Presence is a hint: a client that does not keep up re-resolves later.
                    tracing::debug!(session = %id, user = %username, "push queue full; dropped");
                }
            }
        }
    }

    /// Checks an announcement submitted to this server: signed by its operator key, fresh,
    /// not relayed before (by this instance, before or since its last start).
    pub(crate) fn admit_announcement(&self, a: &Announcement) -> Result<(), WireError> {
        let Some(operator) = self.operator_key else {
            return Err(WireError::Forbidden(
                "this server has no operator key; it relays no announcements".into(),
            ));
        };
        self.announced
            .lock()
            .admit(a, &operator, SystemTime::now())
            .map_err(|e| WireError::Forbidden(format!("announcement refused: {e}")))
    }

    /// Loads the announcements this server (or another instance sharing its storage)
    /// relayed recently, so none of them is relayed again after a restart.
    pub(crate) async fn load_announced(&self) {
        let max_age = p2pchat_core::announce::ANNOUNCEMENT_MAX_AGE;
        let since = crate::storage::unix_ms(SystemTime::now() - max_age);
        match self.storage.recent_announcements(since).await {
            Ok(recent) => {
                let mut guard = self.announced.lock();
                let seen: Vec<(String, u64)> = guard
                    .seen()
                    .map(|(id, at)| (id.clone(), *at))
                    .chain(recent)
                    .collect();
                *guard = AnnouncementGuard::with_seen(seen);
            }
            Err(e) => {
                tracing::warn!(error = %chain(&e), "cannot read the announcements relayed before")
            }
        }
    }

    /// Records a relayed announcement in the storage, for the next start.
    pub(crate) async fn record_announced(&self, a: &Announcement) {
        if let Err(e) = self
            .storage
            .record_announcement(&a.id, a.issued_at_ms)
            .await
        {
            tracing::warn!(id = %a.id, error = %chain(&e), "cannot record a relayed announcement");
        }
    }

    /// Sends an announcement to every session registered here; returns how many.
    pub(crate) fn relay(&self, a: &Announcement) -> u64 {
        let sessions = self.sessions.lock();
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

    /// Relays an announcement from the feed (another instance's, or anything published on
    /// the Redis channel) under the same guard as a submitted one: signed by the operator
    /// key, fresh, not relayed here before (this instance's own submissions come back on the
    /// feed and are dropped here: they were relayed when submitted). `None`: dropped.
    fn relay_from_feed(&self, a: &Announcement) -> Option<u64> {
        match self.admit_announcement(a) {
            Ok(()) => Some(self.relay(a)),
            Err(e) => {
                tracing::debug!(id = %a.id, reason = %e, "not relaying an announcement");
                None
            }
        }
    }

    pub(crate) async fn dispatch_loop(
        self: Arc<Self>,
        mut feed: broadcast::Receiver<PresenceChange>,
        mut announcements: broadcast::Receiver<Announcement>,
        mut signals: broadcast::Receiver<Signal>,
        stop: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                signal = signals.recv() => match signal {
                    Ok(signal) => self.deliver(signal),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "signal feed lagged; some connect-backs or relay offers were not sent");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                a = announcements.recv() => match a {
                    Ok(a) => {
                        if let Some(sent) = self.relay_from_feed(&a) {
                            tracing::info!(id = %a.id, sessions = sent, "announcement relayed");
                            self.record_announced(&a).await;
                        }
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

    pub(crate) async fn sweep_loop(self: Arc<Self>, stop: CancellationToken) {
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
                        tracing::warn!(error = %chain(&e), "presence sweep failed");
                    }
                }
                _ = cleanup.tick() => {
                    self.registrations.forget_idle();
                    self.mail.forget_idle();
                    self.reach_requests.forget_idle();
                    self.new_claims.forget_idle();
                    self.lookups.forget_idle();
                    self.connect_backs.forget_idle();
                }
            }
        }
    }
}
