//! [`ChatNode`]: the handle an application holds, and the machinery behind it.
//!
//! A node is a cheap `Clone` handle over shared state and a few tasks:
//! - the **actor** (`actor.rs`) keeps the directory registration alive, turns directory
//!   pushes into events, drains the offline mailbox, and accepts peer connections;
//! - one **link** per peer (`link.rs`) performs what the peer's outbox (`outbox.rs`, a
//!   pure state machine) decides: it owns the single connection to that peer, dials and
//!   stores beside its loop, seals and pipelines outgoing messages;
//! - one **reader** per connection opens incoming tokens, makes them durable in the inbox
//!   (`inbox.rs`: dedup windows per sender, unconfirmed and held messages), then
//!   acknowledges them, and settles the acknowledgements of our own messages;
//! - the **node database** (`db.rs`) keeps all of it, and the block, mute and pin lists
//!   (`state.rs`), across crashes: versioned records (`records.rs`) in a memory-mapped
//!   journal compacted into redb.

mod actor;
mod builder;
pub(crate) mod db;
mod events;
pub(crate) mod handshake;
mod history;
mod inbox;
mod link;
pub(crate) mod outbox;
mod records;
mod state;

use parking_lot::{Mutex, MutexGuard};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use builder::ChatNodeBuilder;
pub use db::{DbError, Durability};
pub(crate) use events::EventHub;
pub use events::Events;
use events::Subscription;
pub use history::{HISTORY_PER_PEER, HistoryEntry};
pub(crate) use inbox::InboxStream;
pub use inbox::{Confirm, DEDUP_WINDOW, MAX_UNCONFIRMED};
pub use link::{CONNECT_BACK_TIMEOUT, LINK_QUEUE_CAPACITY, MAX_IN_FLIGHT};

/// How a node is connected to a peer ([`ChatNode::path`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerPath {
    /// A connection one of the two opened to the other (dialed, or dialed back).
    Direct,
    /// Through the directory's relay: neither could dial the other. The same handshake and
    /// sealed tokens as a direct connection; replaced by a direct one when one becomes
    /// possible.
    Relayed,
}

use crate::crypto::{CryptoError, PairKey};
use crate::discovery::{DiscoveryError, DiscoverySession, MAX_PAGE_SIZE, PeerRecord};
use crate::error::chain;
use crate::event::Event;
use crate::identity::{Fingerprint, Identity, PublicKey};
use crate::protocol::{MAX_BODY_LEN, MessageId, UsernameError, validate_username};
use crate::store::{OfflineStore, StoreError};
use crate::transport::{Transport, TransportError};
use db::{Db, Table};
use inbox::{Inbox, Keep, Opened};
use link::{LinkHandle, Outgoing};
use outbox::Outcome;
use records::OutboxRecordRef;
use state::PeerState;

/// How long an acknowledgement may take before the connection is presumed dead and its
/// unacknowledged messages go to the offline store. Default: 10 s.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Events buffered per reader before a slow reader gets [`Event::Lagged`]. Default: 4096.
pub const DEFAULT_EVENT_CAPACITY: usize = 4096;

/// How long a connection handshake may take. Default: 5 s.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Directory lookups per second that dialers presenting a key the node has not pinned may
/// cause, for the whole node (bursts of twice that); beyond it they are refused "busy" before
/// any lookup. Default: 20.
pub const MAX_STRANGER_LOOKUPS_PER_SECOND: u32 = 20;

/// A per-sender rate for a node a person reads (the CLI's default): messages per second one
/// sender's messages are taken in at, live and from the mailbox together, after a burst of
/// [`MESSAGE_BURST_PER_SENDER`]; beyond it the node reads more slowly from that sender (its
/// connection's flow control, or the next drain, holds the rest; nothing is refused or
/// lost). A sender held up longer than its acknowledgement timeout drops the connection and
/// sends again; the copies are dropped by id. A library node has no such limit unless
/// [`ChatNodeBuilder::messages_per_second_per_sender`] sets one. Default: 100.
pub const MESSAGES_PER_SECOND_PER_SENDER: u32 = 100;

/// Messages one sender may send at once before [`MESSAGES_PER_SECOND_PER_SENDER`] applies:
/// a peer's whole queue after a while offline goes through at once. Default: 10,000.
pub const MESSAGE_BURST_PER_SENDER: u32 = 10_000;

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

/// Most messages a node keeps in its outbox (queued, in flight or being stored, to every
/// peer); `send` refuses more with [`NodeError::OutboxFull`]. Default: 100,000.
pub const MAX_OUTBOX: usize = 100_000;

/// How long `send` waits for the directory to say whether a user it has never talked to
/// exists; without an answer the message is queued anyway. Default: 3 s.
pub const SEND_LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

/// Where a message waiting in the outbox is ([`ChatNode::outbox`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutboxState {
    /// Waiting to be sent (or retried).
    Queued,
    /// Written to the peer, not yet acknowledged.
    Sent,
    /// Being handed to the offline store.
    Storing,
}

