//! A connection that joins a relay instead of registering: pairs with the relay's other
//! side, then carries bytes between them (`crate::relay`).

use std::sync::Arc;

use p2pchat_core::protocol::FrameCodec;
use p2pchat_core::protocol::discovery::{RELAY_JOIN_TIMEOUT, ServerFrame, WireError};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_util::codec::Encoder;
use tokio_util::sync::CancellationToken;

use super::WRITE_TIMEOUT;
use super::connection::{Reader, Writer, refuse};
use crate::directory::Directory;
use crate::relay::{Handoff, Joined, Leg, Token, splice};

/// Serves one side of the relay `token` names until the relay ends.
pub(super) async fn serve<R, W>(
    directory: Arc<Directory>,
    token: Token,
    reader: Reader<R>,
    mut writer: Writer<W>,
    stop: CancellationToken,
) where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    match directory.relays.join(&token) {
        Joined::Unknown => {
            let error = WireError::Forbidden("no such relay (expired, or joined already)".into());
            refuse(writer, reader, error).await;
        }
        Joined::Second(first, slot) => {
            // `Relayed` is written by the first side once it has this leg, to both: nobody
            // is told "relayed" unless the other side is there.
            let (done, ended) = oneshot::channel();
            let handoff = Handoff {
                leg: leg(reader, writer),
                slot,
                done,
            };
            if first.send(handoff).is_err() {
                // The first side left: this connection closes with the handoff.
                return;
            }
            // Held until the first side's splice ends (it drops `done`): this task keeps the
            // connection's permit meanwhile.
            let _ = ended.await;
        }
        Joined::First(handoff) => {
            let waited = tokio::select! {
                _ = stop.cancelled() => Err(WireError::ShuttingDown),
                got = tokio::time::timeout(RELAY_JOIN_TIMEOUT, handoff) => match got {
                    Ok(Ok(handoff)) => Ok(handoff),
                    _ => Err(WireError::Forbidden(
                        "the other side did not join the relay in time".into(),
                    )),
                },
            };
            let handoff = match waited {
                Ok(handoff) => handoff,
                Err(error) => {
                    directory.relays.cancel(&token);
                    refuse(writer, reader, error).await;
                    return;
                }
            };
            let Handoff {
                leg: mut other,
                slot,
                done,
            } = handoff;
            if writer.send(&ServerFrame::Relayed).await.is_err()
                || relayed_frame(&mut other).await.is_err()
            {
                return;
            }
            let config = &directory.config;
            // Ends when a side closes, the relay idles, a newer relay of the pair replaces
            // it (`slot.stop`), or the server stops (the legs are dropped: closed).
            let relayed = splice(
                leg(reader, writer),
                other,
                config.relay_bytes_per_second,
                config.relay_idle_timeout,
                slot.stop.clone(),
            );
            tokio::select! {
                carried = relayed => tracing::debug!(bytes = carried, "relay ended"),
                () = stop.cancelled() => {}
            }
            drop(slot);
            drop(done);
        }
    }
}

/// Writes `Relayed` on a leg that is raw bytes already, within [`WRITE_TIMEOUT`].
async fn relayed_frame(leg: &mut Leg) -> std::io::Result<()> {
    let mut buf = bytes::BytesMut::new();
    FrameCodec::<ServerFrame>::default()
        .encode(&ServerFrame::Relayed, &mut buf)
        .map_err(std::io::Error::other)?;
    let write = async {
        leg.writer.write_all(&buf).await?;
        leg.writer.flush().await
    };
    tokio::time::timeout(WRITE_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// The raw halves of a connection, the bytes read ahead of the frames first.
fn leg<R, W>(reader: Reader<R>, writer: Writer<W>) -> Leg
where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let parts = reader.into_parts();
    let early = std::io::Cursor::new(parts.read_buf.freeze());
    Leg {
        reader: Box::new(tokio::io::AsyncReadExt::chain(early, parts.io)),
        writer: Box::new(writer.into_inner()),
    }
}
