//! A session's connection: frames in and out, with a deadline on every write, and closing
//! so that the client reads the last frame.

use std::time::Duration;

use bytes::BytesMut;
use p2pchat_core::error::chain;
use p2pchat_core::protocol::discovery::{ClientFrame, ServerFrame, WireError};
use p2pchat_core::protocol::{FrameCodec, PROTOCOL_VERSION, ProtocolError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{Encoder, FramedRead};

/// Initial read buffer of a session; it grows for a larger frame. Small, because most
/// sessions are idle. Default: 256 bytes.
pub(super) const READ_BUFFER: usize = 256;

/// A write buffer grown past this (by a large listing page) is released after the write.
const KEEP_WRITE_BUFFER: usize = 4096;

/// How long one frame may take to write before the client is considered stuck. Default: 10 s.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads client frames.
pub(crate) type Reader<R> = FramedRead<R, FrameCodec<ClientFrame>>;

/// Writes whole frames, with a deadline, through a small reused buffer.
pub(crate) struct Writer<W> {
    half: W,
    codec: FrameCodec<ServerFrame>,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    /// A writer over `half`.
    pub(super) fn new(half: W) -> Self {
        Self {
            half,
            codec: FrameCodec::default(),
            buf: BytesMut::new(),
        }
    }

    /// The connection's writing half (a relay takes it over).
    pub(super) fn into_inner(self) -> W {
        self.half
    }

    /// Writes one frame, within [`WRITE_TIMEOUT`].
    pub(super) async fn send(&mut self, frame: &ServerFrame) -> Result<(), ProtocolError> {
        self.buf.clear();
        self.codec.encode(frame, &mut self.buf)?;
        match tokio::time::timeout(WRITE_TIMEOUT, self.half.write_all(&self.buf)).await {
            Ok(written) => written?,
            Err(_) => {
                return Err(ProtocolError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client does not read",
                )));
            }
        }
        if self.buf.capacity() > KEEP_WRITE_BUFFER {
            self.buf = BytesMut::new();
        }
        Ok(())
    }
}

/// How long a closing connection's incoming bytes are still read (and dropped) after the
/// server's last frame: closing with unread bytes would reset the connection, and the client
/// might never read why it was closed. Default: 1 s.
const LINGER: Duration = Duration::from_secs(1);

/// Closes the connection: our side first, then waits (bounded) for the client's end.
pub(super) async fn close<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut writer: Writer<W>,
    reader: Reader<R>,
) {
    let _ = writer.half.shutdown().await;
    let mut read = reader.into_inner();
    let mut sink = [0u8; 512];
    let drained = async { while matches!(read.read(&mut sink).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(LINGER, drained).await;
}

/// Sends a last error frame, best effort, and closes.
pub(super) async fn refuse<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut writer: Writer<W>,
    reader: Reader<R>,
    error: WireError,
) {
    tracing::debug!(%error, "closing the connection");
    let _ = writer.send(&ServerFrame::Error(error)).await;
    close(writer, reader).await;
}

/// The wire error a decoding failure earns, or `None` when the connection itself failed.
pub(super) fn decode_error(e: ProtocolError) -> Option<WireError> {
    match e {
        ProtocolError::UnsupportedVersion { got } => Some(WireError::UnsupportedVersion(format!(
            "this server speaks version {PROTOCOL_VERSION}, the frame has {got}"
        ))),
        e @ ProtocolError::FrameTooLarge { .. } => Some(WireError::LimitExceeded(e.to_string())),
        ProtocolError::Io(_) => None,
        e => Some(WireError::BadFrame(chain(&e))),
    }
}
