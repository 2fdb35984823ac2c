//! The peer handshake: both sides prove their identity keys before any message flows.
//!
//! ```text
//! dialer                                   listener
//!   Hello{me, peer, key, nonce_d}  ──────▶  checks: addressed to me? blocked? key matches
//!                                           the pin / the directory?  (else Error, close)
//!   ◀──────  Hello{me, peer, key, nonce_l}, Auth{sign(transcript, L)}
//!   checks key is the one it expects,
//!   verifies the listener's signature
//!   Auth{sign(transcript, D)}      ──────▶  verifies the dialer's signature
//! ```

use futures::{SinkExt, StreamExt};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::identity::{Identity, PublicKey};
use crate::protocol::discovery::probe_transcript;
use crate::protocol::{
    ErrorCode, FrameCodec, Hello, PeerFrame, ProtocolError, Role, handshake_transcript,
    validate_username,
};
use crate::transport::{Connection, ReadHalf, WriteHalf};

pub(crate) type FrameReader = FramedRead<ReadHalf, FrameCodec<PeerFrame>>;
pub(crate) type FrameWriter = FramedWrite<WriteHalf, FrameCodec<PeerFrame>>;

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the peer closed the connection during the handshake")]
    Closed,
    #[error("unexpected frame during the handshake")]
    Unexpected,
    #[error("the peer refused the connection: {detail}")]
    Refused { detail: String },
    #[error("{0}")]
    Failed(String),
    /// Not a peer: the directory's reachability probe, answered.
    #[error("answered the directory's reachability probe")]
    Probed,
}

/// A refusal the listener sends back before closing.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) code: ErrorCode,
    pub(crate) detail: String,
}

pub(crate) fn frames(conn: Connection) -> (FrameReader, FrameWriter) {
    (
        FramedRead::new(conn.reader, FrameCodec::default()),
        FramedWrite::new(conn.writer, FrameCodec::default()),
    )
}

async fn next(reader: &mut FrameReader) -> Result<PeerFrame, HandshakeError> {
    match reader.next().await {
        None => Err(HandshakeError::Closed),
        Some(Err(e)) => Err(e.into()),
        Some(Ok(PeerFrame::Error { detail, .. })) => Err(HandshakeError::Refused { detail }),
        Some(Ok(frame)) => Ok(frame),
    }
}

fn hello(identity: &Identity, me: &str, peer: &str) -> Hello {
    Hello {
        username: me.to_owned(),
        peer: peer.to_owned(),
        public_key: identity.public_key(),
        nonce: rand::random(),
    }
}

/// Runs the dialer's side, accepting only `expected_key` as `peer`'s key.
pub(crate) async fn dial(
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
    identity: &Identity,
    me: &str,
    peer: &str,
    expected_key: &PublicKey,
) -> Result<(), HandshakeError> {
    let ours = hello(identity, me, peer);
    writer
        .send(&PeerFrame::Hello(Box::new(ours.clone())))
        .await?;
    let PeerFrame::Hello(theirs) = next(reader).await? else {
        return Err(HandshakeError::Unexpected);
    };
    if theirs.username != peer || theirs.peer != me || theirs.public_key != *expected_key {
        let _ = writer
            .send(&PeerFrame::Error {
                code: ErrorCode::AuthenticationFailed,
                detail: "you are not the user I dialed".into(),
            })
            .await;
        return Err(HandshakeError::Failed(format!(
            "the listener is not {peer} with the expected key"
        )));
    }
    let PeerFrame::Auth { signature } = next(reader).await? else {
        return Err(HandshakeError::Unexpected);
    };
    if !expected_key.verify(
        &handshake_transcript(Role::Listener, &ours, &theirs),
        &signature,
    ) {
        return Err(HandshakeError::Failed(format!(
            "{peer} did not prove its identity key"
        )));
    }
    let signature = identity.sign(&handshake_transcript(Role::Dialer, &ours, &theirs));
    writer.send(&PeerFrame::Auth { signature }).await?;
    Ok(())
}

