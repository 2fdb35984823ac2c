//! Property tests of every type that crosses a wire, through the encoding the wire really
//! uses:
//!
//! - peer connections and discovery sessions: [`FrameCodec`] (length prefix, version byte,
//!   postcard) over [`PeerFrame`], [`ClientFrame`] and [`ServerFrame`], which carry every
//!   other frame part ([`Hello`], [`ErrorCode`], [`Claim`], [`RegisterRequest`], [`Request`],
//!   [`Reply`], [`Push`], [`WireError`], [`Registered`], [`PeerRecord`], [`Page`],
//!   [`StoredMessage`], [`ExpiredMessage`], [`Announcement`], [`MessageId`], [`PublicKey`]);
//! - the sealed [`Payload`] inside a Fernet token (postcard, sealed under a [`PairKey`]);
//! - an [`Announcement`] as JSON (the Redis channel);
//! - a [`MessageId`] as hex (Redis mailbox entries).
//!
//! For the framed types each case checks that:
//! 1. a run of frames encodes and decodes back to equal values, consuming every byte;
//! 2. the same bytes fed in two chunks, split anywhere, decode to the same values, and the
//!    first chunk yields exactly the frames wholly inside it;
//! 3. a strict prefix of a frame is "need more bytes" (`Ok(None)`, nothing consumed) and an
//!    error at end of stream, never a panic or a value;
//! 4. a frame whose body is cut short under a consistent length prefix is refused as
//!    [`ProtocolError::Malformed`], never decoded to some other value.

use std::fmt::Debug;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use p2pchat_core::announce::MAX_ANNOUNCEMENT_LEN;
use p2pchat_core::crypto::{PairKey, Payload};
use p2pchat_core::protocol::discovery::{
    Claim, ClientFrame, DepositOutcome, MAX_ANNOUNCED_ADDRS, Push, RegisterRequest, Registered,
    Reply, Request, ServerFrame, WireError, WireExpired, WireMailKey, WireMessage, WirePage,
    WirePeer, WireQuota,
};
use p2pchat_core::protocol::{
    ErrorCode, FrameCodec, Hello, MessageId, NONCE_LEN, PROTOCOL_VERSION, PeerFrame, ProtocolError,
};
use p2pchat_core::{Announcement, Identity, PublicKey};
use proptest::prelude::*;
use proptest::sample::Index;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::codec::{Decoder, Encoder};

/// Length of the frame header: the big-endian `u32` length prefix.
const HEADER_LEN: usize = 4;

// ---------------------------------------------------------------------------------------
// Strategies

/// Any text, newlines and every Unicode scalar value included (the wire carries arbitrary
/// strings; validation happens above it).
fn text(max: usize) -> BoxedStrategy<String> {
    proptest::string::string_regex(&format!("(?s).{{0,{max}}}"))
        .expect("a valid regex")
        .boxed()
}

fn message_id() -> impl Strategy<Value = MessageId> {
    any::<[u8; 16]>().prop_map(MessageId::from_bytes)
}

/// A valid public key (the decoder refuses bytes that are no key, so only keys round-trip).
fn public_key() -> impl Strategy<Value = PublicKey> {
    any::<[u8; 32]>().prop_map(|secret| Identity::from_secret_bytes(&secret).public_key())
}

fn bytes64() -> impl Strategy<Value = [u8; 64]> {
    (any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(a, b)| {
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(&a);
        out[32..].copy_from_slice(&b);
        out
    })
}

fn nonce() -> impl Strategy<Value = [u8; NONCE_LEN]> {
    any::<[u8; NONCE_LEN]>()
}

/// IPv4 and IPv6 socket addresses (without flow info or scope id, which the wire does not
/// carry).
fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)),
    ]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::BadFrame),
        Just(ErrorCode::UnsupportedVersion),
        Just(ErrorCode::AuthenticationFailed),
        Just(ErrorCode::WrongRecipient),
        Just(ErrorCode::Refused),
        Just(ErrorCode::LimitExceeded),
        Just(ErrorCode::Other),
    ]
}

