//! Wire types and the frame codec. No sockets here: everything is a pure function of bytes.
//!
//! # Framing
//! Every frame on a peer connection (and on a discovery session) is
//!
//! ```text
//! [ length: u32 big-endian ][ version: u8 ][ postcard-encoded body ]
//! ```
//!
//! where `length` counts the version byte and the body and is at most [`MAX_FRAME_LEN`]. A
//! frame with another version byte than [`PROTOCOL_VERSION`] is a protocol error, so a future
//! version is refused cleanly instead of being misread.
//!
//! # Peer connection
//! The dialer sends [`PeerFrame::Hello`]; the listener answers with its own `Hello` and an
//! [`PeerFrame::Auth`] signing the transcript; the dialer replies with its `Auth`. After that
//! both sides send [`PeerFrame::Message`] (a Fernet token), [`PeerFrame::Ack`] (batched, MACed
//! under the pair key), [`PeerFrame::Reject`] (MACed likewise), and `Ping`/`Pong`. A side that refuses anything sends
//! [`PeerFrame::Error`] and closes.
//!
//! # Discovery session
//! [`discovery`] holds the frames between a node and the `p2pchat-discovery` server; the
//! server and [`crate::discovery::DiscoveryClient`] share these definitions.

pub mod announcement;
pub mod discovery;

use std::fmt;
use std::marker::PhantomData;

use bytes::{Buf, BufMut, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder};

use crate::identity::PublicKey;

/// The wire protocol version carried in every frame.
pub const PROTOCOL_VERSION: u8 = 1;

/// Largest frame accepted or sent, in bytes (version byte and body, not the length prefix).
/// Default: 256 KiB, room for a maximal message token plus framing.
pub const MAX_FRAME_LEN: usize = 256 * 1024;

/// Largest message body, in bytes of UTF-8. Default: 64 KiB.
pub const MAX_BODY_LEN: usize = 64 * 1024;

/// Longest username, in bytes. Usernames are 1 to 32 characters of `a-z`, `0-9`, `_`, `-`
/// and `.`, starting with a letter or digit: no upper case, no look-alike Unicode.
pub const MAX_USERNAME_LEN: usize = 32;

/// Longest sealed token a store or the server accepts, in bytes: a Fernet token of a
/// [`MAX_BODY_LEN`] message (base64 of the ciphertext, IV, timestamp and MAC) with room to
/// spare. Default: 90 KiB.
pub const MAX_TOKEN_LEN: usize = 90 * 1024;

/// Most ids in one [`PeerFrame::Ack`], and most messages in one mailbox acknowledgement
/// (`discovery::Request::AckMailFrom`).
pub const MAX_ACK_BATCH: usize = 4096;

/// Length of the random nonces in the handshake.
pub const NONCE_LEN: usize = 32;

/// A message's unique id: 128 random bits chosen by the sender. Shown as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId([u8; 16]);

impl std::hash::Hash for MessageId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // One 128-bit word rather than a length and 16 bytes: the dedup windows hash one
        // per message received. Consistent with `Eq` (the same bytes, the same word).
        state.write_u128(u128::from_ne_bytes(self.0));
    }
}

impl MessageId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// Builds an id from its bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The 16 id bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

impl std::str::FromStr for MessageId {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; 16];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| ProtocolError::Malformed)?;
        Ok(Self(bytes))
    }
}

/// Why a username is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UsernameError {
    /// Empty name.
    #[error("a username cannot be empty")]
    Empty,
    /// Longer than [`MAX_USERNAME_LEN`].
    #[error("a username is at most {MAX_USERNAME_LEN} characters")]
    TooLong,
    /// A character outside the allowed alphabet.
    #[error(
        "a username may only contain lower-case letters a-z, digits, '_', '-' and '.', \
         and must start with a letter or digit (found {0:?})"
    )]
    BadCharacter(char),
}

