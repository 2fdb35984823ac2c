//! [`ChatNode`]: the handle an application holds, and the machinery behind it.
//!
//! A node is a cheap `Clone` handle over shared state and a few tasks:
//! - the **actor** (`actor.rs`) keeps the directory registration alive, turns directory
//!   pushes into events, drains the offline mailbox, and accepts peer connections;
//! - one **link** per peer (`link.rs`) owns the single connection to that peer, seals and
//!   pipelines outgoing messages, tracks which are unacknowledged, and moves them to the
//!   offline store when the peer stops acknowledging;
//! - one **reader** per connection opens incoming tokens, drops duplicates, applies block
//!   and mute, emits events, and hands acknowledgements back to its link.

mod actor;
mod builder;
pub(crate) mod handshake;
mod link;
mod state;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use builder::ChatNodeBuilder;
pub use link::{LINK_QUEUE_CAPACITY, MAX_IN_FLIGHT};
pub use state::DEDUP_WINDOW;

use crate::crypto::{CryptoError, PairKey};
use crate::discovery::{DiscoveryError, DiscoverySession, MAX_PAGE_SIZE, PeerRecord};
use crate::event::{Event, Events};
use crate::identity::{Fingerprint, Identity, IdentityError, PublicKey};
use crate::protocol::{MAX_BODY_LEN, MessageId, UsernameError, validate_username};
use crate::store::{OfflineStore, StoreError};
use crate::transport::{Transport, TransportError};
use link::{LinkCmd, LinkHandle, Outgoing};
use state::{PeerState, Seen};

/// How long an acknowledgement may take before the connection is presumed dead and its
/// unacknowledged messages go to the offline store. Default: 10 s.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Events buffered per reader before a slow reader gets [`Event::Lagged`]. Default: 4096.
pub const DEFAULT_EVENT_CAPACITY: usize = 4096;

/// How long a connection handshake may take. Default: 5 s.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Incoming handshakes in progress at once; a connection beyond this is closed at once.
/// Default: 64.
pub const MAX_PENDING_HANDSHAKES: usize = 64;

/// Incoming handshakes in progress at once from one address (an IPv6 /64 counts as one, see
/// [`crate::limits::limit_key`]) once half of [`MAX_PENDING_HANDSHAKES`] are in progress; a
/// connection beyond this is closed at once. Below half, one address may take more. Default: 8.
pub const MAX_PENDING_HANDSHAKES_PER_ADDRESS: usize = 8;

/// How long `shutdown` waits for outstanding acknowledgements before storing the rest
/// offline. Default: 2 s.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Errors from [`ChatNode`] operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The builder is missing something or holds a contradiction.
    #[error("configuration: {0}")]
    Config(String),
    /// No such user in the directory.
    #[error("unknown user '{0}': nobody has registered that name")]
    UnknownUser(String),
    /// The user is blocked; unblock them first.
    #[error("'{0}' is blocked; unblock them to send messages")]
    Blocked(String),
    /// Sending to oneself.
    #[error("you cannot send a message to yourself")]
    SendToSelf,
    /// The message is over [`MAX_BODY_LEN`].
    #[error("message is {len} bytes long; the limit is {max} bytes")]
    MessageTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A username breaks the rules.
    #[error("invalid username: {0}")]
    InvalidUsername(#[from] UsernameError),
    /// Nothing to trust: the user's key has not changed.
    #[error("{0}'s key has not changed; nothing to trust")]
    NothingToTrust(String),
    /// The node has shut down.
    #[error("the node has shut down")]
    ShutDown,
    /// The directory failed.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// The offline store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The transport failed (for example, the listen address is taken).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The identity could not be loaded.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The state in the data directory could not be read or written.
    #[error("node state file {path}: {source}")]
    State {
        /// The file.
        path: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
}

/// Settings fixed at spawn time.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) username: String,
    pub(crate) listen: SocketAddr,
    pub(crate) announce: Vec<SocketAddr>,
    pub(crate) data_dir: Option<PathBuf>,
    pub(crate) keep_alive: Duration,
    pub(crate) ack_timeout: Duration,
    pub(crate) message_ttl: Duration,
    pub(crate) event_capacity: usize,
}