/// A message waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutboxEntry {
    /// Its id, as `send` returned it.
    pub id: MessageId,
    /// The recipient.
    pub to: String,
    /// Where it is.
    pub state: OutboxState,
    /// How many times it was written to a connection or handed to the store.
    pub attempts: u32,
    /// When `send` queued it.
    pub queued_at: SystemTime,
}

/// Why [`ChatNodeBuilder::spawn`] could not start a node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    /// The builder is missing something or holds a contradiction; what, as a sentence.
    #[error("configuration: {0}")]
    Config(String),
    /// The username breaks the rules.
    #[error("invalid username")]
    InvalidUsername(#[from] UsernameError),
    /// The node database in the data directory could not be opened or read.
    #[error(transparent)]
    Database(#[from] DbError),
    /// The listener could not be bound (for example, the address is taken).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The directory refused or could not take the registration.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// The offline store could not be subscribed to.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Errors from the operations of a running [`ChatNode`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
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
    #[error("invalid username")]
    InvalidUsername(#[from] UsernameError),
    /// Nothing to trust: the user's key has not changed.
    #[error("{0}'s key has not changed; nothing to trust")]
    NothingToTrust(String),
    /// The node has shut down.
    #[error("the node has shut down")]
    ShutDown,
    /// A user's published key cannot be used to derive a pairwise key.
    #[error("{user}'s public key cannot be used")]
    PeerKey {
        /// Whose key.
        user: String,
        /// Why.
        #[source]
        source: CryptoError,
    },
    /// The directory failed.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// The offline store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The node database failed.
    #[error(transparent)]
    Database(#[from] DbError),
    /// The outbox holds [`MAX_OUTBOX`] messages already.
    #[error("{max} messages are still waiting to be sent; try again once some are delivered")]
    OutboxFull {
        /// The limit.
        max: usize,
    },
    /// The message is not in the outbox, or has been sent already.
    #[error("message {0} cannot be cancelled: it was sent already or is not in the outbox")]
    NotCancellable(MessageId),
}

/// A user's safety codes, from [`ChatNode::safety_codes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SafetyCodes {
    /// The code of the key pinned for the user (the one messages go to).
    pub pinned: Option<Fingerprint>,
    /// The code of the key the directory has for the name now.
    pub current: Fingerprint,
}

impl SafetyCodes {
    /// Whether the user presents another key than the pinned one (trust it with
    /// [`ChatNode::trust`] after comparing [`SafetyCodes::current`]).
    pub fn changed(&self) -> bool {
        self.pinned.is_some_and(|pinned| pinned != self.current)
    }
}

/// Message requests from one sender, waiting in contacts-only mode (see
/// [`ChatNode::requests`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MessageRequest {
    /// Who wrote.
    pub from: String,
    /// How many of their messages wait.
    pub messages: usize,
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
    pub(crate) durability: Durability,
    pub(crate) confirm: Confirm,
}

/// State shared by the handle and the node's tasks. Locks are held briefly and never across
/// an `.await`.
pub(crate) struct Shared {
    pub(crate) identity: Identity,
    pub(crate) config: Config,
    pub(crate) local_addr: SocketAddr,
    /// Taken (dropped) when the node stops, which ends every [`Events`] stream once its
    /// buffered events are read.
    events: Arc<EventHub>,
    /// Subscribed at spawn and handed to the first `events()` call, so that nothing emitted
    /// while starting (the first mailbox drain) is missed.
    pub(crate) first_events: Mutex<Option<Subscription>>,
    pub(crate) peers: Mutex<PeerState>,
    pub(crate) db: Arc<Db>,
    pub(crate) inbox: Arc<Inbox>,
    /// The conversation history, when kept.
    pub(crate) history: Option<Arc<history::History>>,
    /// The sequence numbers of our messages (and their order in the outbox).
    pub(crate) seq: Mutex<SeqClock>,
    /// Messages in the outbox now.
    pub(crate) outbox_len: AtomicUsize,
    links: Mutex<HashMap<String, LinkHandle, foldhash::fast::RandomState>>,
    pair_keys: Mutex<HashMap<PublicKey, PairKey>>,
    pub(crate) store: Arc<dyn OfflineStore>,
    pub(crate) transport: Arc<dyn Transport>,
    session: Mutex<Option<Arc<dyn DiscoverySession>>>,
    /// Whether peers can dial us, as the directory last said: 0 not known yet, 1 yes, 2 no.
    reachable: std::sync::atomic::AtomicU8,
    /// Contacts-only mode (see [`ChatNodeBuilder::contacts_only`]).
    pub(crate) contacts_only: std::sync::atomic::AtomicBool,
    /// Senders whose requests were reported ([`Event::MessageRequest`]) in this run.
    requested: Mutex<HashSet<String>>,
    /// Messages taken in per sender (see [`MESSAGES_PER_SECOND_PER_SENDER`]); `None`: no
    /// limit.
    pub(crate) sender_rate: Option<governor::DefaultKeyedRateLimiter<String>>,
    /// Directory lookups that dialers presenting an unpinned key may cause.
    pub(crate) stranger_lookups: governor::DefaultDirectRateLimiter,
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

pub(crate) fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
        .try_into()
        .unwrap_or(u64::MAX)
}

/// A node's message sequence numbers ([`crate::crypto::Payload::seq`]): a hybrid logical
/// clock in microseconds, the larger of the last number plus one and the wall clock, so
/// that numbers only grow, whatever the clock does, and a node whose database was lost
/// starts from its clock rather than from zero. Numbers are reserved ahead in the database
/// ([`SEQ_RESERVATION`] at a time), so a restart continues above every number handed out.
#[derive(Debug)]
pub(crate) struct SeqClock {
    next: u64,
    /// Numbers below this may have been handed out (the database holds it).
    reserved: u64,
}

/// How far ahead [`SeqClock`] reserves numbers: about 17 s of the clock, so a node sending
/// steadily writes one small record that often, besides its messages.
pub(crate) const SEQ_RESERVATION: u64 = 1 << 24;

impl SeqClock {
    /// Continues above `reserved` (from the database) and above every number in the outbox.
    pub(crate) fn new(reserved: u64, highest_queued: Option<u64>) -> Self {
        let next = highest_queued.map_or(reserved, |q| q.saturating_add(1).max(reserved));
        Self { next, reserved }
    }

    /// The next number at clock `now_us`, and the new reservation to record with it, if any.
    pub(crate) fn next(&mut self, now_us: u64) -> (u64, Option<u64>) {
        let seq = self.next.max(now_us);
        self.next = seq.saturating_add(1);
        if self.next > self.reserved {
            self.reserved = seq.saturating_add(SEQ_RESERVATION);
            return (seq, Some(self.reserved));
        }
        (seq, None)
    }

    /// Takes back the number just handed out (its message was not recorded).
    pub(crate) fn undo(&mut self, seq: u64, reserved: Option<u64>) {
        if self.next == seq.saturating_add(1) {
            self.next = seq;
        }
        if let Some(r) = reserved
            && self.reserved == r
        {
            self.reserved = seq;
        }
    }
}

/// What the receiving side made of a batch of incoming tokens.
#[derive(Debug, Default)]
pub(crate) struct Received {
    /// Durable (or duplicates): acknowledge these.
    pub(crate) ack: Vec<MessageId>,
    /// Authentic but not acceptable (expired, from the future, misrouted): refuse these.
    pub(crate) refuse: Vec<(MessageId, CryptoError)>,
    /// Tokens that do not authenticate under the pair key.
    pub(crate) unopenable: Vec<MessageId>,
}

impl Shared {
    /// How many of `n` messages from `from` may be taken in now (see
    /// [`MESSAGES_PER_SECOND_PER_SENDER`]): all of them without a limit; otherwise waits
    /// until one may, then takes as many more as the rate allows at once. The caller has
    /// not acknowledged them: waiting here, and leaving the rest for later, is the
    /// backpressure.
    pub(crate) async fn throttle(&self, from: &str, n: usize) -> usize {
        let Some(limiter) = &self.sender_rate else {
            return n;
        };
        if n == 0 {
            return 0;
        }
        let key = from.to_owned();
        limiter.until_key_ready(&key).await;
        let mut taken = 1;
        while taken < n && limiter.check_key(&key).is_ok() {
            taken += 1;
        }
        taken
    }

    /// [`Shared::throttle`] until all `n` are taken: for a batch that must be taken whole.
    pub(crate) async fn throttle_all(&self, from: &str, n: usize) {
        let mut left = n;
        while left > 0 {
            left -= self.throttle(from, left).await.max(1).min(left);
        }
    }

    pub(crate) fn me(&self) -> &str {
        &self.config.username
    }

    pub(crate) fn emit(&self, event: Event) {
        self.events.emit(event);
    }

    /// Emits several events, in order, at once.
    pub(crate) fn emit_all(&self, events: impl IntoIterator<Item = Event>) {
        self.events.emit_all(events);
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
        // The links refer back to this state: let them go with it.
        self.links.lock().clear();
        self.events.close();
    }

    /// Whether peers can dial us, as the directory last said (`None`: not said yet).
    pub(crate) fn dialable(&self) -> Option<bool> {
        match self.reachable.load(Ordering::Acquire) {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }

    /// Records what the directory says about our reachability; returns what it was.
    pub(crate) fn set_dialable(&self, dialable: bool) -> Option<bool> {
        let before = self
            .reachable
            .swap(if dialable { 1 } else { 2 }, Ordering::AcqRel);
        match before {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }

    pub(crate) fn session(&self) -> Result<Arc<dyn DiscoverySession>, NodeError> {
        self.session.lock().clone().ok_or(NodeError::ShutDown)
    }

    pub(crate) fn peer_state(&self) -> MutexGuard<'_, PeerState> {
        self.peers.lock()
    }

    /// The pair key shared with the owner of `key`, derived once and cached.
    pub(crate) fn pair_key(&self, key: &PublicKey) -> Result<PairKey, CryptoError> {
        if let Some(pair) = self.pair_keys.lock().get(key) {
            return Ok(pair.clone());
        }
        let pair = PairKey::derive(&self.identity, key)?;
        self.pair_keys.lock().insert(*key, pair.clone());
        Ok(pair)
    }

    /// Looks `user` up in the directory, pinning nothing.
    pub(crate) async fn lookup(&self, user: &str) -> Result<PeerRecord, NodeError> {
        self.session()?
            .lookup(user)
            .await?
            .ok_or_else(|| NodeError::UnknownUser(user.to_owned()))
    }

    /// Whether a dialer that presents a key we have not pinned may cost a directory lookup
    /// now: at most [`MAX_STRANGER_LOOKUPS_PER_SECOND`] for the whole node.
    pub(crate) fn stranger_lookup_allowed(&self) -> bool {
        self.stranger_lookups.check().is_ok()
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

    /// Opens tokens from `from` sealed under `pair` and makes the acceptable ones durable
    /// (in the inbox, or held when `hold`; only their ids when `from` is blocked or muted).
    pub(crate) async fn receive_batch(
        &self,
        pair: &PairKey,
        from: &str,
        tokens: impl IntoIterator<Item = (MessageId, String)>,
        offline: bool,
        hold: bool,
    ) -> Result<Received, NodeError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut received = Received::default();
        let mut opened = Vec::new();
        for (id, token) in tokens {
            match pair.open_parts(&token, from, self.me(), self.config.message_ttl, now) {
                Ok(o) if o.id == id => {
                    opened.push(Opened {
                        id,
                        sent_at_ms: o.sent_at_ms,
                        seq: o.seq,
                        body: o.body,
                    });
                    received.ack.push(id);
                }
                // A late copy of a message already taken (its ack was lost) is a duplicate,
                // not a failure, even if it has since expired.
                _ if self.inbox.seen(from, id) => received.ack.push(id),
                Ok(_)
                | Err(CryptoError::Tampered | CryptoError::Malformed | CryptoError::BadPayload) => {
                    received.unopenable.push(id)
                }
                Err(e) => received.refuse.push((id, e)),
            }
        }
        let (keep, request) = {
            let peers = self.peer_state();
            if peers.is_blocked(from) || peers.is_muted(from) {
                (Keep::Hide, false)
            } else if hold {
                (Keep::Hold, false)
            } else if self.contacts_only.load(Ordering::Relaxed) && !peers.is_contact(from) {
                // A request: kept like a message under an untrusted key, until accepted.
                (Keep::Hold, true)
            } else {
                (Keep::Show, false)
            }
        };
        if !opened.is_empty() {
            self.inbox.accept(from, opened, offline, keep).await?;
            if request {
                // The user may have accepted or blocked them while this was written.
                let (contact, blocked) = {
                    let peers = self.peer_state();
                    (peers.is_contact(from), peers.is_blocked(from))
                };
                if blocked {
                    self.inbox.discard_held(from)?;
                } else if contact {
                    self.inbox.release(from)?;
                } else if self.requested.lock().insert(from.to_owned()) {
                    self.emit(Event::MessageRequest {
                        from: from.to_owned(),
                    });
                }
            }
        }
        Ok(received)
    }

    /// Our messages to `peer` left the outbox so: forget them and say it.
    pub(crate) fn settle_sent(&self, peer: &str, ids: &[MessageId], outcome: Outcome) {
        if ids.is_empty() {
            return;
        }
        let written = self.db.write_with(|batch| {
            for id in ids {
                batch.delete(Table::Outbox, id.as_bytes());
            }
        });
        if let Err(e) = written {
            // They are sent again after a restart; the peer drops them by id.
            tracing::warn!(error = %chain(&e), "cannot record settled messages");
        }
        let _ = self
            .outbox_len
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(ids.len()))
            });
        self.emit_all(ids.iter().map(|&id| {
            let to = peer.to_owned();
            match &outcome {
                Outcome::Delivered => Event::Delivered { id, to },
                Outcome::StoredOffline => Event::StoredOffline { id, to },
                Outcome::Expired => Event::Expired { id, to },
                Outcome::Cancelled => Event::Cancelled { id, to },
                Outcome::Failed(reason) => Event::SendFailed {
                    id,
                    to,
                    reason: reason.clone(),
                },
            }
        }));
    }

    /// Starts the link for a first message to `peer` in this run: looks the peer up (so a
    /// name the directory does not know fails at once), pins its key on first sight, holds
    /// messages if the key changed, and watches its presence. An unreachable directory does
    /// not fail it: the link learns the key when it dials.
    async fn first_link(self: &Arc<Self>, peer: &str) -> Result<LinkHandle, NodeError> {
        let pinned = self.peer_state().pin(peer);
        let looked_up = match pinned {
            Some(_) => None,
            None => tokio::time::timeout(SEND_LOOKUP_TIMEOUT, self.resolve(peer))
                .await
                .ok(),
        };
        let (key, changed) = match looked_up {
            None => (pinned, None),
            Some(Ok((record, changed))) => (
                Some(record.public_key),
                changed.map(|old| (old, record.public_key)),
            ),
            Some(Err(e @ NodeError::UnknownUser(_))) => return Err(e),
            Some(Err(e)) => {
                tracing::debug!(peer = %peer, error = %chain(&e), "directory unavailable; queueing");
                (None, None)
            }
        };
        let key = match changed {
            Some((old, new)) => {
                self.key_changed(peer, &old, &new);
                Some(old)
            }
            None => key,
        };
        let link = self.link(peer, key)?;
        if changed.is_some() {
            link.hold();
        }
        if let Ok(session) = self.session() {
            // Presence of the people we talk to is pushed to us from now on.
            let session = session.clone();
            let peer = peer.to_owned();
            self.spawn(async move {
                if let Err(e) = session.watch(&peer).await {
                    tracing::debug!(%peer, error = %chain(&e), "cannot watch presence");
                }
            });
        }
        Ok(link)
    }

    /// Every running link.
    pub(crate) fn all_links(&self) -> Vec<LinkHandle> {
        self.links.lock().values().cloned().collect()
    }

    /// The link to `peer`, if one is running.
    pub(crate) fn existing_link(&self, peer: &str) -> Option<LinkHandle> {
        self.links
            .lock()
            .get(peer)
            .filter(|l| !l.is_closed())
            .cloned()
    }

    /// The link to `peer`, starting one with `key` if none is running. Refused once the node
    /// is closing, so no link can start after shutdown has told every link to flush.
    pub(crate) fn link(
        self: &Arc<Self>,
        peer: &str,
        key: Option<PublicKey>,
    ) -> Result<LinkHandle, NodeError> {
        let mut links = self.links.lock();
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
        let links = self.links.lock();
        *self.closing.lock() = true;
        links.values().cloned().collect()
    }

    fn is_closing(&self) -> bool {
        *self.closing.lock()
    }
}

