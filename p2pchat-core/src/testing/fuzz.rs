//! The checks behind the `cargo fuzz` targets in `fuzz/`, in one place: the targets call
//! them with the fuzzer's bytes, and the regression tests replay every input kept under
//! `fuzz/regressions/<target>/` (in the repository, not in the published crate) through them
//! ([`replay_regressions`]) in the normal suite.
//!
//! Each check takes arbitrary bytes and returns when the code under test handled them; it
//! panics, naming the broken property, when that code panicked or misbehaved. The async
//! checks run on one current-thread runtime per process.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use bytes::BytesMut;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::{Decoder, Encoder};

use crate::crypto::{PairKey, Payload};
use crate::identity::Identity;
use crate::node::handshake::{self, HandshakeError, Refusal};
use crate::protocol::discovery::{ClientFrame, ServerFrame};
use crate::protocol::{ErrorCode, FrameCodec, MessageId, PeerFrame};
use crate::store::DEFAULT_MESSAGE_TTL;
use crate::transport::Connection;

/// Secret key of `alice`, the dialer in [`handshake`] and the sender in [`token_open`].
pub const ALICE_SECRET: [u8; 32] = [0xa1; 32];

/// Secret key of `bob`, the listener in [`handshake`] and the recipient in [`token_open`].
pub const BOB_SECRET: [u8; 32] = [0xb0; 32];

/// Secret key of `carol`, whose pair key with `alice` must open none of `alice` and `bob`'s
/// tokens.
pub const CAROL_SECRET: [u8; 32] = [0xca; 32];

/// The clock (Unix seconds) [`token_open`] opens tokens at, so that a token kept as a seed
/// stays fresh.
pub const TOKEN_NOW: u64 = 1_750_000_000;

/// How long a handshake check may take before it counts as hung: all the hostile bytes are
/// written and the stream closed before it starts, so it never has to wait for the network.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(5);

/// The runtime the async checks run on: built once per process.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds")
    })
}

/// Runs `check` on every file in `dir`, in name order: the inputs kept for one fuzz target.
///
/// The caller names the directory, since the kept inputs are not part of this crate: in the
/// p2pchat repository they are `fuzz/regressions/<target>/` at the root of the workspace,
/// which a test of a workspace crate reaches as
/// `Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/<target>")`; a backend
/// or a fork keeps its own. Panics if the directory is missing or empty, or on the first
/// input `check` rejects.
pub fn replay_regressions(dir: impl AsRef<Path>, check: fn(&[u8])) {
    let dir = dir.as_ref();
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    inputs.sort();
    assert!(
        !inputs.is_empty(),
        "{} holds no inputs: keep at least the seeds there",
        dir.display()
    );
    for path in inputs {
        let data =
            std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        // Shown with the failure, naming the input that broke.
        eprintln!("replaying {}", path.display());
        check(&data);
    }
}

// ---------------------------------------------------------------------------------------
// frame_decoder

/// Decodes arbitrary bytes as a stream of [`PeerFrame`]s, [`ClientFrame`]s and
/// [`ServerFrame`]s with [`FrameCodec`], fed in chunks.
///
/// Input: a byte `k`, then `k % 8` chunk sizes (one byte each, 0 read as 1, used in turn),
/// then the stream. With no chunk sizes the stream is fed one byte at a time.
///
/// Checks, for each frame type: no panic; feeding the stream in chunks decodes the same
/// frames and ends the same way (an error, or the same bytes left waiting) as feeding it at
/// once; every decoded frame encodes, and decodes back to itself from exactly its encoding.
pub fn frame_decoder(data: &[u8]) {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(k % 8).min(rest.len());
    let (sizes, stream) = rest.split_at(n);
    let sizes: Vec<usize> = if sizes.is_empty() {
        vec![1]
    } else {
        sizes.iter().map(|&s| usize::from(s).max(1)).collect()
    };
    decodes_consistently::<PeerFrame>(stream, &sizes);
    decodes_consistently::<ClientFrame>(stream, &sizes);
    decodes_consistently::<ServerFrame>(stream, &sizes);
}

/// How feeding a stream to a decoder ended.
#[derive(Debug, PartialEq)]
enum Ending {
    /// Waiting for more: this many bytes buffered.
    NeedMore(usize),
    /// The decoder refused the stream.
    Error(String),
}

