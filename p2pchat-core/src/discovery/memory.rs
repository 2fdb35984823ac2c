//! [`MemoryDiscovery`]: the directory held in memory, shared by every clone.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{
    DEFAULT_CLAIM_LAPSE, DEFAULT_PRESENCE_TTL, Discovery, DiscoveryError, DiscoveryEvent,
    DiscoverySession, MAX_PAGE_SIZE, Page, PeerRecord, Registration, RelayTicket,
};
use crate::identity::{Identity, PublicKey};
use crate::protocol::discovery::{RELAY_JOIN_TIMEOUT, RELAY_TOKEN_LEN};
use crate::protocol::validate_username;
use crate::transport::{Connection, MEMORY_PIPE_CAPACITY};

/// How often expired registrations are swept (and their watchers told).
const SWEEP_INTERVAL: Duration = Duration::from_millis(500);

/// An in-memory directory. Clones share it; each node registers through its own clone.
///
/// Peers are published at `127.0.0.1:<listen port>` unless they announce addresses, or
/// registered as not dialable (then nothing is published, and they are reached by
/// connect-back or relay: a relayed connection is an in-memory pipe, as a
/// [`crate::MemoryNetwork`] connection). Times use tokio's clock, so tests with a paused clock
/// control presence expiry.
#[derive(Debug, Clone)]
pub struct MemoryDiscovery {
    inner: Arc<Mutex<Directory>>,
}

#[derive(Debug)]
struct Directory {
    users: BTreeMap<String, Entry>,
    /// target → watching sessions.
    watchers: HashMap<String, HashMap<u64, mpsc::Sender<DiscoveryEvent>>>,
    next_session: u64,
    presence_ttl: Duration,
    claim_lapse: Duration,
    sweeper_started: bool,
    /// Relays opened and not joined yet: token → the joining side's end, and when.
    relays: HashMap<[u8; RELAY_TOKEN_LEN], (tokio::io::DuplexStream, Instant)>,
}

#[derive(Debug)]
struct Entry {
    public_key: PublicKey,
    addrs: Vec<SocketAddr>,
    /// The session currently holding the name (cleared when it deregisters or drops).
    session: Option<u64>,
    /// Whether watchers were last told this user is online.
    announced_online: bool,
    last_seen: Instant,
    last_seen_wall: SystemTime,
    /// The current session's event channel (for connect-back and relay offers).
    events: mpsc::Sender<DiscoveryEvent>,
}

impl Default for MemoryDiscovery {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryDiscovery {
    /// An empty directory with the default presence TTL and claim lapse.
    pub fn new() -> Self {
        Self::with_timeouts(DEFAULT_PRESENCE_TTL, DEFAULT_CLAIM_LAPSE)
    }

    /// An empty directory where users go offline after `presence_ttl` without keep-alive and
    /// names lapse after `claim_lapse` of inactivity.
    pub fn with_timeouts(presence_ttl: Duration, claim_lapse: Duration) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Directory {
                users: BTreeMap::new(),
                watchers: HashMap::new(),
                next_session: 1,
                presence_ttl,
                claim_lapse,
                sweeper_started: false,
                relays: HashMap::new(),
            })),
        }
    }
}

impl MemoryDiscovery {
    /// Publishes `addrs` for the online user `username` as if it had registered again with
    /// them (none: not dialable), telling the user ([`DiscoveryEvent::Reachability`]) and its
    /// watchers ([`DiscoveryEvent::PeerOnline`]): for tests where reachability changes.
    /// `false` when the user is not online.
    pub fn publish(&self, username: &str, addrs: Vec<SocketAddr>) -> bool {
        let mut dir = self.inner.lock();
        let now = Instant::now();
        let online = dir
            .users
            .get(username)
            .is_some_and(|e| dir.is_online(e, now));
        let Some(entry) = dir.users.get_mut(username).filter(|_| online) else {
            return false;
        };
        let dialable = !addrs.is_empty();
        entry.addrs = addrs;
        let _ = entry
            .events
            .try_send(DiscoveryEvent::Reachability { dialable });
        dir.notify(
            username,
            DiscoveryEvent::PeerOnline {
                username: username.to_owned(),
            },
        );
        true
    }
}

impl Directory {
    fn is_online(&self, entry: &Entry, now: Instant) -> bool {
        entry.session.is_some() && now.duration_since(entry.last_seen) < self.presence_ttl
    }

    fn record(&self, username: &str, entry: &Entry, now: Instant) -> PeerRecord {
        let online = self.is_online(entry, now);
        PeerRecord {
            username: username.to_owned(),
            public_key: entry.public_key,
            addrs: if online {
                entry.addrs.clone()
            } else {
                Vec::new()
            },
            online,
            last_seen: entry.last_seen_wall,
        }
    }