/// A chat node: a cheap `Clone` handle. See the [crate docs](crate) for an example.
///
/// # Dropping the last handle
/// Call [`ChatNode::shutdown`] and await it: that is the only way to know the node has
/// stopped and to see its result. Dropping every handle without it shuts the node down
/// anyway, in the background on the current Tokio runtime, exactly as `shutdown` does
/// (queued messages sent or stored offline, deregistered, database closed), and logs a
/// warning. Unlike iroh, whose `Endpoint` aborts its tasks when dropped unclosed, we stop
/// gracefully: the node's promise is that nothing in flight is lost, and the background
/// shutdown keeps it while the runtime lives. If the runtime is gone or going, the tasks die
/// with it, as in a crash: the outbox and the inbox are durable, so the next start sends
/// and shows what was left.
#[derive(Clone, Debug)]
pub struct ChatNode {
    shared: Arc<Shared>,
    actor: mpsc::Sender<actor::Command>,
    /// Shared by every clone; its drop (with the last handle) shuts the node down.
    _last: Arc<LastHandle>,
}

/// Dropped with the last [`ChatNode`] handle: starts a shutdown unless one already ran.
#[derive(Debug)]
struct LastHandle {
    shared: Arc<Shared>,
    actor: mpsc::Sender<actor::Command>,
}

