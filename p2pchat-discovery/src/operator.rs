//! The operator's side of announcements: [`relay_announcement`] hands a signed
//! [`Announcement`] to a running server, which relays it to every online node (and, through
//! shared storage, every instance beside it). The `p2pchat-discovery announce` command uses
//! it; so can any operator tool.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use p2pchat_core::Announcement;
use p2pchat_core::protocol::discovery::{ClientFrame, ServerFrame, WireError};
use p2pchat_core::protocol::{FrameCodec, ProtocolError};
use tokio::net::TcpStream;
use tokio_util::codec::{FramedRead, FramedWrite};

/// How long [`relay_announcement`] waits for the server, connecting included. Default: 5 s.
pub const RELAY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an announcement was not relayed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// No connection to the server.
    #[error("cannot reach the discovery server at {addr}")]
    Unreachable {
        /// The address tried.
        addr: String,
        /// The connection error.
        #[source]
        source: std::io::Error,
    },
    /// The server did not answer within [`RELAY_TIMEOUT`].
    #[error("the discovery server at {addr} did not answer within {} s", RELAY_TIMEOUT.as_secs())]
    Timeout {
        /// The address tried.
        addr: String,
    },
    /// The connection broke or carried something that is not a frame.
    #[error("the connection to the discovery server failed")]
    Connection(#[from] ProtocolError),
    /// The server closed the connection without answering.
    #[error("the discovery server closed the connection without answering")]
    Closed,
    /// The server refused the announcement (a key other than its operator's, a replay, a
    /// stale one, …).
    #[error("the server refused the announcement: {0}")]
    Refused(#[source] WireError),
    /// The server answered with a frame that does not belong here.
    #[error("unexpected answer from the discovery server: {0}")]
    Unexpected(String),
}

/// Sends `announcement` to the discovery server at `addr` and returns how many sessions that
/// server has online (instances sharing its storage relay it to theirs as well).
pub async fn relay_announcement(
    addr: &str,
    announcement: &Announcement,
) -> Result<u64, RelayError> {
    let attempt = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| RelayError::Unreachable {
                addr: addr.to_owned(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let mut reader = FramedRead::new(read, FrameCodec::<ServerFrame>::default());
        let mut writer = FramedWrite::new(write, FrameCodec::<ClientFrame>::default());
        match next(&mut reader).await? {
            ServerFrame::Challenge { .. } => {}
            other => return Err(answer(other)),
        }
        writer
            .send(ClientFrame::Announce(Box::new(announcement.clone())))
            .await?;
        match next(&mut reader).await? {
            ServerFrame::Announced { sessions } => Ok(sessions),
            other => Err(answer(other)),
        }
    };
    tokio::time::timeout(RELAY_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(RelayError::Timeout {
                addr: addr.to_owned(),
            })
        })
}

type Reader = FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec<ServerFrame>>;

async fn next(reader: &mut Reader) -> Result<ServerFrame, RelayError> {
    reader
        .next()
        .await
        .ok_or(RelayError::Closed)?
        .map_err(Into::into)
}

fn answer(frame: ServerFrame) -> RelayError {
    match frame {
        ServerFrame::Error(e) => RelayError::Refused(e),
        other => RelayError::Unexpected(format!("{other:?}")),
    }
}