/// State shared by the handle and the node's tasks. Locks are held briefly and never across
/// an `.await`.
pub(crate) struct Shared {
    pub(crate) identity: Identity,
    pub(crate) config: Config,
    pub(crate) local_addr: SocketAddr,
    /// Taken (dropped) when the node stops, which ends every [`Events`] stream once its
    /// buffered events are read.
    events: RwLock<Option<broadcast::Sender<Event>>>,
    /// Subscribed at spawn and handed to the first `events()` call, so that nothing emitted
    /// while starting (the first mailbox drain) is missed.
    pub(crate) first_events: Mutex<Option<broadcast::Receiver<Event>>>,
    pub(crate) peers: Mutex<PeerState>,
    pub(crate) seen: Mutex<Seen>,
    links: Mutex<HashMap<String, LinkHandle>>,
    pair_keys: Mutex<HashMap<PublicKey, PairKey>>,
    pub(crate) store: Arc<dyn OfflineStore>,
    pub(crate) transport: Arc<dyn Transport>,
    session: Mutex<Option<Arc<dyn DiscoverySession>>>,
    /// Stops every task at once, without flushing: the end of a graceful shutdown, or a
    /// simulated crash.
    pub(crate) halt: CancellationToken,
    pub(crate) tasks: TaskTracker,
    closing: Mutex<bool>,
    shutdown_done: tokio::sync::Mutex<bool>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("username", &self.config.username)
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data consistent, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
        .try_into()
        .unwrap_or(u64::MAX)
}

/// What the receiving side decided about one incoming token.
pub(crate) enum Disposition {
    /// Recorded as seen: commit it, show it (the event), then acknowledge.
    Show(Event),
    /// Recorded as seen but from a blocked or muted user: commit it, acknowledge it, do not
    /// show it.
    Hide,
    /// A duplicate: acknowledge it only.
    Drop,
    /// Refuse: the token cannot be accepted.
    Reject(CryptoError),
}

impl Shared {
    pub(crate) fn me(&self) -> &str {
        &self.config.username
    }