impl Drop for LastHandle {
    fn drop(&mut self) {
        if self.shared.is_closing() {
            return; // shut down, shutting down, or crashed on purpose
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                "ChatNode dropped outside a Tokio runtime without shutdown(); its tasks stop with their runtime"
            );
            return;
        };
        tracing::warn!(
            "the last ChatNode handle was dropped without shutdown(); shutting down in the background"
        );
        let (shared, actor) = (self.shared.clone(), self.actor.clone());
        runtime.spawn(async move {
            if let Err(e) = shutdown(&shared, &actor).await {
                tracing::warn!(error = %chain(&e), "background shutdown");
            }
        });
    }
}

/// [`ChatNode::shutdown`]: also run when the last handle is dropped.
async fn shutdown(
    shared: &Arc<Shared>,
    actor: &mpsc::Sender<actor::Command>,
) -> Result<(), NodeError> {
    let mut done = shared.shutdown_done.lock().await;
    if *done {
        return Ok(());
    }
    let links = shared.close_links();
    let (tx, rx) = oneshot::channel();
    if actor.send(actor::Command::StopAccepting(tx)).await.is_ok() {
        let _ = rx.await;
    }
    futures::future::join_all(links.iter().map(LinkHandle::shutdown)).await;
    let session = shared.session.lock().take();
    let result = match session {
        Some(session) => session.deregister().await.map_err(NodeError::from),
        None => Ok(()),
    };
    shared.stop_tasks().await;
    shared.db.close();
    *done = true;
    result
}