/// Feeds `stream` to a fresh decoder in chunks of `sizes` (in turn), decoding all it can
/// after each chunk, as `FramedRead` does.
fn feed<T: DeserializeOwned>(stream: &[u8], sizes: &[usize]) -> (Vec<T>, Ending) {
    let mut codec = FrameCodec::<T>::default();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut rest = stream;
    let mut sizes = sizes.iter().cycle();
    loop {
        let size = (*sizes.next().expect("at least one chunk size")).min(rest.len());
        let (chunk, after) = rest.split_at(size);
        buf.extend_from_slice(chunk);
        rest = after;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => return (frames, Ending::Error(e.to_string())),
            }
        }
        if rest.is_empty() {
            return (frames, Ending::NeedMore(buf.len()));
        }
    }
}

fn decodes_consistently<T>(stream: &[u8], sizes: &[usize])
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let (at_once, ending) = feed::<T>(stream, &[stream.len().max(1)]);
    let (chunked, chunked_ending) = feed::<T>(stream, sizes);
    assert_eq!(at_once, chunked, "chunking changed the decoded frames");
    assert_eq!(
        ending, chunked_ending,
        "chunking changed how decoding ended"
    );
    for frame in &at_once {
        let mut codec = FrameCodec::<T>::default();
        let mut encoded = BytesMut::new();
        codec
            .encode(frame, &mut encoded)
            .unwrap_or_else(|e| panic!("a decoded frame does not encode ({e}): {frame:?}"));
        let again = codec
            .decode(&mut encoded)
            .unwrap_or_else(|e| panic!("a re-encoded frame does not decode ({e}): {frame:?}"));
        assert_eq!(
            again.as_ref(),
            Some(frame),
            "the frame changed on re-encoding"
        );
        assert!(
            encoded.is_empty(),
            "decoding left bytes of its own encoding"
        );
    }
}

// ---------------------------------------------------------------------------------------
// handshake

fn alice() -> &'static Identity {
    static ALICE: OnceLock<Identity> = OnceLock::new();
    ALICE.get_or_init(|| Identity::from_secret_bytes(&ALICE_SECRET))
}

fn bob() -> &'static Identity {
    static BOB: OnceLock<Identity> = OnceLock::new();
    BOB.get_or_init(|| Identity::from_secret_bytes(&BOB_SECRET))
}

/// Runs one side of the peer handshake against a hostile other side that sends arbitrary
/// bytes, then closes its end.
///
/// Input: a mode byte, then the hostile side's bytes. Mode `% 3`:
/// - 0: a hostile dialer against `bob` listening, admitting anyone;
/// - 1: a hostile dialer against `bob` listening, refusing everyone;
/// - 2: a hostile listener against `alice` dialing `bob` (expecting `bob`'s key).
///
/// Checks: no panic, no hang; the handshake never succeeds (the hostile side cannot sign
/// over our fresh nonce); what our side wrote is well-formed frames, and reveals no more
/// than it should: a listener that refuses shows neither its `Hello` nor an `Auth`, a
/// listener that admits sends its `Hello` and `Auth` together or nothing of them, a
/// listener answers a reachability `Probe` with `ProbeOk` alone, and a dialer never sends
/// its `Auth`.
pub fn handshake(data: &[u8]) {
    let Some((&mode, hostile)) = data.split_first() else {
        return;
    };
    let written = runtime().block_on(async {
        let (ours, theirs) = tokio::io::duplex(hostile.len() + 64 * 1024);
        let (mut their_reader, mut their_writer) = tokio::io::split(theirs);
        their_writer
            .write_all(hostile)
            .await
            .expect("the pipe holds the hostile bytes");
        their_writer.shutdown().await.expect("closing the pipe");
        let conn = Connection::new(ours, ([192, 0, 2, 1], 4000).into());
        let (mut reader, mut writer) = handshake::frames(conn);
        let run = async {
            match mode % 3 {
                0 | 1 => {
                    let admit = |_name: String, _key| async move {
                        if mode % 3 == 0 {
                            Ok(())
                        } else {
                            Err(Refusal {
                                code: ErrorCode::Refused,
                                detail: "not today".into(),
                            })
                        }
                    };
                    handshake::accept(&mut reader, &mut writer, bob(), "bob", admit)
                        .await
                        .map(|(name, key, ())| format!("{name} with {key}"))
                }
                _ => handshake::dial(
                    &mut reader,
                    &mut writer,
                    alice(),
                    "alice",
                    "bob",
                    &bob().public_key(),
                )
                .await
                .map(|()| "bob".to_owned()),
            }
        };
        let outcome: Result<String, HandshakeError> = tokio::time::timeout(HANDSHAKE_LIMIT, run)
            .await
            .expect("the handshake hung on input that was already closed");
        if let Ok(peer) = outcome {
            panic!("a hostile peer completed the handshake as {peer}");
        }
        drop((reader, writer));
        let mut written = Vec::new();
        their_reader
            .read_to_end(&mut written)
            .await
            .expect("reading what our side wrote");
        written
    });
    let (frames, ending) = feed::<PeerFrame>(&written, &[written.len().max(1)]);
    assert_eq!(
        ending,
        Ending::NeedMore(0),
        "our side wrote malformed frames"
    );
    let kinds: Vec<&str> = frames
        .iter()
        .map(|f| match f {
            PeerFrame::Hello(_) => "hello",
            PeerFrame::Auth { .. } => "auth",
            PeerFrame::Error { .. } => "error",
            PeerFrame::ProbeOk { .. } => "probe-ok",
            _ => "other",
        })
        .collect();
    // A listener answers a reachability probe (a `Probe` as the first frame) whoever sends
    // it, and closes: that is not a handshake.
    let allowed: &[&[&str]] = match mode % 3 {
        0 => &[&[], &["error"], &["hello", "auth"], &["probe-ok"]],
        1 => &[&[], &["error"], &["probe-ok"]],
        _ => &[&["hello"], &["hello", "error"]],
    };
    assert!(
        allowed.contains(&&kinds[..]),
        "in mode {} our side wrote {kinds:?}",
        mode % 3
    );
}

