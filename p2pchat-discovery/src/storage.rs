//! What the server keeps, behind the [`Storage`] trait: name claims (durable) and presence
//! leases (expiring), with a feed of presence changes.
//!
//! Two backends, one behaviour (one conformance suite in `tests/`):
//! - [`RedbStorage`]: claims in an embedded redb file in the data directory; presence in this
//!   process's memory (one server, so nobody else needs it; after a restart every client
//!   registers again).
//! - [`RedisStorage`]: claims, presence leases and the change feed in Redis, so several
//!   server instances sharing it behave as one.

mod presence;
mod record;
mod redb;
mod redb_mailbox;
mod redis;

use std::fmt::Debug;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use p2pchat_core::Cause;
use p2pchat_core::store::OfflineStore;
use p2pchat_core::{Announcement, PublicKey};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

pub use self::redb::RedbStorage;
pub use self::redb_mailbox::RedbMailbox;
pub use self::redis::{DEFAULT_KEY_PREFIX, RedisStorage, RedisStorageConfig};

/// Presence changes buffered for a slow dispatcher before it reports `Lagged`. Default: 4096.
pub const PRESENCE_FEED_CAPACITY: usize = 4096;

/// Announcements buffered for a slow dispatcher. Default: 64.
pub const ANNOUNCEMENT_FEED_CAPACITY: usize = 64;

/// Signals (connect-back requests, relay offers) buffered for a slow dispatcher.
/// Default: 1024.
pub const SIGNAL_FEED_CAPACITY: usize = 1024;

/// A push for one user's session, wherever it is registered: a connect-back request or a
/// relay offer from a session of another instance. The instance holding the session
/// delivers it; the others drop it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    /// Whose session.
    pub to: String,
    /// What to push to it.
    pub push: p2pchat_core::protocol::discovery::Push,
}

/// A claim's `last_seen` is rewritten at most this often while its owner keeps registering,
/// so keep-alives and reconnections do not turn into disk writes. Default: 1 hour (claims
/// lapse after months).
pub const CLAIM_TOUCH_INTERVAL: Duration = Duration::from_secs(3600);

/// Identifies one registration (one session on one server instance), so that a session that
/// ends cannot take down the newer session that replaced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SessionId(pub u128);

impl SessionId {
    /// A fresh random id (unique across instances).
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// A name bound to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameClaim {
    /// The owner's identity key.
    pub public_key: PublicKey,
    /// When the owner last registered or left (within [`CLAIM_TOUCH_INTERVAL`]).
    pub last_seen: SystemTime,
}

/// An online registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Who.
    pub username: String,
    /// Their key.
    pub public_key: PublicKey,
    /// Where they accept peer connections.
    pub addrs: Vec<SocketAddr>,
    /// The session holding the lease.
    pub session: SessionId,
}

/// A presence change, fed to every server instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PresenceChange {
    /// `username` came online in `session` (any other session of that user is replaced).
    Online {
        /// Who.
        username: String,
        /// The session now holding the name.
        session: SessionId,
    },
    /// `username` went offline.
    Offline {
        /// Who.
        username: String,
    },
}

/// Storage failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The name is claimed by another key that has not lapsed.
    #[error("the name '{0}' is already taken by another key")]
    NameTaken(String),
    /// The embedded store's file or directory cannot be created or opened.
    #[error("cannot open the storage at {path}")]
    Open {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: Cause,
    },
    /// The backend cannot be reached or failed; the operation may be retried.
    #[error("storage unavailable")]
    Unavailable(#[source] Cause),
    /// Stored data could not be read back.
    #[error("stored data is corrupt: {what}")]
    Corrupt {
        /// What could not be read.
        what: String,
        /// Why, where a decoder said so.
        #[source]
        source: Option<Cause>,
    },
}

impl StorageError {
    /// [`StorageError::Unavailable`] for `cause` (an error, or a sentence).
    pub fn unavailable(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Unavailable(Cause::new(cause))
    }

    /// [`StorageError::Corrupt`]: `what` could not be read, because of `source` if given.
    pub fn corrupt(
        what: impl Into<String>,
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Corrupt {
            what: what.into(),
            source: source.map(Cause::new),
        }
    }
}