fn hello() -> impl Strategy<Value = Hello> {
    (text(40), text(40), public_key(), nonce()).prop_map(|(username, peer, public_key, nonce)| {
        Hello {
            username,
            peer,
            public_key,
            nonce,
        }
    })
}

fn peer_frame() -> impl Strategy<Value = PeerFrame> {
    prop_oneof![
        hello().prop_map(|h| PeerFrame::Hello(Box::new(h))),
        bytes64().prop_map(|signature| PeerFrame::Auth { signature }),
        (message_id(), text(400)).prop_map(|(id, token)| PeerFrame::Message { id, token }),
        (message_id(), text(60), any::<[u8; 32]>())
            .prop_map(|(id, detail, tag)| PeerFrame::Reject { id, detail, tag }),
        (
            proptest::collection::vec(message_id(), 0..64),
            any::<[u8; 32]>()
        )
            .prop_map(|(ids, tag)| PeerFrame::Ack { ids, tag }),
        any::<u64>().prop_map(PeerFrame::Ping),
        any::<u64>().prop_map(PeerFrame::Pong),
        (error_code(), text(60)).prop_map(|(code, detail)| PeerFrame::Error { code, detail }),
    ]
}

/// Announcements with arbitrary fields: the wire carries whatever a sender puts there.
fn announcement() -> impl Strategy<Value = Announcement> {
    (text(40), any::<u64>(), text(200), text(140)).prop_map(
        |(id, issued_at_ms, text, signature)| Announcement {
            id,
            issued_at_ms,
            text,
            signature,
        },
    )
}

fn stored_message() -> impl Strategy<Value = WireMessage> {
    (message_id(), text(40), text(40), text(300), any::<u64>()).prop_map(
        |(id, from, to, token, expires_at_ns)| WireMessage {
            id,
            from,
            to,
            token,
            expires_at_ns,
        },
    )
}

fn expired_message() -> impl Strategy<Value = WireExpired> {
    (message_id(), text(40)).prop_map(|(id, to)| WireExpired { id, to })
}

fn peer_record() -> impl Strategy<Value = WirePeer> {
    (
        text(40),
        public_key(),
        proptest::collection::vec(socket_addr(), 0..4),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(username, public_key, addrs, online, last_seen_ms)| WirePeer {
                username,
                public_key,
                addrs,
                online,
                last_seen_ms,
            },
        )
}

fn page() -> impl Strategy<Value = WirePage> {
    (
        proptest::collection::vec(peer_record(), 0..4),
        proptest::option::of(text(40)),
    )
        .prop_map(|(users, next)| WirePage { users, next })
}

fn claim() -> impl Strategy<Value = Claim> {
    (
        text(40),
        public_key(),
        any::<u16>(),
        proptest::collection::vec(socket_addr(), 0..=MAX_ANNOUNCED_ADDRS + 1),
    )
        .prop_map(|(username, public_key, listen_port, announce)| Claim {
            username,
            public_key,
            listen_port,
            announce,
        })
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::KeepAlive),
        text(40).prop_map(|username| Request::Lookup { username }),
        (proptest::option::of(text(40)), any::<u32>())
            .prop_map(|(after, limit)| Request::ListOnline { after, limit }),
        text(40).prop_map(|username| Request::Watch { username }),
        text(40).prop_map(|username| Request::Unwatch { username }),
        Just(Request::Deregister),
        stored_message().prop_map(|m| Request::Deposit(Box::new(m))),
        any::<u32>().prop_map(|limit| Request::FetchMail { limit }),
        proptest::collection::vec(message_id(), 0..64).prop_map(|ids| Request::AckMail { ids }),
        Just(Request::TakeExpired),
        proptest::collection::vec(stored_message(), 0..4).prop_map(Request::DepositBatch),
        proptest::collection::vec((text(40), message_id()), 0..64).prop_map(|acked| {
            Request::AckMailFrom {
                acked: acked
                    .into_iter()
                    .map(|(from, id)| WireMailKey { from, id })
                    .collect(),
            }
        }),
    ]
}

