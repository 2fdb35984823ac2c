//! The crate's own Fernet implementation, by the [Fernet specification]'s rules, with the key,
//! the clock and the IV in the caller's hands: what the specification's test vectors
//! (`tests/data/fernet/`, run by `tests/it/fernet_vectors.rs`) and the `fernet_differential`
//! fuzz target need.
//!
//! In production the implementation is reachable only through a [`PairKey`], which derives its
//! Fernet key from X25519 + HKDF, draws a random IV and reads the system clock. Here [`seal`]
//! and [`open`] run the very same code (the same key schedule, encoder, decoder and MAC) on a
//! given 32-byte Fernet key, Unix time and IV.
//!
//! ```
//! use p2pchat_core::testing::fernet::{self, FernetError};
//!
//! // The specification's generate.json vector.
//! let key = fernet::decode_key("cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=").unwrap();
//! let iv: [u8; 16] = std::array::from_fn(|i| i as u8);
//! let token = fernet::seal(&key, 499_162_800, iv, b"hello");
//! assert_eq!(
//!     token,
//!     "gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA=="
//! );
//! assert_eq!(fernet::open(&key, &token, 499_162_801, Some(60)).unwrap(), b"hello");
//! assert!(matches!(
//!     fernet::open(&key, &token, 499_162_900, Some(60)),
//!     Err(FernetError::Expired { age_secs: 100, ttl_secs: 60 })
//! ));
//! ```
//!
//! [Fernet specification]: https://github.com/fernet/spec/blob/master/Spec.md
//! [`PairKey`]: crate::crypto::PairKey

use base64::Engine as _;

use crate::crypto::MAX_CLOCK_SKEW;
use crate::crypto::fernet_hooks as hooks;

/// The length of a Fernet key: the 16-byte signing key, then the 16-byte encryption key (what
/// the specification's base64url keys decode to).
pub const KEY_LEN: usize = 32;

/// The length of a Fernet IV: one AES block.
pub const IV_LEN: usize = 16;

/// How far in the future (seconds) a token's timestamp may be before [`open`] refuses it:
/// [`MAX_CLOCK_SKEW`], the 60 s of the reference implementations.
pub const MAX_CLOCK_SKEW_SECS: u64 = MAX_CLOCK_SKEW.as_secs();

/// Why [`open`] refused a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FernetError {
    /// Not a Fernet token (not base64url, not version `0x80`, a wrong length), or one that
    /// does not authenticate under the key, or does not decrypt (bad padding). Deliberately
    /// without detail, as in the production path.
    #[error("invalid Fernet token")]
    Invalid,
    /// An authentic token older than the TTL: its age (now minus its timestamp) is more than
    /// `ttl_secs`.
    #[error("token expired: {age_secs} s old, TTL {ttl_secs} s")]
    Expired {
        /// Seconds between the token's timestamp and now.
        age_secs: u64,
        /// The TTL it exceeded.
        ttl_secs: u64,
    },
    /// An authentic token stamped more than [`MAX_CLOCK_SKEW_SECS`] after now.
    #[error(
        "token timestamp is {ahead_secs} s in the future (at most {MAX_CLOCK_SKEW_SECS} s allowed)"
    )]
    FromTheFuture {
        /// Seconds the token's timestamp is ahead of now.
        ahead_secs: u64,
    },
}

/// Decodes a Fernet key as the specification writes it (base64url, padding optional). `None`
/// if it is not base64url or not [`KEY_LEN`] bytes.
pub fn decode_key(encoded: &str) -> Option<[u8; KEY_LEN]> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded.trim_end_matches('='))
        .ok()?
        .try_into()
        .ok()
}

/// Encodes a Fernet key as the specification writes it (base64url with padding), the form
/// other implementations (the `fernet` crate's `Fernet::new`) take.
pub fn encode_key(key: &[u8; KEY_LEN]) -> String {
    base64::engine::general_purpose::URL_SAFE.encode(key)
}