// ---------------------------------------------------------------------------------------
// token_open

/// The one payload ever sealed under `alice` and `bob`'s pair key in these checks (and in
/// the kept seeds): every token that opens must open to it.
pub fn token_payload() -> Payload {
    Payload {
        id: MessageId::from_bytes([0x42; 16]),
        from: "alice".into(),
        to: "bob".into(),
        sent_at_ms: TOKEN_NOW * 1000,
        seq: 1,
        body: "hi bob".into(),
    }
}

/// `alice` and `bob`'s pair key, and `alice` and `carol`'s.
fn token_keys() -> &'static (PairKey, PairKey) {
    static KEYS: OnceLock<(PairKey, PairKey)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let carol = Identity::from_secret_bytes(&CAROL_SECRET);
        (
            PairKey::derive(alice(), &bob().public_key()).expect("alice and bob's key"),
            PairKey::derive(alice(), &carol.public_key()).expect("alice and carol's key"),
        )
    })
}

/// A token of [`token_payload`] sealed at [`TOKEN_NOW`] under `alice` and `bob`'s pair key
/// (a fresh IV each call): what the seeds hold.
pub fn token_seed() -> String {
    token_keys().0.seal_at(&token_payload(), TOKEN_NOW)
}

/// Opens an arbitrary token as a message from `alice` to `bob` at [`TOKEN_NOW`].
///
/// Input: a mode byte, then the token. Mode even: the token is the rest, as text (invalid
/// UTF-8 replaced). Mode odd: the rest is the token's binary form, encoded here as Fernet
/// does (URL-safe base64), so the fuzzer mutates the version, timestamp, IV, ciphertext and
/// MAC directly: seeded with a valid token, these are mutated valid tokens.
///
/// Checks: no panic; a token that opens opens to [`token_payload`], the only payload sealed
/// under that key, so no mutation makes it open to anything else; `alice` and `carol`'s key
/// opens none.
pub fn token_open(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        base64::engine::general_purpose::URL_SAFE.encode(rest)
    };
    let (pair, other) = token_keys();
    if let Ok(payload) = pair.open_at(&token, "alice", "bob", DEFAULT_MESSAGE_TTL, TOKEN_NOW) {
        assert_eq!(
            payload,
            token_payload(),
            "a token opened to another payload"
        );
    }
    if let Ok(payload) = other.open_at(&token, "alice", "bob", DEFAULT_MESSAGE_TTL, TOKEN_NOW) {
        panic!("a key that sealed nothing opened a token to {payload:?}");
    }
}