/// Checks a username against the rules of [`MAX_USERNAME_LEN`].
pub fn validate_username(name: &str) -> Result<(), UsernameError> {
    let first = name.chars().next().ok_or(UsernameError::Empty)?;
    if name.len() > MAX_USERNAME_LEN {
        return Err(UsernameError::TooLong);
    }
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err(UsernameError::BadCharacter(first));
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.')))
    {
        Some(c) => Err(UsernameError::BadCharacter(c)),
        None => Ok(()),
    }
}

/// One side's opening of a peer connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Who is speaking.
    pub username: String,
    /// Who the speaker believes it is talking to.
    pub peer: String,
    /// The speaker's identity key.
    pub public_key: PublicKey,
    /// Fresh randomness the other side must sign over.
    #[serde(with = "serde_bytes")]
    pub nonce: [u8; NONCE_LEN],
}

/// Which end of a connection signs: part of the transcript so a signature cannot be replayed
/// in the other direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The side that opened the connection.
    Dialer,
    /// The side that accepted it.
    Listener,
}

/// The bytes each side signs in the handshake: both hellos, in dialer-then-listener order,
/// and the signer's role, under a domain-separation label.
pub fn handshake_transcript(role: Role, dialer: &Hello, listener: &Hello) -> Vec<u8> {
    let mut out = b"p2pchat/1 handshake\0".to_vec();
    out.push(match role {
        Role::Dialer => b'D',
        Role::Listener => b'L',
    });
    for hello in [dialer, listener] {
        let bytes = postcard::to_stdvec(hello).expect("serializing to a Vec cannot fail");
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    out
}

/// Frames exchanged between two peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum PeerFrame {
    /// Opens the handshake (both sides send one). Boxed: it is much larger than the
    /// frames that carry messages.
    Hello(Box<Hello>),
    /// Proves the sender holds its identity key: an Ed25519 signature over
    /// [`handshake_transcript`].
    Auth {
        /// The signature.
        #[serde(with = "serde_bytes")]
        signature: [u8; 64],
    },
    /// A sealed message: a Fernet token holding a [`crate::crypto::Payload`].
    Message {
        /// The message id, in the clear so the receiver can refuse a token it cannot open
        /// (it must equal the id inside the token).
        id: MessageId,
        /// The token.
        token: String,
    },
    /// The receiver could not accept a message (a token it cannot open, from the future,
    /// expired): the sender reports it failed instead of retrying it forever.
    Reject {
        /// The refused message.
        id: MessageId,
        /// Why, as a sentence.
        detail: String,
        /// [`crate::crypto::PairKey::reject_tag`] over the refuser's name, `id` and `detail`:
        /// nobody on the path can make a sender give up on a message.
        #[serde(with = "serde_bytes")]
        tag: [u8; 32],
    },
    /// Acknowledges messages processed by the sender of this frame.
    Ack {
        /// The acknowledged ids (at most [`MAX_ACK_BATCH`]).
        ids: Vec<MessageId>,
        /// [`crate::crypto::PairKey::ack_tag`] over the acker's name and `ids`.
        #[serde(with = "serde_bytes")]
        tag: [u8; 32],
    },
    /// Liveness probe.
    Ping(u64),
    /// Answer to a [`PeerFrame::Ping`] with the same value.
    Pong(u64),
    /// The sender refuses something and will close the connection.
    Error {
        /// What kind of refusal.
        code: ErrorCode,
        /// Human-readable detail.
        detail: String,
    },
    /// From the discovery server instead of a `Hello`: can this address be dialed? The
    /// listener answers [`PeerFrame::ProbeOk`] and closes.
    Probe {
        /// Fresh randomness from the server.
        #[serde(with = "serde_bytes")]
        nonce: [u8; NONCE_LEN],
    },
    /// The answer to [`PeerFrame::Probe`]: the listener's identity key signs
    /// [`discovery::probe_transcript`], so the server knows the address reaches the node
    /// that registered.
    ProbeOk {
        /// The signature.
        #[serde(with = "serde_bytes")]
        signature: [u8; 64],
    },
}