/// Seals `plaintext` into a Fernet token under `key` (signing key, then encryption key),
/// stamped `unix_secs` (seconds since the Unix epoch), encrypted with the given `iv`.
///
/// The same code as the production path, with the IV given instead of drawn: the same inputs
/// always give the same token, byte for byte the specification's (base64url with padding).
/// Reusing an IV under a key is unsafe outside tests.
pub fn seal(key: &[u8; KEY_LEN], unix_secs: u64, iv: [u8; IV_LEN], plaintext: &[u8]) -> String {
    hooks::seal(key, unix_secs, iv, plaintext)
}

/// Opens `token` under `key` at `now_secs` (seconds since the Unix epoch), returning its
/// plaintext, with the specification's rules:
///
/// - the token must be base64url (the padding may be missing or longer than needed, as the
///   reference decoders accept), start with version `0x80`, hold a whole number of AES blocks,
///   authenticate under the signing key (constant-time comparison) and decrypt to valid PKCS#7
///   padding, or it is [`FernetError::Invalid`];
/// - with `ttl_secs` `Some(ttl)`, a token whose timestamp is more than `ttl` seconds before
///   `now_secs` (`timestamp + ttl < now`) is [`FernetError::Expired`]; `None` is no expiry
///   check at all;
/// - whatever the TTL, a token stamped more than [`MAX_CLOCK_SKEW_SECS`] after `now_secs`
///   (`now + 60 < timestamp`) is [`FernetError::FromTheFuture`].
///
/// As in [`PairKey::open`], the clear-text timestamp is checked first, but a token is called
/// expired or from the future only if it also authenticates: anything else is
/// [`FernetError::Invalid`]. Unlike [`PairKey::open`], which allows one more second for the
/// truncation of its own timestamps and rounds a sub-second TTL up, the limits here are
/// exactly the specification's. The arithmetic saturates: no timestamp, `now` or TTL
/// overflows.
///
/// [`PairKey::open`]: crate::crypto::PairKey::open
pub fn open(
    key: &[u8; KEY_LEN],
    token: &str,
    now_secs: u64,
    ttl_secs: Option<u64>,
) -> Result<Vec<u8>, FernetError> {
    // Readable whenever the token is well formed: a token it cannot read cannot open either.
    let stamped = hooks::timestamp(token).ok_or(FernetError::Invalid)?;
    let refusal = if stamped > now_secs.saturating_add(MAX_CLOCK_SKEW_SECS) {
        Some(FernetError::FromTheFuture {
            ahead_secs: stamped - now_secs,
        })
    } else {
        let age_secs = now_secs.saturating_sub(stamped);
        ttl_secs
            .filter(|ttl| age_secs > *ttl)
            .map(|ttl_secs| FernetError::Expired { age_secs, ttl_secs })
    };
    let plaintext = hooks::open(key, token).ok_or(FernetError::Invalid)?;
    match refusal {
        Some(refusal) => Err(refusal),
        None => Ok(plaintext),
    }
}

/// The timestamp in `token`'s header (seconds since the Unix epoch), read without
/// authenticating it, as [`open`] reads it first. `None` if the token does not start with a
/// base64url version byte `0x80` and timestamp.
pub fn timestamp(token: &str) -> Option<u64> {
    hooks::timestamp(token)
}

// ---------------------------------------------------------------------------------------
// Differential checking against another implementation

/// Another Fernet implementation, for [`differential`] to compare this one with: the `fernet`
/// crate, in the fuzz target and in the regression test.
pub trait Reference {
    /// Seals `plaintext` under `key` (signing key, then encryption key), stamped `unix_secs`,
    /// with an IV of its own choosing.
    fn seal(&self, key: &[u8; KEY_LEN], unix_secs: u64, plaintext: &[u8]) -> String;

