//! Finding peers: the [`Discovery`] trait, its session, [`DiscoveryClient`] (to a
//! `p2pchat-discovery` server) and [`MemoryDiscovery`].
//!
//! A node registers once through [`Discovery::register`] and gets a [`DiscoverySession`]: the
//! handle through which it keeps alive, looks peers up, lists who is online and watches
//! presence. Presence changes and other server pushes arrive on the event channel the node
//! handed to `register`.

pub(crate) mod client;
mod mailbox;
mod memory;

use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::announce::Announcement;
use crate::error::Cause;
use crate::identity::{Identity, PublicKey};
use crate::protocol::UsernameError;
use crate::store::OfflineStore;

/// The directory's rules, which the client and the server share.
pub use crate::protocol::discovery::{DEFAULT_CLAIM_LAPSE, DEFAULT_PRESENCE_TTL, MAX_PAGE_SIZE};
pub use client::{
    DEFAULT_DISCOVERY_ADDR, DISCOVERY_CONNECT_TIMEOUT, DISCOVERY_REQUEST_TIMEOUT, DiscoveryClient,
    RECONNECT_BACKOFF,
};
pub use mailbox::MailboxStore;
pub use memory::MemoryDiscovery;

/// How often a node keeps its registration alive. Default: 10 s, as the original.
pub const DEFAULT_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// What a node tells the directory about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The name to claim or re-use.
    pub username: String,
    /// The port the node accepts peer connections on; the directory pairs it with the IP
    /// address it observes the node connecting from.
    pub listen_port: u16,
    /// Explicit addresses to publish instead of the observed one (empty: use the observed).
    pub announce: Vec<SocketAddr>,
}

/// What the directory knows about a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRecord {
    /// The username.
    pub username: String,
    /// The identity key the name is bound to.
    pub public_key: PublicKey,
    /// Where the user accepts connections (empty when offline).
    pub addrs: Vec<SocketAddr>,
    /// Whether the user is online now.
    pub online: bool,
    /// When the user last registered or kept alive.
    pub last_seen: SystemTime,
}

/// One page of online users, in username order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The users on this page.
    pub users: Vec<PeerRecord>,
    /// Pass as `after` to get the next page; `None` on the last page.
    pub next: Option<String>,
}

/// Pushed to a node by its discovery session.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DiscoveryEvent {
    /// A watched user came online (or re-registered, possibly at a new address).
    PeerOnline {
        /// Who.
        username: String,
    },
    /// A watched user went offline.
    PeerOffline {
        /// Who.
        username: String,
    },
    /// An operator announcement, as received: the node checks it against the operator key
    /// it pinned before showing it.
    Announcement(Box<Announcement>),
    /// The session was lost and is back (registered again): calls that failed meanwhile
    /// are worth trying again now.
    Reconnected,
    /// The session ended for good on the directory's side: the same user registered again
    /// elsewhere, or the directory refused to take the session back after a reconnection.
    /// The node stays up (its peer connections keep working) but is no longer listed.
    SessionEnded {
        /// Why, as a sentence.
        reason: String,
    },
}

/// Errors from the directory.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// The name is claimed by another key.
    #[error("the name '{username}' is already taken by another key")]
    NameTaken {
        /// The name asked for.
        username: String,
    },
    /// The name breaks the username rules.
    #[error("invalid username")]
    InvalidUsername(#[from] UsernameError),
    /// The registration's proof of key ownership did not verify.
    #[error("the registration's signature does not verify")]
    BadSignature,
    /// The directory could not be reached.
    #[error("cannot reach the discovery server at {addr}")]
    Unreachable {
        /// Where it was looked for.
        addr: String,
        /// Why (the connection error, a timeout, a closed session).
        #[source]
        source: Cause,
    },
    /// Too many requests; try again later.
    #[error("rate limited by the discovery server; try again later")]
    RateLimited,
    /// The directory refused the request (an announcement its operator did not sign, say).
    #[error("refused by the discovery server: {0}")]
    Refused(String),
    /// A limit of the directory was reached (connections, watches, announced addresses).
    #[error("discovery limit exceeded: {0}")]
    LimitExceeded(String),
    /// The session was closed (deregistered, or the directory went away for good).
    #[error("the discovery session is closed")]
    Closed,
    /// The directory answered something this client does not understand.
    #[error("discovery protocol error: {0}")]
    Protocol(String),
    /// The directory's storage failed.
    #[error("discovery backend error: {0}")]
    Backend(String),
}

/// A directory of users: name → key, addresses and presence.
///
/// # Contract
/// - `register` proves ownership of `identity` (signing a fresh challenge) and claims
///   `registration.username` for its key. The first registration of a name claims it; a
///   registration of a claimed name with another key fails with
///   [`DiscoveryError::NameTaken`]; the owner may register again from anywhere, which
///   replaces its previous session. A claim lapses only after long inactivity
///   ([`DEFAULT_CLAIM_LAPSE`] unless configured).
/// - The returned session is online until it deregisters, is dropped (at once), or misses
///   keep-alives for the presence TTL ([`DEFAULT_PRESENCE_TTL`] unless configured).
/// - Presence changes of users the session [`watch`](DiscoverySession::watch)es are sent on
///   `events`, pushed, not polled. Events for one user arrive in the order they happened.
///
/// # Cancel safety
/// A cancelled `register` leaves the name either claimed or not; it never leaves a session
/// online that nobody holds.
#[async_trait]
pub trait Discovery: Debug + Send + Sync + 'static {
    /// Registers `identity` under `registration.username`.
    async fn register(
        &self,
        identity: &Identity,
        registration: Registration,
        events: mpsc::Sender<DiscoveryEvent>,
    ) -> Result<Box<dyn DiscoverySession>, DiscoveryError>;
}

/// A registered node's handle on the directory. Dropping it marks the user offline.
#[async_trait]
pub trait DiscoverySession: Debug + Send + Sync + 'static {
    /// Refreshes presence; call more often than the presence TTL.
    async fn keep_alive(&self) -> Result<(), DiscoveryError>;
    /// Looks one user up, online or not. `None` when the name was never claimed (or lapsed).
    async fn lookup(&self, username: &str) -> Result<Option<PeerRecord>, DiscoveryError>;
    /// Online users with names after `after`, in name order, at most `limit` (capped at
    /// [`MAX_PAGE_SIZE`]).
    async fn list_online(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> Result<Page, DiscoveryError>;
    /// Asks for presence events about `username` from now on.
    async fn watch(&self, username: &str) -> Result<(), DiscoveryError>;
    /// Goes offline now. Later calls fail with [`DiscoveryError::Closed`].
    async fn deregister(&self) -> Result<(), DiscoveryError>;
    /// The directory's mailbox for this session's user, when the directory keeps offline
    /// mail (a `p2pchat-discovery` server does). By default, none.
    fn mailbox(&self) -> Option<Arc<dyn OfflineStore>> {
        None
    }
    /// The key that signs the directory operator's announcements, as the directory said at
    /// registration. By default, none.
    fn operator_key(&self) -> Option<PublicKey> {
        None
    }
}