/// Machine-readable reason in an error frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// A frame could not be decoded, or came out of order.
    BadFrame,
    /// The peer's protocol version is not supported.
    UnsupportedVersion,
    /// The handshake's identity proof failed or did not match the directory.
    AuthenticationFailed,
    /// The connection was meant for another user.
    WrongRecipient,
    /// The receiver does not accept connections from this user.
    Refused,
    /// A limit was exceeded.
    LimitExceeded,
    /// Anything else.
    Other,
}

/// Errors decoding or encoding frames.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The length prefix announces more than [`MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A zero-length frame (no version byte).
    #[error("empty frame")]
    EmptyFrame,
    /// A frame from another protocol version.
    #[error("unsupported protocol version {got} (this build speaks version {PROTOCOL_VERSION})")]
    UnsupportedVersion {
        /// The version byte received.
        got: u8,
    },
    /// The body is not a valid frame.
    #[error("malformed frame")]
    Malformed,
    /// The underlying stream failed.
    #[error("i/o error")]
    Io(#[from] std::io::Error),
}

/// Length-delimited, versioned postcard frames of type `T`, bounded by a maximum length.
///
/// Decoding returns `Ok(None)` until a whole frame is buffered; it never allocates more
/// than the announced (and bounded) frame length.
pub struct FrameCodec<T> {
    max_len: usize,
    _frames: PhantomData<fn() -> T>,
}

impl<T> fmt::Debug for FrameCodec<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameCodec")
            .field("max_len", &self.max_len)
            .finish()
    }
}

impl<T> Default for FrameCodec<T> {
    fn default() -> Self {
        Self::new(MAX_FRAME_LEN)
    }
}

impl<T> Clone for FrameCodec<T> {
    fn clone(&self) -> Self {
        Self::new(self.max_len)
    }
}

impl<T> FrameCodec<T> {
    /// A codec refusing frames longer than `max_len` bytes.
    pub fn new(max_len: usize) -> Self {
        Self {
            max_len,
            _frames: PhantomData,
        }
    }
}

const HEADER_LEN: usize = 4;

impl<T: DeserializeOwned> Decoder for FrameCodec<T> {
    type Item = T;
    type Error = ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<T>, ProtocolError> {
        let Some(header) = src.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(header.try_into().expect("4 bytes")) as usize;
        if len > self.max_len {
            return Err(ProtocolError::FrameTooLarge {
                len,
                max: self.max_len,
            });
        }
        if len == 0 {
            return Err(ProtocolError::EmptyFrame);
        }
        if src.len() < HEADER_LEN + len {
            src.reserve(HEADER_LEN + len - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let frame = src.split_to(len);
        if frame[0] != PROTOCOL_VERSION {
            return Err(ProtocolError::UnsupportedVersion { got: frame[0] });
        }
        // The body must be exactly one value: trailing bytes are as malformed as missing ones.
        match postcard::take_from_bytes(&frame[1..]) {
            Ok((value, [])) => Ok(Some(value)),
            _ => Err(ProtocolError::Malformed),
        }
    }
}

/// [`PeerFrame::Message`] with a borrowed token: it serializes exactly as the owned frame
/// (the same variant index and fields), so that a token kept for resends is framed without
/// being copied first.
#[cfg(feature = "node")]
#[derive(Debug, Serialize)]
pub(crate) enum MessageFrame<'a> {
    /// Never built: holds [`PeerFrame::Hello`]'s variant index.
    #[allow(dead_code)]
    Hello(()),
    /// Never built: holds [`PeerFrame::Auth`]'s variant index.
    #[allow(dead_code)]
    Auth(()),
    /// [`PeerFrame::Message`].
    Message {
        /// The message id.
        id: MessageId,
        /// The token.
        token: &'a str,
    },
}

#[cfg(feature = "node")]
impl Encoder<&MessageFrame<'_>> for FrameCodec<PeerFrame> {
    type Error = ProtocolError;

    fn encode(
        &mut self,
        frame: &MessageFrame<'_>,
        dst: &mut BytesMut,
    ) -> Result<(), ProtocolError> {
        encode_frame(self.max_len, frame, dst)
    }
}