    /// Opens `token` under `key` at `now_secs` with an optional TTL in seconds (`None`: no
    /// expiry check); `None` if it refuses the token for any reason.
    ///
    /// [`differential`] never passes a `now_secs` above `u64::MAX - 60`, nor a TTL that
    /// overflows when added to the token's timestamp, so an implementation that computes
    /// `now + 60` and `timestamp + ttl` unchecked (as the `fernet` crate does) does not
    /// overflow.
    fn open(
        &self,
        key: &[u8; KEY_LEN],
        token: &str,
        now_secs: u64,
        ttl_secs: Option<u64>,
    ) -> Option<Vec<u8>>;
}

/// The largest clock [`differential`] opens tokens at: `now + 60` must not overflow in the
/// reference.
const MAX_NOW: u64 = u64::MAX - MAX_CLOCK_SKEW_SECS;

/// Where the token [`differential`] compares on comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DifferentialMode {
    /// This implementation seals the payload (with the input's timestamp and IV); the
    /// reference must open it to the payload.
    SealOurs,
    /// The reference seals the payload (with the input's timestamp); this implementation must
    /// open it to the payload.
    SealTheirs,
    /// The payload is the token, as text (invalid UTF-8 replaced).
    Text,
    /// The payload is the token's binary form, encoded here as base64url with padding, so
    /// that the fuzzer mutates the version, timestamp, IV, ciphertext and MAC directly.
    Binary,
}

/// One input of [`differential`], as parsed from the fuzzer's bytes.
///
/// The bytes: `key` (32), `stamp` (u64 big-endian), `now_offset` (i32 big-endian), a flags
/// byte (bits 0–1: the mode, in the order of [`DifferentialMode`]; bit 2: a TTL is given),
/// the TTL (u32 big-endian, ignored without bit 2), `iv` (16), then the payload (the rest).
/// Missing bytes in the fixed part read as zero, so every input parses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DifferentialInput {
    /// The Fernet key both implementations use.
    pub key: [u8; KEY_LEN],
    /// The timestamp tokens are sealed with (capped at `u64::MAX - 60`), and the base of the
    /// clock for a token whose own timestamp cannot be read.
    pub stamp: u64,
    /// The clock both open at, in seconds from the token's timestamp (saturating, capped at
    /// `u64::MAX - 60`).
    pub now_offset: i32,
    /// The TTL both open with, if any.
    pub ttl_secs: Option<u32>,
    /// The IV this implementation seals with in [`DifferentialMode::SealOurs`].
    pub iv: [u8; IV_LEN],
    /// Where the token comes from.
    pub mode: DifferentialMode,
    /// The plaintext to seal, or the token.
    pub payload: Vec<u8>,
}

/// The length of the fixed part of a [`DifferentialInput`].
const DIFFERENTIAL_HEADER: usize = KEY_LEN + 8 + 4 + 1 + 4 + IV_LEN;

impl DifferentialInput {
    /// Parses fuzzer bytes (any bytes: missing ones read as zero).
    pub fn from_bytes(data: &[u8]) -> Self {
        let mut header = [0u8; DIFFERENTIAL_HEADER];
        let fixed = data.len().min(DIFFERENTIAL_HEADER);
        header[..fixed].copy_from_slice(&data[..fixed]);
        let (key, rest) = header.split_at(KEY_LEN);
        let (stamp, rest) = rest.split_at(8);
        let (now_offset, rest) = rest.split_at(4);
        let (flags, rest) = rest.split_at(1);
        let (ttl, iv) = rest.split_at(4);
        let flags = flags[0];
        Self {
            key: key.try_into().expect("32 bytes"),
            stamp: u64::from_be_bytes(stamp.try_into().expect("8 bytes")),
            now_offset: i32::from_be_bytes(now_offset.try_into().expect("4 bytes")),
            ttl_secs: (flags & 4 != 0)
                .then(|| u32::from_be_bytes(ttl.try_into().expect("4 bytes"))),
            iv: iv.try_into().expect("16 bytes"),
            mode: match flags & 3 {
                0 => DifferentialMode::SealOurs,
                1 => DifferentialMode::SealTheirs,
                2 => DifferentialMode::Text,
                _ => DifferentialMode::Binary,
            },
            payload: data[fixed..].to_vec(),
        }
    }

