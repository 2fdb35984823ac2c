//! `FetchMail`: this session's user's oldest waiting messages, left in place.

use p2pchat_core::protocol::discovery::Reply;
use p2pchat_core::store::MailKey;

use super::{Answer, Then};
use crate::session::{HANDED_OUT, Session};

/// At most `limit` messages, as many as fit one reply. Remembers which (sender, id) it
/// handed out, so that a node that acknowledges by id alone (`AckMail`) can be understood.
pub(in crate::session) async fn apply(session: &mut Session, limit: u32) -> Answer {
    let fetched = session
        .directory
        .mail
        .fetch(&session.lease.username, limit)
        .await;
    if let Ok(mail) = &fetched {
        let handed = &mut session.handed_out;
        handed.extend(mail.iter().map(|m| MailKey {
            from: m.from.clone(),
            id: m.id,
        }));
        if handed.len() > HANDED_OUT {
            handed.drain(..handed.len() - HANDED_OUT);
        }
    }
    (fetched.map(Reply::Mail), Then::Continue)
}
