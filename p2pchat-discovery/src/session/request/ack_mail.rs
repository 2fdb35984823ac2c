//! `AckMail`: processed messages leave this session's user's mailbox.

use p2pchat_core::protocol::MessageId;
use p2pchat_core::protocol::discovery::Reply;

use super::{Answer, Then};
use crate::session::Session;

/// Removes `ids` (unknown ones are ignored).
pub(in crate::session) async fn apply(session: &mut Session, ids: &[MessageId]) -> Answer {
    let acked = session
        .directory
        .mail
        .ack(&session.lease.username, ids)
        .await;
    (acked.map(|()| Reply::Done), Then::Continue)
}
