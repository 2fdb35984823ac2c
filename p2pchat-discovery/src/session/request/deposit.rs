//! `Deposit`: a message into its recipient's mailbox, by the mail rules ([`crate::mail`]).

use p2pchat_core::protocol::discovery::{Reply, WireMessage};

use super::{Answer, Then};
use crate::session::Session;

/// Deposits `message` in this session's user's name.
pub(in crate::session) async fn apply(session: &mut Session, message: WireMessage) -> Answer {
    let deposited = session
        .directory
        .mail
        .deposit(&session.lease.username, message)
        .await;
    (deposited.map(|()| Reply::Done), Then::Continue)
}