/// Runs the listener's side. `admit` sees the dialer's claimed name and key before we reveal
/// anything and may refuse; what it says otherwise is handed back with the authenticated
/// peer's name and key, for the caller to act on only now that the peer proved its key.
pub(crate) async fn accept<F, Fut, A>(
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
    identity: &Identity,
    me: &str,
    admit: F,
) -> Result<(String, PublicKey, A), HandshakeError>
where
    F: FnOnce(String, PublicKey) -> Fut,
    Fut: std::future::Future<Output = Result<A, Refusal>>,
{
    let theirs = match next(reader).await? {
        PeerFrame::Hello(theirs) => *theirs,
        PeerFrame::Probe { nonce } => {
            // The directory checks that this address reaches us: prove it, and close.
            let signature = identity.sign(&probe_transcript(&nonce));
            writer.send(&PeerFrame::ProbeOk { signature }).await?;
            return Err(HandshakeError::Probed);
        }
        _ => return Err(HandshakeError::Unexpected),
    };
    let admitted = if validate_username(&theirs.username).is_err() {
        Err(Refusal {
            code: ErrorCode::AuthenticationFailed,
            detail: "invalid username".into(),
        })
    } else if theirs.peer != me {
        Err(Refusal {
            code: ErrorCode::WrongRecipient,
            detail: format!("this is {me}, not {}", theirs.peer),
        })
    } else {
        admit(theirs.username.clone(), theirs.public_key).await
    };
    let admitted = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => {
            let detail = refusal.detail.clone();
            let _ = writer
                .send(&PeerFrame::Error {
                    code: refusal.code,
                    detail: refusal.detail,
                })
                .await;
            return Err(HandshakeError::Failed(format!(
                "refused {}: {detail}",
                theirs.username
            )));
        }
    };
    let ours = hello(identity, me, &theirs.username);
    let signature = identity.sign(&handshake_transcript(Role::Listener, &theirs, &ours));
    writer
        .feed(&PeerFrame::Hello(Box::new(ours.clone())))
        .await?;
    writer.send(&PeerFrame::Auth { signature }).await?;
    let PeerFrame::Auth { signature } = next(reader).await? else {
        return Err(HandshakeError::Unexpected);
    };
    if !theirs.public_key.verify(
        &handshake_transcript(Role::Dialer, &theirs, &ours),
        &signature,
    ) {
        return Err(HandshakeError::Failed(format!(
            "{} did not prove its identity key",
            theirs.username
        )));
    }
    Ok((theirs.username, theirs.public_key, admitted))
}

/// While the node registers (before it accepts peers): answers the directory's
/// reachability probes on `listener`, and closes anything else (a peer that dials this early
/// retries, or its message waits in the mailbox). Returns only if the listener fails; drop
/// it to stop.
pub(crate) async fn answer_probes(
    listener: &mut dyn crate::transport::Listener,
    identity: &Identity,
) {
    let mut answering = tokio::task::JoinSet::new();
    loop {
        let conn = match listener.accept().await {
            Ok(conn) => conn,
            Err(_) => return,
        };
        let identity = identity.clone();
        answering.spawn(async move {
            let (mut reader, mut writer) = frames(conn);
            if let Ok(Some(Ok(PeerFrame::Probe { nonce }))) =
                tokio::time::timeout(PROBE_ANSWER_TIMEOUT, reader.next()).await
            {
                let signature = identity.sign(&probe_transcript(&nonce));
                let _ = writer.send(&PeerFrame::ProbeOk { signature }).await;
            }
        });
        // Finished ones are reaped as we go, so the set stays small.
        while answering.try_join_next().is_some() {}
    }
}

/// How long a connection accepted while registering may take to send its probe. Default:
/// 2 s.
const PROBE_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