    fn notify(&self, username: &str, event: DiscoveryEvent) {
        if let Some(watchers) = self.watchers.get(username) {
            for tx in watchers.values() {
                // A node that does not drain its events loses presence hints, never data.
                let _ = tx.try_send(event.clone());
            }
        }
    }

    /// Marks expired sessions offline, telling their watchers, and drops lapsed claims.
    fn sweep(&mut self, now: Instant) {
        let ttl = self.presence_ttl;
        let lapse = self.claim_lapse;
        let mut gone = Vec::new();
        for (name, entry) in &mut self.users {
            if entry.announced_online && now.duration_since(entry.last_seen) >= ttl {
                entry.announced_online = false;
                gone.push(name.clone());
            }
        }
        self.users
            .retain(|_, e| now.duration_since(e.last_seen) < lapse);
        for username in gone {
            self.notify(
                &username,
                DiscoveryEvent::PeerOffline {
                    username: username.clone(),
                },
            );
        }
    }
}

async fn sweeper(dir: Weak<Mutex<Directory>>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tick.tick().await;
        let Some(dir) = dir.upgrade() else { return };
        dir.lock().sweep(Instant::now());
    }
}

#[async_trait]
impl Discovery for MemoryDiscovery {
    async fn register(
        &self,
        identity: &Identity,
        registration: Registration,
        events: mpsc::Sender<DiscoveryEvent>,
    ) -> Result<Box<dyn DiscoverySession>, DiscoveryError> {
        validate_username(&registration.username)?;
        // The same proof the network directory asks for: a signature over a fresh nonce.
        let nonce: [u8; 32] = rand::random();
        let public_key = identity.public_key();
        if !public_key.verify(&nonce, &identity.sign(&nonce)) {
            return Err(DiscoveryError::BadSignature);
        }
        let mut dir = self.inner.lock();
        let now = Instant::now();
        dir.sweep(now);
        if let Some(entry) = dir.users.get(&registration.username)
            && entry.public_key != public_key
        {
            return Err(DiscoveryError::NameTaken {
                username: registration.username,
            });
        }
        let session = dir.next_session;
        dir.next_session += 1;
        let addrs = if !registration.dialable {
            Vec::new()
        } else if registration.announce.is_empty() {
            vec![SocketAddr::new(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                registration.listen_port,
            )]
        } else {
            registration.announce
        };
        dir.users.insert(
            registration.username.clone(),
            Entry {
                public_key,
                addrs,
                session: Some(session),
                announced_online: true,
                last_seen: now,
                last_seen_wall: SystemTime::now(),
                events: events.clone(),
            },
        );
        let _ = events.try_send(DiscoveryEvent::Reachability {
            dialable: registration.dialable,
        });
        dir.notify(
            &registration.username,
            DiscoveryEvent::PeerOnline {
                username: registration.username.clone(),
            },
        );
        if !dir.sweeper_started {
            dir.sweeper_started = true;
            tokio::spawn(sweeper(Arc::downgrade(&self.inner)));
        }
        Ok(Box::new(MemorySession {
            dir: self.inner.clone(),
            username: registration.username,
            session,
            events,
            watching: Mutex::new(HashSet::new()),
            closed: Mutex::new(false),
        }))
    }
}

#[derive(Debug)]
struct MemorySession {
    dir: Arc<Mutex<Directory>>,
    username: String,
    session: u64,
    events: mpsc::Sender<DiscoveryEvent>,
    watching: Mutex<HashSet<String>>,
    closed: Mutex<bool>,
}

impl MemorySession {
    fn check_open(&self) -> Result<(), DiscoveryError> {
        if *self.closed.lock() {
            Err(DiscoveryError::Closed)
        } else {
            Ok(())
        }
    }

    /// Takes this session offline (if it is still the user's current one) and unwatches.
    fn close(&self) {
        let mut closed = self.closed.lock();
        if std::mem::replace(&mut *closed, true) {
            return;
        }
        let mut dir = self.dir.lock();
        let mut went_offline = false;
        if let Some(entry) = dir.users.get_mut(&self.username)
            && entry.session == Some(self.session)
        {
            entry.session = None;
            went_offline = std::mem::replace(&mut entry.announced_online, false);
        }
        for target in self.watching.lock().drain() {
            if let Some(w) = dir.watchers.get_mut(&target) {
                w.remove(&self.session);
                if w.is_empty() {
                    dir.watchers.remove(&target);
                }
            }
        }
        if went_offline {
            dir.notify(
                &self.username,
                DiscoveryEvent::PeerOffline {
                    username: self.username.clone(),
                },
            );
        }
    }
}

impl Drop for MemorySession {
    fn drop(&mut self) {
        self.close();
    }
}

