//! `FetchMail`: this session's user's oldest waiting messages, left in place.

use p2pchat_core::protocol::discovery::Reply;

use super::{Answer, Then};
use crate::session::Session;

/// At most `limit` messages, as many as fit one reply.
pub(in crate::session) async fn apply(session: &mut Session, limit: u32) -> Answer {
    let fetched = session
        .directory
        .mail
        .fetch(&session.lease.username, limit)
        .await;
    (fetched.map(Reply::Mail), Then::Continue)
}