    pub(crate) fn emit(&self, event: Event) {
        if let Some(tx) = &*self.events.read().unwrap_or_else(|e| e.into_inner()) {
            // No reader is fine: events are for whoever listens.
            let _ = tx.send(event);
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        match &*self.events.read().unwrap_or_else(|e| e.into_inner()) {
            Some(tx) => tx.subscribe(),
            // Stopped: a stream that ends at once.
            None => broadcast::channel(1).1,
        }
    }

    /// Stops every task without flushing, waits for them, and ends the event streams.
    /// Spawns a node task that stops at `halt` wherever it is waiting (a crash does not wait
    /// for a store or a peer to answer).
    pub(crate) fn spawn(
        &self,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let halt = self.halt.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                biased;
                _ = halt.cancelled() => {}
                _ = task => {}
            }
        })
    }

    async fn stop_tasks(&self) {
        self.halt.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.events
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    pub(crate) fn session(&self) -> Result<Arc<dyn DiscoverySession>, NodeError> {
        lock(&self.session).clone().ok_or(NodeError::ShutDown)
    }

    pub(crate) fn peer_state(&self) -> MutexGuard<'_, PeerState> {
        lock(&self.peers)
    }

    /// The pair key shared with the owner of `key`, derived once and cached.
    pub(crate) fn pair_key(&self, key: &PublicKey) -> Result<PairKey, CryptoError> {
        if let Some(pair) = lock(&self.pair_keys).get(key) {
            return Ok(pair.clone());
        }
        let pair = PairKey::derive(&self.identity, key)?;
        lock(&self.pair_keys).insert(*key, pair.clone());
        Ok(pair)
    }

    /// Looks `user` up and checks its key against the pin, pinning on first sight. Returns
    /// the record and, if the key differs from the pin, the pinned key.
    pub(crate) async fn resolve(
        &self,
        user: &str,
    ) -> Result<(PeerRecord, Option<PublicKey>), NodeError> {
        let record = self
            .session()?
            .lookup(user)
            .await?
            .ok_or_else(|| NodeError::UnknownUser(user.to_owned()))?;
        let mut peers = self.peer_state();
        match peers.pin(user) {
            None => {
                peers.set_pin(user, record.public_key)?;
                Ok((record, None))
            }
            Some(pinned) if pinned == record.public_key => Ok((record, None)),
            Some(pinned) => Ok((record, Some(pinned))),
        }
    }

    pub(crate) fn key_changed(&self, user: &str, old: &PublicKey, new: &PublicKey) {
        tracing::warn!(peer = %user, "peer presents a new identity key; holding messages");
        self.emit(Event::KeyChanged {
            username: user.to_owned(),
            old: old.fingerprint(),
            new: new.fingerprint(),
        });
    }

    /// Decides about one incoming token from `from` sealed under `pair`. Records the id as
    /// seen when it is consumed (shown or deliberately dropped).
    pub(crate) fn receive(
        &self,
        pair: &PairKey,
        from: &str,
        id: MessageId,
        token: &str,
        offline: bool,
    ) -> Disposition {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let opened = match pair.open_parts(token, from, self.me(), self.config.message_ttl, now) {
            Ok(opened) => opened,
            // A late copy of a message already shown (its ack was lost) is a duplicate, not
            // a failure, even if it has since expired.
            Err(_) if lock(&self.seen).contains(from, id) => return Disposition::Drop,
            Err(e) => return Disposition::Reject(e),
        };
        if opened.id != id {
            return Disposition::Reject(CryptoError::Tampered);
        }
        let hidden = {
            let peers = self.peer_state();
            peers.is_blocked(from) || peers.is_muted(from)
        };
        if !lock(&self.seen).insert(from, id) {
            return Disposition::Drop;
        }
        if hidden {
            return Disposition::Hide;
        }
        Disposition::Show(Event::MessageReceived {
            id,
            sent_at: UNIX_EPOCH + Duration::from_millis(opened.sent_at_ms),
            from: from.to_owned(),
            text: opened.body,
            offline,
        })
    }

    /// Makes the ids a batch recorded (its `Show` and `Hide` dispositions) durable, before
    /// they are shown and acknowledged.
    pub(crate) fn commit_seen<'a>(&self, records: impl IntoIterator<Item = (&'a str, MessageId)>) {
        if let Err(e) = lock(&self.seen).commit(records) {
            tracing::warn!(error = %e, "could not record shown message ids");
        }
    }

    /// The link to `peer`, if one is running.
    fn existing_link(&self, peer: &str) -> Option<LinkHandle> {
        lock(&self.links)
            .get(peer)
            .filter(|l| !l.is_closed())
            .cloned()
    }

    /// The link to `peer`, starting one with `key` if none is running. Refused once the node
    /// is closing, so no link can start after shutdown has told every link to flush.
    pub(crate) fn link(
        self: &Arc<Self>,
        peer: &str,
        key: PublicKey,
    ) -> Result<LinkHandle, NodeError> {
        let mut links = lock(&self.links);
        if self.is_closing() {
            return Err(NodeError::ShutDown);
        }
        if let Some(link) = links.get(peer).filter(|l| !l.is_closed()) {
            return Ok(link.clone());
        }
        let handle = link::spawn(self.clone(), peer.to_owned(), key);
        links.insert(peer.to_owned(), handle.clone());
        Ok(handle)
    }

    /// Marks the node closing and returns every link: under the links lock, so none can be
    /// started afterwards.
    fn close_links(&self) -> Vec<LinkHandle> {
        let links = lock(&self.links);
        *lock(&self.closing) = true;
        links.values().cloned().collect()
    }

    fn is_closing(&self) -> bool {
        *lock(&self.closing)
    }
}

