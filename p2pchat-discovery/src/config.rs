//! The server's settings: [`Config`], and the named defaults of every limit and timing.

use std::net::SocketAddr;
use std::time::Duration;

use p2pchat_core::Identity;
use p2pchat_core::protocol::discovery::{DEFAULT_CLAIM_LAPSE, DEFAULT_PRESENCE_TTL};

/// Where the binary listens unless told otherwise (as the original).
pub const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:5001";

/// Most connections the server holds at once. Default: 20,000.
pub const MAX_CONNECTIONS: usize = 20_000;

/// Most connections from one IP address. Default: 256 (a NAT can hide many users).
pub const MAX_CONNECTIONS_PER_IP: usize = 256;

/// Registrations per second allowed from one IP address (bursts of twice as many).
/// Default: 20.
pub const REGISTRATIONS_PER_SECOND_PER_IP: u32 = 20;

/// New names one IP address may claim per hour (bursts of as many); renewing one's own
/// claim does not count. Default: 10.
pub const NEW_CLAIMS_PER_HOUR_PER_IP: u32 = 10;

/// Lookups and listing pages per second one session may ask for (bursts of twice as many).
/// Default: 50.
pub const LOOKUPS_PER_SECOND_PER_SESSION: u32 = 50;

/// Lookups and listing pages per second from one IP address, all its sessions together
/// (bursts of twice as many). Default: 1,000.
pub const LOOKUPS_PER_SECOND_PER_IP: u32 = 1_000;

/// Watches held on this instance, all sessions together. Default: 1,000,000.
pub const MAX_TOTAL_WATCHES: usize = 1_000_000;

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

/// How long the reachability probe of a registering node may take (connect, probe, signed
/// answer) before the node counts as not dialable. Default: 1 s.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Reachability probes under way at once, across registrations; a probe waits for a
/// place within its timeout. Default: 256.
pub const MAX_PROBES_IN_FLIGHT: usize = 256;

/// Most relays open at once (joined or waiting to be). Default: 1,024.
pub const MAX_RELAYS: usize = 1024;

/// Most relays one user takes part in at once (on either side). Default: 32.
pub const MAX_RELAYS_PER_USER: usize = 32;

/// Bytes per second one relay carries, both directions together (bursts of one second's
/// worth). Default: 1 MiB/s: chat, not bulk transfer.
pub const RELAY_BYTES_PER_SECOND: u32 = 1 << 20;

/// A relay that carries nothing for this long is closed (peers ping every 15 s). Default:
/// 60 s.
pub const RELAY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Connect-back and relay requests per second from one user (bursts of twice as many).
/// Default: 10.
pub const REACH_REQUESTS_PER_SECOND_PER_USER: u32 = 10;

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
    /// 0 means unlimited. By default, [`NEW_CLAIMS_PER_HOUR_PER_IP`].
    pub new_claims_per_hour_per_ip: u32,
    /// The longest a deposited message may wait, counted from its token's timestamp: a
    /// deposit whose token is older is refused, and a later expiry is cut to this. At most
    /// [`MAX_MESSAGE_TTL`]. By default, [`DEFAULT_MESSAGE_TTL`] (7 days).
    ///
    /// [`MAX_MESSAGE_TTL`]: p2pchat_core::store::MAX_MESSAGE_TTL
    /// [`DEFAULT_MESSAGE_TTL`]: p2pchat_core::store::DEFAULT_MESSAGE_TTL
    pub message_ttl: Duration,
    /// 0 means unlimited. By default, [`LOOKUPS_PER_SECOND_PER_SESSION`].
    pub lookups_per_second_per_session: u32,
    /// 0 means unlimited. By default, [`LOOKUPS_PER_SECOND_PER_IP`].
    pub lookups_per_second_per_ip: u32,
    /// By default, [`MAX_TOTAL_WATCHES`].
    pub max_total_watches: usize,
    /// The key that signs announcements. Nodes learn its public half at registration and
    /// pin it. By default, none: the server relays no announcements.
    pub operator: Option<Identity>,
    /// Time allowed for the reachability probe of a registering node; zero: no probe (every
    /// node that says it is dialable is published as dialable). By default,
    /// [`PROBE_TIMEOUT`].
    pub probe_timeout: Duration,
    /// 0 disables relaying. By default, [`MAX_RELAYS`].
    pub max_relays: usize,
    /// By default, [`MAX_RELAYS_PER_USER`].
    pub max_relays_per_user: usize,
    /// 0 means unlimited. By default, [`RELAY_BYTES_PER_SECOND`].
    pub relay_bytes_per_second: u32,
    /// By default, [`RELAY_IDLE_TIMEOUT`].
    pub relay_idle_timeout: Duration,
    /// 0 means unlimited. By default, [`REACH_REQUESTS_PER_SECOND_PER_USER`].
    pub reach_requests_per_second_per_user: u32,
    /// Where nodes registered with other instances (sharing Redis) join relays this
    /// instance holds. By default, none: the listening address, when it is a specific one
    /// (not `0.0.0.0`); otherwise relays are offered only between this instance's sessions.
    pub relay_addr: Option<SocketAddr>,
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
            new_claims_per_hour_per_ip: NEW_CLAIMS_PER_HOUR_PER_IP,
            message_ttl: p2pchat_core::store::DEFAULT_MESSAGE_TTL,
            lookups_per_second_per_session: LOOKUPS_PER_SECOND_PER_SESSION,
            lookups_per_second_per_ip: LOOKUPS_PER_SECOND_PER_IP,
            max_total_watches: MAX_TOTAL_WATCHES,
            operator: None,
            probe_timeout: PROBE_TIMEOUT,
            max_relays: MAX_RELAYS,
            max_relays_per_user: MAX_RELAYS_PER_USER,
            relay_bytes_per_second: RELAY_BYTES_PER_SECOND,
            relay_idle_timeout: RELAY_IDLE_TIMEOUT,
            reach_requests_per_second_per_user: REACH_REQUESTS_PER_SECOND_PER_USER,
            relay_addr: None,
        }
    }
}