fn wire_quota() -> impl Strategy<Value = WireQuota> {
    prop_oneof![
        Just(WireQuota::MailboxMessages),
        Just(WireQuota::MailboxBytes),
        Just(WireQuota::SenderMessages),
        Just(WireQuota::SenderBytes),
        Just(WireQuota::PairMessages),
        Just(WireQuota::PairBytes),
        Just(WireQuota::TotalBytes),
    ]
}

fn wire_error() -> impl Strategy<Value = WireError> {
    prop_oneof![
        text(40).prop_map(|username| WireError::NameTaken { username }),
        text(40).prop_map(WireError::InvalidUsername),
        Just(WireError::BadSignature),
        Just(WireError::RateLimited),
        text(60).prop_map(WireError::LimitExceeded),
        text(60).prop_map(WireError::BadFrame),
        text(60).prop_map(WireError::UnsupportedVersion),
        text(60).prop_map(WireError::Backend),
        Just(WireError::ShuttingDown),
        (text(40), any::<u64>())
            .prop_map(|(recipient, quota)| WireError::QuotaExceeded { recipient, quota }),
        (text(40), wire_quota(), any::<u64>()).prop_map(|(recipient, limit, quota)| {
            WireError::MailQuota {
                recipient,
                limit,
                quota,
            }
        }),
        text(60).prop_map(WireError::Forbidden),
    ]
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        Just(Reply::Done),
        proptest::option::of(peer_record()).prop_map(|r| Reply::Record(r.map(Box::new))),
        page().prop_map(Reply::Page),
        proptest::collection::vec(stored_message(), 0..4).prop_map(Reply::Mail),
        proptest::collection::vec(expired_message(), 0..8).prop_map(Reply::Expired),
        proptest::collection::vec(deposit_outcome(), 0..8).prop_map(Reply::Deposited),
    ]
}

fn deposit_outcome() -> impl Strategy<Value = DepositOutcome> {
    prop_oneof![
        Just(DepositOutcome::Stored),
        Just(DepositOutcome::Duplicate),
        wire_error().prop_map(DepositOutcome::Refused),
    ]
}

fn push() -> impl Strategy<Value = Push> {
    prop_oneof![
        text(40).prop_map(|username| Push::PeerOnline { username }),
        text(40).prop_map(|username| Push::PeerOffline { username }),
        Just(Push::Replaced),
        Just(Push::NewMail),
        announcement().prop_map(|a| Push::Announcement(Box::new(a))),
    ]
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    prop_oneof![
        (claim(), bytes64()).prop_map(|(claim, signature)| ClientFrame::Register(Box::new(
            RegisterRequest { claim, signature }
        ))),
        (any::<u64>(), request()).prop_map(|(id, request)| ClientFrame::Request { id, request }),
        announcement().prop_map(|a| ClientFrame::Announce(Box::new(a))),
    ]
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    prop_oneof![
        nonce().prop_map(|nonce| ServerFrame::Challenge { nonce }),
        (
            socket_addr(),
            proptest::collection::vec(socket_addr(), 0..4),
            any::<u64>(),
            proptest::option::of(public_key()),
        )
            .prop_map(|(observed, addrs, presence_ttl_ms, operator_key)| {
                ServerFrame::Registered(Box::new(Registered {
                    observed,
                    addrs,
                    presence_ttl_ms,
                    operator_key,
                }))
            }),
        (
            any::<u64>(),
            prop_oneof![reply().prop_map(Ok), wire_error().prop_map(Err)]
        )
            .prop_map(|(id, result)| ServerFrame::Response { id, result }),
        push().prop_map(ServerFrame::Push),
        wire_error().prop_map(ServerFrame::Error),
        any::<u64>().prop_map(|sessions| ServerFrame::Announced { sessions }),
    ]
}

fn payload() -> impl Strategy<Value = Payload> {
    (
        message_id(),
        text(40),
        text(40),
        any::<u64>(),
        any::<u64>(),
        text(500),
    )
        .prop_map(|(id, from, to, sent_at_ms, seq, body)| Payload {
            id,
            from,
            to,
            sent_at_ms,
            seq,
            body,
        })
}