impl ChatNode {
    pub(crate) fn new(shared: Arc<Shared>, actor: mpsc::Sender<actor::Command>) -> Self {
        let last = Arc::new(LastHandle {
            shared: shared.clone(),
            actor: actor.clone(),
        });
        Self {
            shared,
            actor,
            _last: last,
        }
    }

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

    /// How the node is connected to `peer` now: `None` without a connection.
    pub fn path(&self, peer: &str) -> Option<PeerPath> {
        self.shared.existing_link(peer)?.path()
    }

    /// Whether peers can dial this node directly, as the directory last said (`None`: not
    /// said yet). See [`Event::Reachability`].
    pub fn dialable(&self) -> Option<bool> {
        self.shared.dialable()
    }

    /// A stream of the node's events. The first call's stream starts when the node was
    /// spawned, so it includes messages drained from the offline store at start-up; later
    /// calls return independent streams starting now.
    pub fn events(&self) -> Events {
        let first = self.shared.first_events.lock().take();
        Events::new(
            first.unwrap_or_else(|| self.shared.events.subscribe()),
            Some(self.shared.inbox.open_stream()),
        )
    }

    /// Sends `text` to `to`. Returns once the message is durable in the outbox (at the
    /// builder's [`Durability`]), with its id; every step after that arrives as an event
    /// carrying it: [`Event::Queued`], [`Event::Sent`], then [`Event::Delivered`] or
    /// [`Event::StoredOffline`] (then maybe [`Event::Expired`]), or [`Event::SendFailed`].
    /// The outbox retries across dial failures, lost connections, directory and store
    /// outages and restarts of the node until the message is delivered, stored or expired.
    /// Messages to one peer are sent in the order they were queued.
    ///
    /// Fails at once only for bad input (a blocked user, oneself, an invalid name, a message
    /// over [`MAX_BODY_LEN`]), a user the directory says does not exist, a full outbox
    /// ([`MAX_OUTBOX`]), or after shutdown. An unreachable directory does not fail it: the
    /// message is queued. Waits only when many messages to the same peer are in flight.
    pub async fn send(&self, to: &str, text: &str) -> Result<MessageId, NodeError> {
        let shared = &self.shared;
        if shared.is_closing() {
            return Err(NodeError::ShutDown);
        }
        if text.len() > MAX_BODY_LEN {
            return Err(NodeError::MessageTooLong {
                len: text.len(),
                max: MAX_BODY_LEN,
            });
        }
        validate_username(to)?;
        if to == shared.me() {
            return Err(NodeError::SendToSelf);
        }
        let new_contact = {
            let mut peers = shared.peer_state();
            if peers.is_blocked(to) {
                return Err(NodeError::Blocked(to.to_owned()));
            }
            // Whom we write to may write to us (contacts-only mode).
            !peers.is_contact(to) && peers.add_contact(to)?
        };
        if new_contact && shared.inbox.holds_from(to) {
            // Writing to someone whose requests wait is accepting them: show those too.
            let (node, peer) = (self.clone(), to.to_owned());
            shared.spawn(async move {
                if let Err(e) = node.accept(&peer).await {
                    tracing::debug!(%peer, error = %chain(&e), "requests not shown yet");
                }
            });
        }
        if shared.outbox_len.load(Ordering::Relaxed) >= MAX_OUTBOX {
            return Err(NodeError::OutboxFull { max: MAX_OUTBOX });
        }
        let link = match shared.existing_link(to) {
            Some(link) => link,
            None => shared.first_link(to).await?,
        };
        let id = MessageId::random();
        let now = unix_ms_now();
        let expires_at_ms = now.saturating_add(
            shared
                .config
                .message_ttl
                .as_millis()
                .try_into()
                .unwrap_or(u64::MAX),
        );
        let (seq, written) = {
            // Numbered and written under one lock: the numbers reach the journal in order,
            // and so does each reservation.
            let mut clock = shared.seq.lock();
            let (seq, reserve) = clock.next(now.saturating_mul(1000));
            let record = OutboxRecordRef::V1 {
                seq,
                to,
                body: text,
                sent_at_ms: now,
                queued_at_ms: now,
                expires_at_ms,
            };
            let mut recorded = Vec::new();
            let written = shared.db.write_with(|batch| {
                batch.put_record(Table::Outbox, id.as_bytes(), &record);
                if let Some(reserved) = reserve {
                    batch.put(Table::Meta, records::SEQ_KEY, &reserved.to_be_bytes());
                }
                if let Some(history) = &shared.history {
                    history.record(batch, &mut recorded, to, id, true, text, now);
                }
            });
            if written.is_err() {
                clock.undo(seq, reserve);
            } else if let Some(history) = &shared.history {
                history.keep(recorded);
            }
            (seq, written?)
        };
        shared.db.durable(written).await?;
        shared.outbox_len.fetch_add(1, Ordering::Relaxed);
        shared.emit(Event::Queued {
            id,
            to: to.to_owned(),
            retry: None,
        });
        link.queue(Outgoing {
            id,
            body: text.to_owned(),
            sent_at_ms: now,
            seq,
            expires_at_ms,
            queued_at_ms: now,
        })
        .await;
        Ok(id)
    }