/// A chat node: a cheap `Clone` handle. See the [crate docs](crate) for an example.
///
/// Dropping every handle does not stop the node; call [`ChatNode::shutdown`].
#[derive(Clone, Debug)]
pub struct ChatNode {
    shared: Arc<Shared>,
    actor: mpsc::Sender<actor::Command>,
}

impl ChatNode {
    /// A builder with every setting at its default.
    pub fn builder() -> ChatNodeBuilder {
        ChatNodeBuilder::default()
    }

    /// This node's username.
    pub fn username(&self) -> &str {
        self.shared.me()
    }

    /// This node's public identity key.
    pub fn public_key(&self) -> PublicKey {
        self.shared.identity.public_key()
    }

    /// The address the node accepts peer connections on.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// A stream of the node's events. The first call's stream starts when the node was
    /// spawned, so it includes messages drained from the offline store at start-up; later
    /// calls return independent streams starting now.
    pub fn events(&self) -> Events {
        let first = lock(&self.shared.first_events).take();
        Events::new(first.unwrap_or_else(|| self.shared.subscribe()))
    }

    /// Sends `text` to `to`. Returns at once with the message's id; the outcome arrives as
    /// an event carrying it: [`Event::Delivered`], [`Event::StoredOffline`] (then maybe
    /// [`Event::Expired`]), or [`Event::SendFailed`]. Messages to one peer are delivered in
    /// the order they were sent.
    ///
    /// Fails at once for a blocked or unknown user, a message over [`MAX_BODY_LEN`], or after
    /// shutdown. Waits only when many messages to the same peer are still being sent.
    pub async fn send(&self, to: &str, text: &str) -> Result<MessageId, NodeError> {
        if self.shared.is_closing() {
            return Err(NodeError::ShutDown);
        }
        if text.len() > MAX_BODY_LEN {
            return Err(NodeError::MessageTooLong {
                len: text.len(),
                max: MAX_BODY_LEN,
            });
        }
        validate_username(to)?;
        if to == self.shared.me() {
            return Err(NodeError::SendToSelf);
        }
        if self.shared.peer_state().is_blocked(to) {
            return Err(NodeError::Blocked(to.to_owned()));
        }
        let link = match self.shared.existing_link(to) {
            Some(link) => link,
            None => {
                let (record, changed) = self.shared.resolve(to).await?;
                let key = match changed {
                    Some(pinned) => {
                        self.shared.key_changed(to, &pinned, &record.public_key);
                        pinned
                    }
                    None => record.public_key,
                };
                let link = self.shared.link(to, key)?;
                if changed.is_some() {
                    link.hold().await;
                }
                if let Ok(session) = self.shared.session() {
                    // Presence of the people we talk to is pushed to us from now on.
                    if let Err(e) = session.watch(to).await {
                        tracing::debug!(peer = %to, error = %e, "cannot watch presence");
                    }
                }
                link
            }
        };
        let id = MessageId::random();
        link.send(LinkCmd::Send(Outgoing {
            id,
            body: text.to_owned(),
            sent_at_ms: unix_ms_now(),
        }))
        .await
        .map_err(|_| NodeError::ShutDown)?;
        Ok(id)
    }

    /// Blocks `user`: nothing from them is shown, live or offline, their connections are
    /// refused, and sending to them fails. Persists across restarts.
    pub async fn block(&self, user: &str) -> Result<(), NodeError> {
        validate_username(user)?;
        self.shared.peer_state().set_blocked(user, true)?;
        if let Some(link) = self.shared.existing_link(user) {
            let _ = link.send(LinkCmd::Disconnect).await;
        }
        Ok(())
    }

    /// Unblocks `user`.
    pub async fn unblock(&self, user: &str) -> Result<(), NodeError> {
        validate_username(user)?;
        self.shared.peer_state().set_blocked(user, false)
    }

    /// The blocked users, in name order.
    pub fn blocked(&self) -> Vec<String> {
        self.shared.peer_state().blocked()
    }