/// The server's state.
///
/// # Contract
/// - `claim` is atomic: of two registrations racing for a free name with different keys,
///   exactly one wins. A claim by another key succeeds only when the current one has lapsed
///   (`last_seen` older than `lapse`) and its owner is not online.
/// - A lease is online from `set_online` until `ttl` passes without `refresh`, until
///   `set_offline` by its own session, or until another session's `set_online` for the same
///   user replaces it. `refresh` and `set_offline` by a session that no longer holds the
///   lease change nothing and return `false`.
/// - Every transition is published once on [`Storage::presence_changes`] (expiry is
///   published by whichever `sweep` notices it first), to every server instance sharing the
///   backend.
#[async_trait]
pub trait Storage: Debug + Send + Sync + 'static {
    /// Claims `username` for `key`, or renews the owner's claim.
    async fn claim(
        &self,
        username: &str,
        key: &PublicKey,
        lapse: Duration,
    ) -> Result<(), StorageError>;

    /// The claim on `username`, lapsed or not.
    async fn claim_of(&self, username: &str) -> Result<Option<NameClaim>, StorageError>;

    /// Records that the owner `key` of `username` was just seen (a session ended).
    async fn touch(&self, username: &str, key: &PublicKey) -> Result<(), StorageError>;

    /// Puts `lease` online for `ttl`, replacing any other lease of the same user.
    async fn set_online(&self, lease: &Lease, ttl: Duration) -> Result<(), StorageError>;

    /// Puts `lease` online again after it expired, unless someone holds the name now (a
    /// newer registration that arrived meanwhile wins). `true` when it was put online.
    async fn revive(&self, lease: &Lease, ttl: Duration) -> Result<bool, StorageError>;

    /// Extends the lease of `username` held by `session` by `ttl`. `false` when `session`
    /// does not hold it (expired, or replaced).
    async fn refresh(
        &self,
        username: &str,
        session: SessionId,
        ttl: Duration,
    ) -> Result<bool, StorageError>;

    /// Ends the lease of `username` held by `session`. `false` when `session` does not hold
    /// it.
    async fn set_offline(&self, username: &str, session: SessionId) -> Result<bool, StorageError>;

    /// The online lease of `username`, if any.
    async fn online(&self, username: &str) -> Result<Option<Lease>, StorageError>;

    /// Online leases with names after `after`, in name order, at most `limit`.
    async fn list_online(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Lease>, StorageError>;

    /// Ends expired leases, publishing each as offline.
    async fn sweep(&self) -> Result<(), StorageError>;

    /// The feed of presence changes (from every instance sharing the backend).
    fn presence_changes(&self) -> broadcast::Receiver<PresenceChange>;

    /// The offline mailboxes kept beside the directory.
    fn mailbox(&self) -> Arc<dyn OfflineStore>;

    /// Hands a verified operator announcement to every instance sharing the backend (and,
    /// on Redis, to the nodes listening on the announcement channel).
    async fn publish_announcement(&self, announcement: &Announcement) -> Result<(), StorageError>;

    /// The feed of announcements to relay to this instance's sessions (published by any
    /// instance; on Redis, anything on the announcement channel, still to be verified).
    fn announcements(&self) -> broadcast::Receiver<Announcement>;

    /// Records that announcement `id` (issued at `issued_at_ms`) was relayed, durably, so a
    /// restarted instance does not relay it again. Entries older than
    /// `p2pchat_core::announce::ANNOUNCEMENT_MAX_AGE` may be forgotten.
    async fn record_announcement(&self, id: &str, issued_at_ms: u64) -> Result<(), StorageError>;

    /// The announcements recorded and issued at `since_ms` or later: id → issued-at ms.
    async fn recent_announcements(&self, since_ms: u64)
    -> Result<Vec<(String, u64)>, StorageError>;

    /// Hands a signal to every instance sharing the backend (for a user whose session is
    /// not on this one).
    async fn publish_signal(&self, signal: &Signal) -> Result<(), StorageError>;

    /// The feed of signals from every instance sharing the backend.
    fn signals(&self) -> broadcast::Receiver<Signal>;
}

/// How stale a claim's `last_seen` may get before a registration or a session's end
/// rewrites it: [`CLAIM_TOUCH_INTERVAL`], or an eighth of the lapse when that is shorter,
/// so a claim never lapses early by more than that.
pub fn touch_interval(lapse: Duration) -> Duration {
    CLAIM_TOUCH_INTERVAL.min(lapse / 8)
}

/// Milliseconds since the Unix epoch (0 before it).
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
