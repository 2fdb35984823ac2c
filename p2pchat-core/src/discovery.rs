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
use crate::transport::Connection;

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
    /// `false`: nobody can dial this node (behind a NAT, say); the directory publishes no
    /// address for it and peers reach it by connect-back or relay. `true`: the directory
    /// checks whether it can be dialed and says ([`DiscoveryEvent::Reachability`]).
    pub dialable: bool,
}

/// Where and how to join a relay the directory opened ([`DiscoveryEvent::RelayOffer`],
/// [`DiscoverySession::join_relay`]). The token is a secret: it is not printed.
#[derive(Clone, PartialEq, Eq)]
pub struct RelayTicket {
    /// The secret that pairs the two sides.
    pub token: [u8; crate::protocol::discovery::RELAY_TOKEN_LEN],
    /// The directory instance to join at; `None`: the one the session is registered with.
    pub addr: Option<SocketAddr>,
}

impl Debug for RelayTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayTicket")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
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
    /// The connection to the directory was lost; the session reconnects by itself
    /// ([`DiscoveryEvent::Reconnected`] when it is back).
    Lost {
        /// What broke, as a sentence.
        reason: String,
    },
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
    /// Whether the directory can dial this node at the addresses it registered (after every
    /// registration of a node that said it is dialable; `false` at once for one that said it
    /// is not).
    Reachability {
        /// `true`: its addresses are published; peers dial it directly.
        dialable: bool,
    },
    /// `username` cannot be dialed and asks this node to dial it.
    ConnectBack {
        /// Who.
        username: String,
    },
    /// `username` opened a relay to this node through the directory: join it
    /// ([`DiscoverySession::join_relay`]) and run the peer handshake over it.
    RelayOffer {
        /// Who.
        username: String,
        /// Where and how to join.
        ticket: RelayTicket,
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
    /// This directory (or the peer's registration with it) does not offer what was asked:
    /// connect-back or relays.
    #[error("not offered by this directory: {0}")]
    Unsupported(String),
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
    /// Asks for presence events about `username` from now on. Only a name somebody holds
    /// can be watched ([`DiscoveryError::Refused`] otherwise).
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
    /// Asks `username`, who cannot be dialed, to dial this node (which can be): it gets
    /// [`DiscoveryEvent::ConnectBack`]. `Ok` once the request is on its way; whether the
    /// connection comes is seen on the listener. By default, unsupported.
    async fn connect_back(&self, username: &str) -> Result<(), DiscoveryError> {
        Err(DiscoveryError::Unsupported(format!(
            "connect-back to {username}"
        )))
    }
    /// Opens a connection to `username` relayed by the directory: a byte stream like a
    /// transport's, over which the peer handshake runs end to end; `username` gets
    /// [`DiscoveryEvent::RelayOffer`] to join the other end. By default, unsupported.
    async fn relay(&self, username: &str) -> Result<Connection, DiscoveryError> {
        Err(DiscoveryError::Unsupported(format!(
            "a relay to {username}"
        )))
    }
    /// Joins the relay of a [`DiscoveryEvent::RelayOffer`]. By default, unsupported.
    async fn join_relay(&self, ticket: &RelayTicket) -> Result<Connection, DiscoveryError> {
        let _ = ticket;
        Err(DiscoveryError::Unsupported("relays".into()))
    }
}