// ---------------------------------------------------------------------------------------
// Checks

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// Runs the four framing checks of the module docs on `frames`, splitting at `split` and
/// cutting the first frame at `cut`.
fn check_framing<T>(frames: &[T], split: Index, cut: Index) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let mut codec = FrameCodec::<T>::default();
    let mut wire = BytesMut::new();
    let mut ends = Vec::with_capacity(frames.len());
    for frame in frames {
        codec.encode(frame, &mut wire).map_err(fail)?;
        ends.push(wire.len());
    }

    // 1. Whole: every frame back, every byte consumed.
    let mut buf = wire.clone();
    for frame in frames {
        let decoded = codec.decode(&mut buf).map_err(fail)?;
        prop_assert_eq!(decoded.as_ref(), Some(frame));
    }
    prop_assert!(buf.is_empty(), "{} bytes left over", buf.len());
    prop_assert!(codec.decode(&mut buf).map_err(fail)?.is_none());

    // 2. Two chunks, split anywhere (both ends included).
    let at = split.index(wire.len() + 1);
    let mut buf = BytesMut::from(&wire[..at]);
    let mut got = Vec::new();
    while let Some(frame) = codec.decode(&mut buf).map_err(fail)? {
        got.push(frame);
    }
    prop_assert_eq!(
        got.len(),
        ends.iter().filter(|&&end| end <= at).count(),
        "the first chunk yields exactly the frames wholly inside it"
    );
    buf.extend_from_slice(&wire[at..]);
    while let Some(frame) = codec.decode(&mut buf).map_err(fail)? {
        got.push(frame);
    }
    prop_assert_eq!(&got[..], frames);
    prop_assert!(buf.is_empty());

    // 3. A strict prefix of the first frame: need more bytes, nothing consumed; at end of
    //    stream an error, not a value.
    let first = &wire[..ends[0]];
    let k = cut.index(first.len());
    let mut buf = BytesMut::from(&first[..k]);
    prop_assert!(
        codec.decode(&mut buf).map_err(fail)?.is_none(),
        "a {k}-byte prefix of a {}-byte frame is not a frame",
        first.len()
    );
    prop_assert_eq!(&buf[..], &first[..k], "nothing consumed");
    match codec.decode_eof(&mut buf) {
        Ok(None) => prop_assert_eq!(k, 0, "only an empty buffer is a clean end of stream"),
        Ok(Some(value)) => return Err(fail(format!("a truncated frame gave {value:?}"))),
        Err(_) => prop_assert!(k > 0),
    }

    // 4. The first frame's body cut short, under a length prefix that matches the cut.
    let body = &first[HEADER_LEN + 1..];
    let keep = cut.index(body.len());
    let mut cut_frame = BytesMut::new();
    cut_frame.put_u32(u32::try_from(1 + keep).map_err(fail)?);
    cut_frame.put_u8(PROTOCOL_VERSION);
    cut_frame.extend_from_slice(&body[..keep]);
    match codec.decode(&mut cut_frame) {
        Err(ProtocolError::Malformed) => {}
        other => {
            return Err(fail(format!(
                "a body cut to {keep} of {} bytes must be malformed, got {other:?}",
                body.len()
            )));
        }
    }
    Ok(())
}

/// The pair key the payload checks seal under (deriving one costs two scalar
/// multiplications, so once per run).
fn pair_key() -> &'static PairKey {
    static KEY: OnceLock<PairKey> = OnceLock::new();
    KEY.get_or_init(|| {
        PairKey::derive(&Identity::generate(), &Identity::generate().public_key())
            .expect("two fresh keys agree")
    })
}

/// Token age accepted when opening the payload checks' tokens.
const TTL: Duration = Duration::from_secs(3600);

/// The largest index `<= at` that is a character boundary of `s`.
fn floor_char_boundary(s: &str, at: usize) -> usize {
    (0..=at.min(s.len()))
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0)
}

