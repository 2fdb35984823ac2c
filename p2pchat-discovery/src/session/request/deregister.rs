//! `Deregister`: the session goes offline now.

use p2pchat_core::protocol::discovery::Reply;

use super::{Answer, Then};

/// Answers, then closes: the session's end takes it offline once the answer is written.
pub(in crate::session) fn apply() -> Answer {
    (Ok(Reply::Done), Then::Close)
}
