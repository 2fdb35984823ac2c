//! `AckMailFrom`: processed messages leave this session's user's mailbox. `AckMail`, from
//! nodes that acknowledge by id alone, is understood through what this session was handed.

use std::collections::HashSet;

use p2pchat_core::MessageId;
use p2pchat_core::protocol::MAX_ACK_BATCH;
use p2pchat_core::protocol::discovery::{Reply, WireError, WireMailKey};
use p2pchat_core::store::MailKey;

use super::{Answer, Then};
use crate::session::Session;

/// Removes the messages `acked` names by sender and id (unknown ones are ignored).
pub(in crate::session) async fn apply(session: &mut Session, acked: Vec<WireMailKey>) -> Answer {
    // A node that names senders needs no memory of what it was handed.
    session.handed_out = Vec::new();
    remove(session, acked).await
}

/// Takes `acked` out of the session user's mailbox.
async fn remove(session: &Session, acked: Vec<WireMailKey>) -> Answer {
    let acked = session
        .directory
        .mail
        .ack(&session.lease.username, acked)
        .await;
    (acked.map(|()| Reply::Done), Then::Continue)
}

/// `AckMail`, from nodes older than `AckMailFrom`. An id alone does not say whose message it
/// is (another sender may have used the same id), so it is read as "the messages with these
/// ids that this session's fetches handed out": what the node processed, and never a message
/// it was not shown.
pub(in crate::session) async fn by_id(session: &mut Session, ids: &[MessageId]) -> Answer {
    if ids.len() > MAX_ACK_BATCH {
        return (
            Err(WireError::LimitExceeded(format!(
                "at most {MAX_ACK_BATCH} ids per acknowledgement"
            ))),
            Then::Continue,
        );
    }
    let ids: HashSet<&MessageId> = ids.iter().collect();
    let (acked, kept): (Vec<MailKey>, Vec<MailKey>) = std::mem::take(&mut session.handed_out)
        .into_iter()
        .partition(|key| ids.contains(&key.id));
    session.handed_out = kept;
    remove(session, acked.into_iter().map(Into::into).collect()).await
}