#[async_trait]
impl DiscoverySession for MemorySession {
    async fn keep_alive(&self) -> Result<(), DiscoveryError> {
        self.check_open()?;
        let mut dir = self.dir.lock();
        let now = Instant::now();
        let Some(entry) = dir.users.get_mut(&self.username) else {
            return Err(DiscoveryError::Closed);
        };
        if entry.session != Some(self.session) {
            // Replaced by a newer registration of the same key elsewhere.
            return Err(DiscoveryError::Closed);
        }
        entry.last_seen = now;
        entry.last_seen_wall = SystemTime::now();
        // A session that missed its keep-alives but is still here comes back online.
        if !std::mem::replace(&mut entry.announced_online, true) {
            dir.notify(
                &self.username,
                DiscoveryEvent::PeerOnline {
                    username: self.username.clone(),
                },
            );
        }
        Ok(())
    }

    async fn lookup(&self, username: &str) -> Result<Option<PeerRecord>, DiscoveryError> {
        self.check_open()?;
        let dir = self.dir.lock();
        let now = Instant::now();
        Ok(dir.users.get(username).and_then(|entry| {
            (now.duration_since(entry.last_seen) < dir.claim_lapse)
                .then(|| dir.record(username, entry, now))
        }))
    }

    async fn list_online(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> Result<Page, DiscoveryError> {
        self.check_open()?;
        let limit = limit.clamp(1, MAX_PAGE_SIZE);
        let dir = self.dir.lock();
        let now = Instant::now();
        let range = match after.as_deref() {
            Some(after) => dir
                .users
                .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => dir.users.range::<str, _>(..),
        };
        let mut users: Vec<PeerRecord> = range
            .filter(|(_, e)| dir.is_online(e, now))
            .take(limit + 1)
            .map(|(name, e)| dir.record(name, e, now))
            .collect();
        let next = if users.len() > limit {
            users.truncate(limit);
            users.last().map(|u| u.username.clone())
        } else {
            None
        };
        Ok(Page { users, next })
    }

    async fn watch(&self, username: &str) -> Result<(), DiscoveryError> {
        self.check_open()?;
        if !self.dir.lock().users.contains_key(username) {
            return Err(DiscoveryError::Refused(format!(
                "nobody has the name '{username}': there is nothing to watch"
            )));
        }
        if self.watching.lock().insert(username.to_owned()) {
            self.dir
                .lock()
                .watchers
                .entry(username.to_owned())
                .or_default()
                .insert(self.session, self.events.clone());
        }
        Ok(())
    }

    async fn deregister(&self) -> Result<(), DiscoveryError> {
        self.check_open()?;
        self.close();
        Ok(())
    }

    async fn connect_back(&self, username: &str) -> Result<(), DiscoveryError> {
        self.check_open()?;
        let dir = self.dir.lock();
        let me = dir.users.get(&self.username);
        if me.is_none_or(|e| e.addrs.is_empty()) {
            return Err(DiscoveryError::Refused(
                "connect-back is for users who can be dialed".into(),
            ));
        }
        let target = self.online_target(&dir, username)?;
        let _ = target.events.try_send(DiscoveryEvent::ConnectBack {
            username: self.username.clone(),
        });
        Ok(())
    }

    async fn relay(&self, username: &str) -> Result<Connection, DiscoveryError> {
        self.check_open()?;
        let mut dir = self.dir.lock();
        let events = self.online_target(&dir, username)?.events.clone();
        let now = Instant::now();
        dir.relays
            .retain(|_, (_, at)| now.duration_since(*at) < RELAY_JOIN_TIMEOUT);
        let (ours, theirs) = tokio::io::duplex(MEMORY_PIPE_CAPACITY);
        let token: [u8; RELAY_TOKEN_LEN] = rand::random();
        dir.relays.insert(token, (theirs, now));
        let offer = DiscoveryEvent::RelayOffer {
            username: self.username.clone(),
            ticket: RelayTicket { token, addr: None },
        };
        if events.try_send(offer).is_err() {
            dir.relays.remove(&token);
            return Err(DiscoveryError::Refused(format!(
                "{username} is not taking relays now"
            )));
        }
        Ok(Connection::new(ours, relay_addr()))
    }

    async fn join_relay(&self, ticket: &RelayTicket) -> Result<Connection, DiscoveryError> {
        self.check_open()?;
        let (end, _) = self
            .dir
            .lock()
            .relays
            .remove(&ticket.token)
            .ok_or_else(|| {
                DiscoveryError::Refused("no such relay (expired, or joined already)".into())
            })?;
        Ok(Connection::new(end, relay_addr()))
    }
}

impl MemorySession {
    /// `username`'s entry when it is online in a session that is not this one.
    fn online_target<'d>(
        &self,
        dir: &'d Directory,
        username: &str,
    ) -> Result<&'d Entry, DiscoveryError> {
        let now = Instant::now();
        match dir.users.get(username) {
            Some(entry) if username != self.username && dir.is_online(entry, now) => Ok(entry),
            _ => Err(DiscoveryError::Refused(format!("{username} is not online"))),
        }
    }
}

/// The remote address of an in-memory relayed connection: the directory's end.
fn relay_addr() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)
}