    /// Hides messages from `user` for `duration`; afterwards they show again. Messages
    /// arriving meanwhile are acknowledged and not shown. Persists across restarts.
    pub async fn mute(&self, user: &str, duration: Duration) -> Result<(), NodeError> {
        validate_username(user)?;
        self.shared.peer_state().mute(user, duration)
    }

    /// Ends a mute early.
    pub async fn unmute(&self, user: &str) -> Result<(), NodeError> {
        validate_username(user)?;
        self.shared.peer_state().unmute(user)
    }

    /// Whether messages from `user` are hidden by a mute now.
    pub fn is_muted(&self, user: &str) -> bool {
        self.shared.peer_state().is_muted(user)
    }

    /// Online users, all pages.
    pub async fn peers(&self) -> Result<Vec<PeerRecord>, NodeError> {
        let session = self.shared.session()?;
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = session.list_online(after.take(), MAX_PAGE_SIZE).await?;
            all.extend(page.users);
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(all),
            }
        }
    }

    /// The safety code of `user`'s pinned key (or, for a user never contacted, of the key
    /// the directory has). Compare it out of band to detect an impostor.
    pub async fn fingerprint(&self, user: &str) -> Result<Fingerprint, NodeError> {
        validate_username(user)?;
        if user == self.username() {
            return Ok(self.public_key().fingerprint());
        }
        if let Some(pinned) = self.shared.peer_state().pin(user) {
            return Ok(pinned.fingerprint());
        }
        let (record, _) = self.shared.resolve(user).await?;
        Ok(record.public_key.fingerprint())
    }

    /// Accepts the key `user` presents now in place of the pinned one, and releases the
    /// messages held for them since the [`Event::KeyChanged`].
    pub async fn trust(&self, user: &str) -> Result<(), NodeError> {
        validate_username(user)?;
        let (record, changed) = self.shared.resolve(user).await?;
        if changed.is_none() {
            return Err(NodeError::NothingToTrust(user.to_owned()));
        }
        self.shared.peer_state().set_pin(user, record.public_key)?;
        if let Some(link) = self.shared.existing_link(user) {
            let _ = link.send(LinkCmd::Trusted(record.public_key)).await;
        }
        Ok(())
    }

    /// Shuts the node down, losing nothing in flight. In order: refuses new sends and
    /// connections; lets each link send what it has queued and wait up to
    /// [`SHUTDOWN_GRACE`] for acknowledgements, storing whatever is still unacknowledged
    /// offline; deregisters from the directory; stops the tasks; ends the event streams.
    ///
    /// Idempotent: later calls (and concurrent ones) return when the first has finished.
    pub async fn shutdown(&self) -> Result<(), NodeError> {
        let mut done = self.shared.shutdown_done.lock().await;
        if *done {
            return Ok(());
        }
        let links = self.shared.close_links();
        let (tx, rx) = oneshot::channel();
        if self
            .actor
            .send(actor::Command::StopAccepting(tx))
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
        let mut flushed = Vec::new();
        for link in links {
            let (tx, rx) = oneshot::channel();
            if link.send(LinkCmd::Shutdown(tx)).await.is_ok() {
                flushed.push(rx);
            }
        }
        for rx in flushed {
            let _ = rx.await;
        }
        // Records a failed write left, if any: one more try.
        self.shared.commit_seen(std::iter::empty());
        let session = lock(&self.shared.session).take();
        let result = match session {
            Some(session) => session.deregister().await.map_err(NodeError::from),
            None => Ok(()),
        };
        self.shared.stop_tasks().await;
        *done = true;
        result
    }

    /// Stops every task at once as if the process had died: no flushing, no storing of
    /// unacknowledged messages, no deregistration (the directory session is dropped, as a
    /// killed process's connection would be). For fault-injection tests.
    #[cfg(feature = "test-utils")]
    pub async fn simulate_crash(&self) {
        *lock(&self.shared.closing) = true;
        self.shared.stop_tasks().await;
        lock(&self.shared.session).take();
        *self.shared.shutdown_done.lock().await = true;
    }
}
