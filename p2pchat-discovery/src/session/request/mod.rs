//! One file per request kind, each with an `apply` that answers it for a session (as
//! mini-redis keeps each command in `cmd/<name>.rs`).

pub(super) mod ack_mail;
pub(super) mod deposit;
pub(super) mod deregister;
pub(super) mod fetch_mail;
pub(super) mod keep_alive;
pub(super) mod list_online;
pub(super) mod lookup;
pub(super) mod reach;
pub(super) mod take_expired;
pub(super) mod watch;

use std::time::SystemTime;

pub(super) use crate::storage::unix_ms;

use p2pchat_core::protocol::discovery::{Reply, WireError, WirePeer};

use crate::storage::Lease;

/// What to do after answering a request.
pub(in crate::session) enum Then {
    /// Go on serving.
    Continue,
    /// Close the session (it deregistered).
    Close,
    /// Another registration of the user replaced this session.
    Replaced,
}

/// A request's answer, and what to do next.
pub(in crate::session) type Answer = (Result<Reply, WireError>, Then);

/// An online user as the wire describes it.
fn online_peer(lease: Lease, now: SystemTime) -> WirePeer {
    WirePeer {
        username: lease.username,
        public_key: lease.public_key,
        addrs: lease.addrs,
        online: true,
        last_seen_ms: unix_ms(now),
    }
}