/// Appends one frame holding `value` to `dst`, or nothing and an error.
fn encode_frame<V: Serialize + ?Sized>(
    max_len: usize,
    value: &V,
    dst: &mut BytesMut,
) -> Result<(), ProtocolError> {
    let start = dst.len();
    dst.put_u32(0);
    dst.put_u8(PROTOCOL_VERSION);
    let written = postcard::to_io(value, (&mut *dst).writer()).map(|_| ());
    let len = dst.len() - start - HEADER_LEN;
    if written.is_err() || len > max_len {
        dst.truncate(start);
        return Err(match written {
            Err(_) => ProtocolError::Malformed,
            Ok(()) => ProtocolError::FrameTooLarge { len, max: max_len },
        });
    }
    dst[start..start + HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

impl<T: Serialize> Encoder<&T> for FrameCodec<T> {
    type Error = ProtocolError;

    fn encode(&mut self, frame: &T, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        encode_frame(self.max_len, frame, dst)
    }
}

impl<T: Serialize> Encoder<T> for FrameCodec<T> {
    type Error = ProtocolError;

    fn encode(&mut self, frame: T, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        Encoder::<&T>::encode(self, &frame, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn hello() -> Hello {
        Hello {
            username: "alice".into(),
            peer: "bob".into(),
            public_key: Identity::generate().public_key(),
            nonce: [7; NONCE_LEN],
        }
    }

    #[cfg(feature = "node")]
    #[test]
    fn a_borrowed_message_frame_encodes_as_the_owned_one() {
        let id = MessageId::random();
        let token = "gAAAAA-a-token".to_owned();
        let mut owned = BytesMut::new();
        FrameCodec::<PeerFrame>::default()
            .encode(
                &PeerFrame::Message {
                    id,
                    token: token.clone(),
                },
                &mut owned,
            )
            .unwrap();
        let mut borrowed = BytesMut::new();
        FrameCodec::<PeerFrame>::default()
            .encode(&MessageFrame::Message { id, token: &token }, &mut borrowed)
            .unwrap();
        assert_eq!(owned, borrowed);
    }

    fn sample_frames() -> Vec<PeerFrame> {
        vec![
            PeerFrame::Hello(Box::new(hello())),
            PeerFrame::Auth { signature: [9; 64] },
            PeerFrame::Message {
                id: MessageId::random(),
                token: "gAAAA-token".into(),
            },
            PeerFrame::Reject {
                id: MessageId::random(),
                detail: "clock".into(),
                tag: [2; 32],
            },
            PeerFrame::Ack {
                ids: vec![MessageId::random(), MessageId::random()],
                tag: [1; 32],
            },
            PeerFrame::Ping(42),
            PeerFrame::Pong(42),
            PeerFrame::Error {
                code: ErrorCode::Refused,
                detail: "no".into(),
            },
        ]
    }

    fn encode_all(frames: &[PeerFrame]) -> BytesMut {
        let mut codec = FrameCodec::<PeerFrame>::default();
        let mut buf = BytesMut::new();
        for f in frames {
            codec.encode(f, &mut buf).unwrap();
        }
        buf
    }

    #[test]
    fn frames_round_trip() {
        let frames = sample_frames();
        let mut buf = encode_all(&frames);
        let mut codec = FrameCodec::<PeerFrame>::default();
        for f in &frames {
            assert_eq!(codec.decode(&mut buf).unwrap().as_ref(), Some(f));
        }
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(buf.is_empty());
    }

    #[test]
    fn partial_input_needs_more_bytes_at_every_split() {
        let frames = sample_frames();
        let all = encode_all(&frames);
        for split in 0..all.len() {
            let mut codec = FrameCodec::<PeerFrame>::default();
            let mut buf = BytesMut::from(&all[..split]);
            let mut decoded = Vec::new();
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                decoded.push(f);
            }
            buf.extend_from_slice(&all[split..]);
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                decoded.push(f);
            }
            assert_eq!(decoded, frames, "split at {split}");
        }
    }

    #[test]
    fn oversized_length_prefix_is_refused_before_buffering() {
        let mut codec = FrameCodec::<PeerFrame>::default();
        let mut buf = BytesMut::new();
        buf.put_u32(u32::MAX);
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(matches!(err, ProtocolError::FrameTooLarge { .. }), "{err}");
    }

    #[test]
    fn encoding_an_oversized_frame_fails_and_leaves_the_buffer_clean() {
        let mut codec = FrameCodec::<PeerFrame>::new(64);
        let mut buf = BytesMut::from(&b"xy"[..]);
        let big = PeerFrame::Message {
            id: MessageId::random(),
            token: "a".repeat(100),
        };
        assert!(matches!(
            codec.encode(&big, &mut buf),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
        assert_eq!(&buf[..], b"xy");
    }

    #[test]
    fn wrong_version_empty_and_garbage_frames_are_errors() {
        let mut codec = FrameCodec::<PeerFrame>::default();
        let mut buf = encode_all(&[PeerFrame::Ping(1)]);
        buf[4] = 2;
        assert!(matches!(
            codec.decode(&mut buf),
            Err(ProtocolError::UnsupportedVersion { got: 2 })
        ));
        let mut empty = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert!(matches!(
            codec.decode(&mut empty),
            Err(ProtocolError::EmptyFrame)
        ));
        let mut garbage = BytesMut::from(&[0u8, 0, 0, 3, PROTOCOL_VERSION, 0xff, 0xff][..]);
        assert!(matches!(
            codec.decode(&mut garbage),
            Err(ProtocolError::Malformed)
        ));
        // A whole frame with bytes left over inside its length is malformed too.
        let mut trailing = encode_all(&[PeerFrame::Ping(1)]);
        trailing.extend_from_slice(&[7, 7]);
        let len = u32::try_from(trailing.len() - HEADER_LEN).unwrap();
        trailing[..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(
            codec.decode(&mut trailing),
            Err(ProtocolError::Malformed)
        ));
    }

    #[test]
    fn usernames_follow_the_rules() {
        for ok in ["alice", "bob_2", "a", "x.y-z", "9lives"] {
            assert_eq!(validate_username(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_username(""), Err(UsernameError::Empty));
        assert_eq!(
            validate_username(&"a".repeat(MAX_USERNAME_LEN + 1)),
            Err(UsernameError::TooLong)
        );
        assert_eq!(
            validate_username("Alice"),
            Err(UsernameError::BadCharacter('A'))
        );
        assert_eq!(
            validate_username("_x"),
            Err(UsernameError::BadCharacter('_'))
        );
        assert_eq!(
            validate_username("al ice"),
            Err(UsernameError::BadCharacter(' '))
        );
        assert_eq!(
            validate_username("a\u{7}"),
            Err(UsernameError::BadCharacter('\u{7}'))
        );
        // Cyrillic 'а' looks like Latin 'a'.
        assert_eq!(
            validate_username("\u{430}lice"),
            Err(UsernameError::BadCharacter('\u{430}'))
        );
    }

    #[test]
    fn transcripts_differ_by_role() {
        let (d, l) = (hello(), hello());
        assert_ne!(
            handshake_transcript(Role::Dialer, &d, &l),
            handshake_transcript(Role::Listener, &d, &l)
        );
    }

    proptest::proptest! {
        #[test]
        fn decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut codec = FrameCodec::<PeerFrame>::default();
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }

        #[test]
        fn message_frames_round_trip(token in ".{0,300}", ids in proptest::collection::vec(proptest::prelude::any::<[u8; 16]>(), 0..20)) {
            let frames = vec![
                PeerFrame::Message { id: MessageId::random(), token },
                PeerFrame::Ack { ids: ids.into_iter().map(MessageId::from_bytes).collect(), tag: [3; 32] },
            ];
            let mut buf = encode_all(&frames);
            let mut codec = FrameCodec::<PeerFrame>::default();
            for f in &frames {
                let decoded = codec.decode(&mut buf).unwrap();
                proptest::prop_assert_eq!(decoded.as_ref(), Some(f));
            }
        }
    }
}
