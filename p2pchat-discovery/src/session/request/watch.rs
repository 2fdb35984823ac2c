//! `Watch` and `Unwatch`: presence changes of a user, pushed to this session.

use p2pchat_core::protocol::discovery::{MAX_WATCHES, Reply, WireError};
use p2pchat_core::protocol::validate_username;

use super::{Answer, Then};
use crate::mail::storage_error;
use crate::session::Session;

/// Pushes `username`'s presence changes from now on (at most [`MAX_WATCHES`] users per
/// session, and only names somebody holds: a watch costs the server a table entry).
pub(in crate::session) async fn watch(session: &mut Session, username: String) -> Answer {
    if validate_username(&username).is_err() {
        return (Err(WireError::InvalidUsername(username)), Then::Continue);
    }
    if !session.watching.contains(&username) {
        if session.watching.len() >= MAX_WATCHES {
            let error = WireError::LimitExceeded(format!(
                "a session may watch at most {MAX_WATCHES} users"
            ));
            return (Err(error), Then::Continue);
        }
        match session.directory.storage.claim_of(&username).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                let error = WireError::Forbidden(format!(
                    "nobody has the name '{username}': there is nothing to watch"
                ));
                return (Err(error), Then::Continue);
            }
            Err(e) => return (Err(storage_error(e)), Then::Continue),
        }
        let pushes = session.pushes.clone();
        if !session
            .directory
            .watch(&username, session.lease.session, pushes)
        {
            let error = WireError::LimitExceeded(format!(
                "the server holds at most {} watches",
                session.directory.config.max_total_watches
            ));
            return (Err(error), Then::Continue);
        }
        session.watching.insert(username);
    }
    (Ok(Reply::Done), Then::Continue)
}

/// Stops pushing `username`'s presence changes.
pub(in crate::session) fn unwatch(session: &mut Session, username: &str) -> Answer {
    if session.watching.remove(username) {
        session.directory.unwatch(username, session.lease.session);
    }
    (Ok(Reply::Done), Then::Continue)
}