    /// The last `limit` messages of the conversation with `peer`, oldest first: what this
    /// node sent them and what it showed from them. Empty unless the node keeps history
    /// ([`ChatNodeBuilder::history`]).
    pub fn history(&self, peer: &str, limit: usize) -> Vec<HistoryEntry> {
        self.shared
            .history
            .as_ref()
            .map_or_else(Vec::new, |h| h.with(peer, limit))
    }

    /// The peers this node has history with, in name order.
    pub fn history_peers(&self) -> Vec<String> {
        self.shared
            .history
            .as_ref()
            .map_or_else(Vec::new, |h| h.peers())
    }

    /// The messages waiting in the outbox, to every peer, oldest first per peer.
    pub async fn outbox(&self) -> Vec<OutboxEntry> {
        let links = self.shared.all_links();
        links.iter().flat_map(LinkHandle::list).collect()
    }

    /// Cancels a message still waiting to be sent: it leaves the outbox with
    /// [`Event::Cancelled`]. Fails with [`NodeError::NotCancellable`] once it was sent (or
    /// is being stored), or if no such message waits.
    pub async fn cancel(&self, id: MessageId) -> Result<(), NodeError> {
        let links = self.shared.all_links();
        if links.iter().any(|link| link.cancel(id)) {
            return Ok(());
        }
        Err(NodeError::NotCancellable(id))
    }

