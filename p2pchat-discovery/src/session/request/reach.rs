//! `ConnectBack` and `Relay`: reaching a peer that cannot be dialed.

use p2pchat_core::protocol::discovery::{Push, Reply, WireError, WireRelayTicket};
use p2pchat_core::protocol::validate_username;

use super::{Answer, Then};
use crate::relay::RelayLimits;
use crate::session::Session;

/// Asks `username` to dial this session's user, who can be dialed.
pub(in crate::session) async fn connect_back(session: &mut Session, username: &str) -> Answer {
    (ask_connect_back(session, username).await, Then::Continue)
}

async fn ask_connect_back(session: &Session, username: &str) -> Result<Reply, WireError> {
    let me = &session.lease.username;
    check(session, username)?;
    if session.lease.addrs.is_empty() {
        return Err(WireError::Forbidden(
            "connect-back is for users the server could dial; use a relay".into(),
        ));
    }
    let push = Push::ConnectBack {
        username: me.clone(),
    };
    session.directory.signal(username, push).await?;
    Ok(Reply::Done)
}

/// Opens a relay between this session's user and `username`.
pub(in crate::session) async fn relay(session: &mut Session, username: &str) -> Answer {
    (open_relay(session, username).await, Then::Continue)
}

async fn open_relay(session: &Session, username: &str) -> Result<Reply, WireError> {
    let me = &session.lease.username;
    check(session, username)?;
    let directory = &session.directory;
    let config = &directory.config;
    if config.max_relays == 0 {
        return Err(WireError::Forbidden("this server relays nothing".into()));
    }
    // The other side joins here: at this instance's relay address if its session is on
    // another instance.
    let addr = match directory.takes_pushes(username) {
        Some(true) => None,
        Some(false) => {
            return Err(WireError::Forbidden(format!(
                "{username}'s node does not take relays (an older version)"
            )));
        }
        None => Some(directory.relay_addr().ok_or_else(|| {
            WireError::Forbidden(format!(
                "{username} is registered with another instance, and this one has no relay \
                 address for it (--relay-addr)"
            ))
        })?),
    };
    let limits = RelayLimits {
        total: config.max_relays,
        per_user: config.max_relays_per_user,
    };
    let token = directory.relays.open(me, username, limits)?;
    let push = Push::RelayOffer {
        username: me.clone(),
        ticket: WireRelayTicket { token, addr },
    };
    if let Err(e) = directory.signal(username, push).await {
        directory.relays.cancel(&token);
        return Err(e);
    }
    Ok(Reply::Relay(WireRelayTicket { token, addr: None }))
}

/// The rules both requests share: a valid other user, within the request rate.
fn check(session: &Session, username: &str) -> Result<(), WireError> {
    let me = &session.lease.username;
    if validate_username(username).is_err() {
        return Err(WireError::InvalidUsername(username.to_owned()));
    }
    if username == me {
        return Err(WireError::Forbidden(
            "that is this session's own user".into(),
        ));
    }
    if !session.directory.reach_requests.allow(me) {
        return Err(WireError::RateLimited);
    }
    Ok(())
}
