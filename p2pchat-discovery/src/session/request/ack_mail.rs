//! `AckMailFrom`: processed messages leave this session's user's mailbox. The retired
//! `AckMail` (ids without senders) is refused.

use p2pchat_core::protocol::discovery::{Reply, WireError, WireMailKey};

use super::{Answer, Then};
use crate::session::Session;

/// Removes the messages `acked` names by sender and id (unknown ones are ignored).
pub(in crate::session) async fn apply(session: &mut Session, acked: Vec<WireMailKey>) -> Answer {
    let acked = session
        .directory
        .mail
        .ack(&session.lease.username, acked)
        .await;
    (acked.map(|()| Reply::Done), Then::Continue)
}

/// `AckMail`: an id alone does not say whose message it is (another sender may have used
/// the same id), so acknowledging by id could remove a message its recipient never saw.
/// Refused; the session goes on (the node's mail stays until it acknowledges properly).
pub(in crate::session) fn retired() -> Answer {
    (
        Err(WireError::UnsupportedVersion(
            "AckMail names no sender; this server takes AckMailFrom (upgrade the node)".to_owned(),
        )),
        Then::Continue,
    )
}