    /// Confirms that the application has taken message `id` from `from` (with
    /// [`Confirm::Explicit`]): it leaves the inbox and is not handed out again. `false` if
    /// no such message waits (confirmed already, or never received).
    pub fn confirm(&self, from: &str, id: MessageId) -> Result<bool, NodeError> {
        Ok(self.shared.inbox.confirm(from, id)?)
    }

    /// Blocks `user`: nothing from them is shown, live or offline, their connections are
    /// refused, and sending to them fails. Persists across restarts.
    pub async fn block(&self, user: &str) -> Result<(), NodeError> {
        validate_username(user)?;
        self.shared.peer_state().set_blocked(user, true)?;
        if let Some(link) = self.shared.existing_link(user) {
            link.disconnect();
        }
        // Their requests, and anything held for them, go too.
        self.shared.inbox.discard_held(user)?;
        self.shared.requested.lock().remove(user);
        Ok(())
    }

    /// The block list as text, one name per line (what [`ChatNode::import_blocked`] reads).
    pub fn export_blocked(&self) -> String {
        let mut text = String::new();
        for user in self.blocked() {
            text.push_str(&user);
            text.push('\n');
        }
        text
    }

    /// Blocks every name in `list`, one per line (blank lines and lines starting with `#`
    /// are skipped; surrounding spaces ignored), as [`ChatNode::block`] does. Checks every
    /// name first: an invalid one fails the import before anything is blocked. Returns how
    /// many were not blocked before.
    pub async fn import_blocked(&self, list: &str) -> Result<usize, NodeError> {
        let names: Vec<&str> = list
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .collect();
        for name in &names {
            validate_username(name)?;
        }
        let mut added = 0;
        for name in names {
            if !self.shared.peer_state().is_blocked(name) {
                added += 1;
            }
            self.block(name).await?;
        }
        Ok(added)
    }

    /// Whether contacts-only mode is on (see [`ChatNodeBuilder::contacts_only`]).
    pub fn contacts_only(&self) -> bool {
        self.shared.contacts_only.load(Ordering::Relaxed)
    }

    /// Turns contacts-only mode on or off (see [`ChatNodeBuilder::contacts_only`]). Turning
    /// it off does not show the requests already kept: [`ChatNode::accept`] does.
    pub fn set_contacts_only(&self, on: bool) {
        self.shared.contacts_only.store(on, Ordering::Relaxed);
    }

    /// The people written to or accepted, in name order.
    pub fn contacts(&self) -> Vec<String> {
        self.shared.peer_state().contacts()
    }

    /// The message requests waiting: senders who are not contacts and whose messages were
    /// kept unshown in contacts-only mode, with how many, in name order. (A non-contact's
    /// messages held for a changed key, [`Event::KeyChanged`], are counted too: they wait
    /// for [`ChatNode::trust`] as well.)
    pub fn requests(&self) -> Vec<MessageRequest> {
        let peers = self.shared.peer_state();
        self.shared
            .inbox
            .held_senders()
            .into_iter()
            .filter(|(from, _)| !peers.is_contact(from))
            .map(|(from, messages)| MessageRequest { from, messages })
            .collect()
    }

    /// Accepts `user` as a contact: their kept requests are shown now, in order, and their
    /// messages from now on. If their key changed ([`Event::KeyChanged`]), what came under
    /// the new key still waits for [`ChatNode::trust`]. Fails if the directory cannot say
    /// whether their key changed (they are a contact anyway; accept again to show what
    /// waits).
    pub async fn accept(&self, user: &str) -> Result<(), NodeError> {
        validate_username(user)?;
        if user == self.shared.me() {
            return Err(NodeError::SendToSelf);
        }
        self.shared.peer_state().add_contact(user)?;
        self.shared.requested.lock().remove(user);
        let held = self
            .shared
            .inbox
            .held_senders()
            .into_iter()
            .any(|(from, _)| from == user);
        if !held {
            return Ok(());
        }
        let (_, changed) = self.shared.resolve(user).await?;
        if changed.is_none() {
            self.shared.inbox.release(user)?;
        }
        Ok(())
    }

