//! `TakeExpired`: expiry notices of messages this session's user sent.

use p2pchat_core::protocol::discovery::Reply;

use super::{Answer, Then};
use crate::session::Session;

/// The notices waiting (each handed out once).
pub(in crate::session) async fn apply(session: &mut Session) -> Answer {
    let taken = session
        .directory
        .mail
        .take_expired(&session.lease.username)
        .await;
    (taken.map(Reply::Expired), Then::Continue)
}
