//! `KeepAlive`: refreshes the session's presence lease.

use p2pchat_core::protocol::discovery::Reply;

use super::{Answer, Then};
use crate::mail::storage_error;
use crate::session::Session;

/// Refreshes the lease. A session that missed its keep-alives but is still here is online
/// again, unless a newer registration took the name meanwhile (then that one wins).
pub(in crate::session) async fn apply(session: &mut Session) -> Answer {
    let directory = &session.directory;
    let (storage, config, lease) = (&directory.storage, &directory.config, &session.lease);
    match storage
        .refresh(&lease.username, lease.session, config.presence_ttl)
        .await
    {
        Ok(true) => (Ok(Reply::Done), Then::Continue),
        Ok(false) => match storage.online(&lease.username).await {
            Ok(Some(current)) if current.session != lease.session => {
                (Ok(Reply::Done), Then::Replaced)
            }
            Ok(_) => match storage.revive(lease, config.presence_ttl).await {
                Ok(true) => (Ok(Reply::Done), Then::Continue),
                Ok(false) => (Ok(Reply::Done), Then::Replaced),
                Err(e) => (Err(storage_error(e)), Then::Continue),
            },
            Err(e) => (Err(storage_error(e)), Then::Continue),
        },
        Err(e) => (Err(storage_error(e)), Then::Continue),
    }
}
