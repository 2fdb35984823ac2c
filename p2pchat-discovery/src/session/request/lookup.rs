//! `Lookup`: one user, online or not.

use std::time::SystemTime;

use p2pchat_core::protocol::discovery::{Reply, WireError, WirePeer};
use p2pchat_core::protocol::validate_username;

use super::{Answer, Then, online_peer, unix_ms};
use crate::mail::storage_error;
use crate::session::Session;

/// The user's record: online with its addresses, offline with when it was last seen, or
/// nothing for a name nobody holds (or whose claim lapsed).
pub(in crate::session) async fn apply(session: &mut Session, username: &str) -> Answer {
    (record(session, username).await, Then::Continue)
}

async fn record(session: &Session, username: &str) -> Result<Reply, WireError> {
    if validate_username(username).is_err() {
        return Ok(Reply::Record(None));
    }
    let directory = &session.directory;
    let storage = &directory.storage;
    let Some(claim) = storage.claim_of(username).await.map_err(storage_error)? else {
        return Ok(Reply::Record(None));
    };
    if let Some(lease) = storage.online(username).await.map_err(storage_error)? {
        return Ok(Reply::Record(Some(Box::new(online_peer(
            lease,
            SystemTime::now(),
        )))));
    }
    let lapsed = SystemTime::now()
        .duration_since(claim.last_seen)
        .is_ok_and(|age| age >= directory.config.claim_lapse);
    Ok(Reply::Record((!lapsed).then(|| {
        Box::new(WirePeer {
            username: username.to_owned(),
            public_key: claim.public_key,
            addrs: Vec::new(),
            online: false,
            last_seen_ms: unix_ms(claim.last_seen),
        })
    })))
}