    /// Unblocks `user`.
    pub async fn unblock(&self, user: &str) -> Result<(), NodeError> {
        validate_username(user)?;
        Ok(self.shared.peer_state().set_blocked(user, false)?)
    }

    /// The blocked users, in name order.
    pub fn blocked(&self) -> Vec<String> {
        self.shared.peer_state().blocked()
    }

    /// Hides messages from `user` for `duration`; afterwards they show again. Messages
    /// arriving meanwhile are acknowledged and not shown. Persists across restarts.
    pub async fn mute(&self, user: &str, duration: Duration) -> Result<(), NodeError> {
        validate_username(user)?;
        Ok(self.shared.peer_state().mute(user, duration)?)
    }

    /// Ends a mute early.
    pub async fn unmute(&self, user: &str) -> Result<(), NodeError> {
        validate_username(user)?;
        Ok(self.shared.peer_state().unmute(user)?)
    }

    /// Whether messages from `user` are hidden by a mute now.
    pub fn is_muted(&self, user: &str) -> bool {
        self.shared.peer_state().is_muted(user)
    }

    /// The users muted now, with the time each mute has left, in name order.
    pub fn muted(&self) -> Vec<(String, Duration)> {
        self.shared.peer_state().muted()
    }

    /// Whether `user` is a name this node can reach: pinned, a contact, or registered with
    /// the directory now. Asks the directory only for a name it does not know.
    pub async fn user_exists(&self, user: &str) -> Result<bool, NodeError> {
        validate_username(user)?;
        {
            let peers = self.shared.peer_state();
            if peers.pin(user).is_some() || peers.is_contact(user) {
                return Ok(true);
            }
        }
        match self.shared.lookup(user).await {
            Ok(_) => Ok(true),
            Err(NodeError::UnknownUser(_)) => Ok(false),
            Err(e) => Err(e),
        }
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

    /// Both safety codes of `user`: the one of the key pinned for them (if any) and the
    /// one of the key the directory has for the name now. They differ after a key change
    /// ([`Event::KeyChanged`]): compare [`SafetyCodes::current`] with the user out of band,
    /// then [`ChatNode::trust`] it. Pins on first sight, as a send would.
    pub async fn safety_codes(&self, user: &str) -> Result<SafetyCodes, NodeError> {
        validate_username(user)?;
        if user == self.username() {
            let own = self.public_key().fingerprint();
            return Ok(SafetyCodes {
                pinned: Some(own),
                current: own,
            });
        }
        let (record, changed) = self.shared.resolve(user).await?;
        let current = record.public_key.fingerprint();
        Ok(SafetyCodes {
            pinned: Some(changed.map_or(current, |old| old.fingerprint())),
            current,
        })
    }

    /// The key pinned for `user` (trusted on first contact, or by [`ChatNode::trust`]), if
    /// any.
    pub fn pinned_key(&self, user: &str) -> Option<PublicKey> {
        self.shared.peer_state().pin(user)
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
            link.trusted(record.public_key);
        }
        // In contacts-only mode a stranger's messages stay requests until accepted.
        if !self.contacts_only() || self.shared.peer_state().is_contact(user) {
            self.shared.inbox.release(user)?;
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
        shutdown(&self.shared, &self.actor).await
    }

    /// Stops every task at once as if the process had died: no flushing, no storing of
    /// unacknowledged messages, no deregistration (the directory session is dropped, as a
    /// killed process's connection would be). For fault-injection tests.
    #[cfg(feature = "test-utils")]
    pub async fn simulate_crash(&self) {
        *self.shared.closing.lock() = true;
        self.shared.stop_tasks().await;
        self.shared.session.lock().take();
        self.shared.db.close();
        *self.shared.shutdown_done.lock().await = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_only_grow_whatever_the_clock_does_and_reserve_ahead() {
        let mut clock = SeqClock::new(0, None);
        let (a, reserved) = clock.next(1_000);
        assert_eq!((a, reserved), (1_000, Some(1_000 + SEQ_RESERVATION)));
        let (b, none) = clock.next(1_000);
        assert_eq!((b, none), (1_001, None), "same clock: one more");
        // The clock steps back an hour: numbers go on growing.
        let (c, _) = clock.next(1_000 - 999);
        assert_eq!(c, 1_002);
        // The clock runs past the reservation: a new one is recorded with that message.
        let (d, reserved) = clock.next(5 * SEQ_RESERVATION);
        assert_eq!(
            (d, reserved),
            (5 * SEQ_RESERVATION, Some(6 * SEQ_RESERVATION))
        );
        // A restart continues above the reservation and above what is still queued, even
        // with a clock far behind.
        let mut restarted = SeqClock::new(6 * SEQ_RESERVATION, Some(d));
        assert!(restarted.next(0).0 >= 6 * SEQ_RESERVATION);
        let mut queued_above = SeqClock::new(10, Some(99));
        assert_eq!(queued_above.next(0).0, 100);
        // A number whose message was not recorded is handed out again.
        let mut undo = SeqClock::new(0, None);
        let (e, r) = undo.next(7);
        undo.undo(e, r);
        assert_eq!(undo.next(7), (e, r));
    }
}
