//! `Deposit` and `DepositBatch`: messages into their recipients' mailboxes, by the mail rules
//! ([`crate::mail`]). They depend on nothing else the session does, so a session runs them
//! concurrently with each other (answering in order): deposits in flight together reach the
//! mailbox's group commit together. Each owns what it needs, to run beside the session.

use std::sync::Arc;

use p2pchat_core::protocol::discovery::{Reply, WireMessage};

use super::{Answer, Then};
use crate::directory::Directory;

/// Deposits `message` in `me`'s name.
pub(in crate::session) async fn apply(
    directory: Arc<Directory>,
    me: String,
    message: WireMessage,
) -> Answer {
    let deposited = directory.mail.deposit(&me, message).await;
    (deposited.map(|()| Reply::Done), Then::Continue)
}

/// Deposits each of `batch` in `me`'s name, answering for each.
pub(in crate::session) async fn batch(
    directory: Arc<Directory>,
    me: String,
    batch: Vec<WireMessage>,
) -> Answer {
    let deposited = directory.mail.deposit_batch(&me, batch).await;
    (deposited.map(Reply::Deposited), Then::Continue)
}
