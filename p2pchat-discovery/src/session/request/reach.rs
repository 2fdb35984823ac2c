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
    // Only a user whose addresses the probe verified: the peer dials what the directory
    // publishes for us, and nobody may aim other people's nodes at addresses not their own.
    if !session.probed || session.lease.addrs.is_empty() {
        return Err(WireError::Forbidden(
            "connect-back is for users the server could dial (verified by its probe); use a \
             relay"
                .into(),
        ));
    }
    if !session.directory.connect_backs.allow(&username.to_owned()) {
        return Err(WireError::RateLimited);
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
    // Both sides join at this instance: at its relay address when it has one (so that
    // joins behind a load balancer come back here), else where each side reaches it now.
    let addr = directory.relay_addr();
    match directory.takes_pushes(username) {
        Some(true) => {}
        Some(false) => {
            return Err(WireError::Forbidden(format!(
                "{username}'s node does not take relays (an older version)"
            )));
        }
        None => {
            let online = directory
                .storage
                .online(username)
                .await
                .map_err(crate::mail::storage_error)?;
            if online.is_none() {
                return Err(WireError::Forbidden(format!("{username} is not online")));
            }
            if addr.is_none() {
                return Err(WireError::Forbidden(format!(
                    "{username} is registered with another instance, and this one has no \
                     relay address for it (--relay-addr)"
                )));
            }
        }
    }
    let limits = RelayLimits {
        total: config.max_relays,
        per_user: config.max_relays_per_user,
    };
    let tokens = directory.relays.open(me, username, limits)?;
    let push = Push::RelayOffer {
        username: me.clone(),
        ticket: Box::new(WireRelayTicket {
            token: tokens.target,
            addr,
        }),
    };
    if let Err(e) = directory.signal(username, push).await {
        directory.relays.cancel(&tokens.opener);
        return Err(e);
    }
    Ok(Reply::Relay(WireRelayTicket {
        token: tokens.opener,
        addr,
    }))
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