proptest! {
    #[test]
    fn peer_frames_round_trip_split_and_truncated(
        frames in proptest::collection::vec(peer_frame(), 1..5),
        split in any::<Index>(),
        cut in any::<Index>(),
    ) {
        check_framing(&frames, split, cut)?;
    }

    #[test]
    fn client_frames_round_trip_split_and_truncated(
        frames in proptest::collection::vec(client_frame(), 1..5),
        split in any::<Index>(),
        cut in any::<Index>(),
    ) {
        check_framing(&frames, split, cut)?;
    }

    #[test]
    fn server_frames_round_trip_split_and_truncated(
        frames in proptest::collection::vec(server_frame(), 1..5),
        split in any::<Index>(),
        cut in any::<Index>(),
    ) {
        check_framing(&frames, split, cut)?;
    }

    /// The payload's plaintext encoding, and the payload sealed as the Fernet token that
    /// crosses the wire: opened by the pair, it is the same payload; any truncated token is
    /// refused.
    #[test]
    fn payloads_round_trip_sealed_and_truncated_tokens_are_refused(
        payload in payload(),
        cut in any::<Index>(),
    ) {
        let plain = postcard::to_stdvec(&payload).map_err(fail)?;
        prop_assert_eq!(&postcard::from_bytes::<Payload>(&plain).map_err(fail)?, &payload);
        let cut_plain = cut.index(plain.len());
        prop_assert!(
            postcard::from_bytes::<Payload>(&plain[..cut_plain]).is_err(),
            "a payload cut to {} of {} bytes decoded", cut_plain, plain.len()
        );

        let key = pair_key();
        let token = key.seal(&payload);
        prop_assert_eq!(&key.open(&token, &payload.from, &payload.to, TTL).map_err(fail)?, &payload);
        let k = cut.index(token.len());
        match key.open(&token[..k], &payload.from, &payload.to, TTL) {
            Err(_) => {}
            // The fernet crate accepts a token without its base64 padding: the same bytes,
            // so the same payload. Cutting anything more must be refused.
            Ok(opened) if token[k..].bytes().all(|b| b == b'=') => {
                prop_assert_eq!(&opened, &payload);
            }
            Ok(opened) => {
                return Err(fail(format!(
                    "a token cut to {k} of {} characters opened as {opened:?}",
                    token.len()
                )));
            }
        }
    }

    /// An announcement as JSON (the Redis channel) parses back to an equal value; any
    /// prefix of the JSON is refused.
    #[test]
    fn announcements_round_trip_through_json_and_truncated_json_is_refused(
        announcement in announcement(),
        cut in any::<Index>(),
    ) {
        let json = announcement.to_json();
        prop_assert_eq!(&Announcement::from_json(&json).map_err(fail)?, &announcement);
        let k = floor_char_boundary(&json, cut.index(json.len()));
        prop_assert!(
            Announcement::from_json(&json[..k]).is_err(),
            "JSON cut to {} of {} bytes parsed", k, json.len()
        );
    }

    /// A signed announcement still verifies under the operator key after the JSON and the
    /// frame round trips (the signature covers exactly what travels).
    #[test]
    fn signed_announcements_verify_after_json_and_frames(
        secret in any::<[u8; 32]>(),
        text in text(300),
    ) {
        prop_assume!(text.len() <= MAX_ANNOUNCEMENT_LEN && !text.trim().is_empty());
        let operator = Identity::from_secret_bytes(&secret);
        let signed = Announcement::sign(&operator, &text).map_err(fail)?;
        let parsed = Announcement::from_json(&signed.to_json()).map_err(fail)?;
        prop_assert_eq!(parsed.verify(&operator.public_key()), Ok(()));

        let mut codec = FrameCodec::<ClientFrame>::default();
        let mut buf = BytesMut::new();
        codec.encode(ClientFrame::Announce(Box::new(signed)), &mut buf).map_err(fail)?;
        match codec.decode(&mut buf).map_err(fail)? {
            Some(ClientFrame::Announce(a)) => {
                prop_assert_eq!(a.verify(&operator.public_key()), Ok(()));
            }
            other => return Err(fail(format!("expected an announcement, got {other:?}"))),
        }
    }

    /// A message id as hex (how Redis mailboxes and logs carry it).
    #[test]
    fn message_ids_round_trip_through_hex(id in message_id()) {
        let hex = id.to_string();
        prop_assert_eq!(hex.len(), 32);
        prop_assert_eq!(hex.parse::<MessageId>().map_err(fail)?, id);
        prop_assert!(hex[..31].parse::<MessageId>().is_err());
    }
}