    /// The bytes [`Self::from_bytes`] parses back to `self`: for writing seeds.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mode = match self.mode {
            DifferentialMode::SealOurs => 0,
            DifferentialMode::SealTheirs => 1,
            DifferentialMode::Text => 2,
            DifferentialMode::Binary => 3,
        };
        let mut bytes = Vec::with_capacity(DIFFERENTIAL_HEADER + self.payload.len());
        bytes.extend_from_slice(&self.key);
        bytes.extend_from_slice(&self.stamp.to_be_bytes());
        bytes.extend_from_slice(&self.now_offset.to_be_bytes());
        bytes.push(mode | if self.ttl_secs.is_some() { 4 } else { 0 });
        bytes.extend_from_slice(&self.ttl_secs.unwrap_or(0).to_be_bytes());
        bytes.extend_from_slice(&self.iv);
        bytes.extend_from_slice(&self.payload);
        bytes
    }
}

/// Compares this implementation with `reference` on one fuzzer input (see
/// [`DifferentialInput`] for the format).
///
/// Checks: in [`DifferentialMode::SealOurs`], our token carries the input's timestamp and
/// opens, with the reference and with ours, to the payload; in
/// [`DifferentialMode::SealTheirs`], the reference's token opens with ours to the payload.
/// Then, whatever the token (those, or arbitrary text, or arbitrary bytes encoded), both
/// implementations opening it under the input's key, clock and TTL agree: both refuse it, or
/// both open it to the same plaintext. A token ours calls expired or from the future is
/// authentic (it opens at its own timestamp). Panics, naming the property, otherwise.
pub fn differential(data: &[u8], reference: &impl Reference) {
    let input = DifferentialInput::from_bytes(data);
    let key = &input.key;
    let stamp = input.stamp.min(MAX_NOW);
    let token = match input.mode {
        DifferentialMode::SealOurs => {
            let token = seal(key, stamp, input.iv, &input.payload);
            assert_eq!(timestamp(&token), Some(stamp), "our token's timestamp");
            assert_eq!(
                open(key, &token, stamp, None).as_ref(),
                Ok(&input.payload),
                "we do not open our own token {token:?}"
            );
            assert_eq!(
                reference.open(key, &token, stamp, None).as_ref(),
                Some(&input.payload),
                "the reference does not open our token {token:?}"
            );
            token
        }
        DifferentialMode::SealTheirs => {
            let token = reference.seal(key, stamp, &input.payload);
            assert_eq!(
                open(key, &token, stamp, None).as_ref(),
                Ok(&input.payload),
                "we do not open the reference's token {token:?}"
            );
            token
        }
        DifferentialMode::Text => String::from_utf8_lossy(&input.payload).into_owned(),
        DifferentialMode::Binary => {
            base64::engine::general_purpose::URL_SAFE.encode(&input.payload)
        }
    };
    let stamped = timestamp(&token);
    let now = stamped
        .unwrap_or(stamp)
        .saturating_add_signed(i64::from(input.now_offset))
        .min(MAX_NOW);
    // The reference reaches `timestamp + ttl` only for a token whose timestamp ours reads too
    // (a well-formed header): keep that sum within u64.
    let ttl = input
        .ttl_secs
        .map(u64::from)
        .filter(|ttl| stamped.is_none_or(|at| at.checked_add(*ttl).is_some()));
    let ours = open(key, &token, now, ttl);
    let theirs = reference.open(key, &token, now, ttl);
    assert_eq!(
        ours.as_ref().ok(),
        theirs.as_ref(),
        "the implementations disagree on {token:?} at {now} with TTL {ttl:?}: ours {ours:?}"
    );
    if let Err(FernetError::Expired { .. } | FernetError::FromTheFuture { .. }) = ours {
        let at = stamped.expect("a token refused for its time has a timestamp");
        assert!(
            open(key, &token, at, None).is_ok(),
            "{token:?} was refused for its time ({ours:?}) but does not authenticate"
        );
    }
}
