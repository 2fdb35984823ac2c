//! Registration: the challenge, the signed claim, the name's key, the presence lease.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use futures::StreamExt;
use p2pchat_core::limits::limit_key;
use p2pchat_core::protocol::discovery::{
    ClientFrame, MAX_ANNOUNCED_ADDRS, RegisterRequest, Registered, ServerFrame, WireError,
    register_transcript,
};
use p2pchat_core::protocol::{NONCE_LEN, validate_username};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::connection::{Reader, Writer, decode_error};
use super::{Opening, Session, announce};
use crate::config::SESSION_PUSH_CAPACITY;
use crate::directory::Directory;
use crate::mail::storage_error;
use crate::storage::{Lease, SessionId};

/// Challenge, verify, claim, go online (or relay an announcement). `Err(None)`: the
/// connection failed, say nothing.
pub(super) async fn apply<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    directory: &Arc<Directory>,
    reader: &mut Reader<R>,
    writer: &mut Writer<W>,
    peer: SocketAddr,
) -> Result<Opening, Option<WireError>> {
    let nonce: [u8; NONCE_LEN] = rand::random();
    writer
        .send(&ServerFrame::Challenge { nonce })
        .await
        .map_err(|_| None)?;
    let request: Box<RegisterRequest> = match reader.next().await {
        Some(Ok(ClientFrame::Register(request))) => request,
        Some(Ok(ClientFrame::Announce(announcement))) => {
            return announce::apply(directory, writer, &announcement).await;
        }
        Some(Ok(_)) => {
            return Err(Some(WireError::BadFrame(
                "the first frame must be a registration".into(),
            )));
        }
        Some(Err(e)) => return Err(decode_error(e)),
        None => return Err(None),
    };
    if !directory.registrations.allow(&limit_key(peer.ip())) {
        return Err(Some(WireError::RateLimited));
    }
    let claim = &request.claim;
    validate_username(&claim.username)
        .map_err(|_| Some(WireError::InvalidUsername(claim.username.clone())))?;
    if claim.announce.len() > MAX_ANNOUNCED_ADDRS {
        return Err(Some(WireError::LimitExceeded(format!(
            "at most {MAX_ANNOUNCED_ADDRS} announced addresses"
        ))));
    }
    if !claim
        .public_key
        .verify(&register_transcript(&nonce, claim), &request.signature)
    {
        return Err(Some(WireError::BadSignature));
    }
    let storage = &directory.storage;
    let config = &directory.config;
    storage
        .claim(&claim.username, &claim.public_key, config.claim_lapse)
        .await
        .map_err(|e| Some(storage_error(e)))?;
    let addrs = if claim.announce.is_empty() {
        vec![SocketAddr::new(peer.ip(), claim.listen_port)]
    } else {
        claim.announce.clone()
    };
    let lease = Lease {
        username: claim.username.clone(),
        public_key: claim.public_key,
        addrs: addrs.clone(),
        session: SessionId::random(),
    };
    storage
        .set_online(&lease, config.presence_ttl)
        .await
        .map_err(|e| Some(storage_error(e)))?;
    let mail = directory
        .mail
        .subscribe(&lease.username)
        .await
        .map_err(Some)?;
    let (pushes, push_rx) = mpsc::channel(SESSION_PUSH_CAPACITY);
    let check = directory.add_session(&lease.username, lease.session, pushes.clone());
    let session = Session {
        directory: directory.clone(),
        lease,
        since: Instant::now(),
        check,
        pushes,
        push_rx,
        watching: HashSet::new(),
        handed_out: Vec::new(),
    };
    let confirmation = ServerFrame::Registered(Box::new(Registered {
        observed: peer,
        addrs,
        presence_ttl_ms: config.presence_ttl.as_millis() as u64,
        operator_key: directory.operator_key,
    }));
    if writer.send(&confirmation).await.is_err() {
        session.end(false).await;
        return Err(None);
    }
    tracing::debug!(user = %session.lease.username, "registered");
    Ok(Opening::Session(Box::new(session), mail))
}
