//! The Fernet specification's own test vectors (`tests/data/fernet/`, verbatim copies of
//! `generate.json`, `verify.json` and `invalid.json` from github.com/fernet/spec), every one of
//! them, run against the crate's Fernet implementation through `testing::fernet`; the
//! specification's time rules at their edges; and the inputs kept for the
//! `fernet_differential` fuzz target, replayed against the `fernet` crate.

use p2pchat_core::testing::fernet::{
    self, DifferentialInput, DifferentialMode, FernetError, KEY_LEN, Reference,
};
use p2pchat_core::testing::fuzz;
use serde::Deserialize;

use super::fuzz_regressions::kept_inputs;

const GENERATE: &str = include_str!("../data/fernet/generate.json");
const VERIFY: &str = include_str!("../data/fernet/verify.json");
const INVALID: &str = include_str!("../data/fernet/invalid.json");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateVector {
    token: String,
    now: String,
    iv: Vec<u8>,
    src: String,
    secret: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyVector {
    token: String,
    now: String,
    ttl_sec: u64,
    src: String,
    secret: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InvalidVector {
    desc: String,
    token: String,
    now: String,
    ttl_sec: u64,
    secret: String,
}

fn vectors<T: serde::de::DeserializeOwned>(json: &str) -> Vec<T> {
    serde_json::from_str(json).expect("the vectors parse")
}

fn key(secret: &str) -> [u8; KEY_LEN] {
    fernet::decode_key(secret).expect("a 32-byte base64url key")
}

/// Seconds since the Unix epoch of an RFC 3339 time, as the vectors write `now`.
fn unix_secs(rfc3339: &str) -> u64 {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()
        .and_then(|at| u64::try_from(at.unix_timestamp()).ok())
        .unwrap_or_else(|| panic!("not an RFC 3339 time after 1970: {rfc3339:?}"))
}

#[test]
fn the_time_parser_reads_the_vectors_times() {
    assert_eq!(unix_secs("1970-01-01T00:00:00Z"), 0);
    assert_eq!(unix_secs("2000-03-01T00:00:00+00:00"), 951_868_800);
    assert_eq!(unix_secs("2024-02-29T12:34:56.789Z"), 1_709_210_096);
    // The vectors' clock: the token timestamp 0x1dc09eb0 of generate.json.
    assert_eq!(unix_secs("1985-10-26T01:20:00-07:00"), 0x1dc0_9eb0);
    assert_eq!(unix_secs("1985-10-26T08:20:00+00:00"), 0x1dc0_9eb0);
}

#[test]
fn every_generate_vector_is_reproduced_byte_for_byte() {
    let vectors: Vec<GenerateVector> = vectors(GENERATE);
    assert_eq!(vectors.len(), 1, "generate.json holds 1 vector");
    for v in &vectors {
        let key = key(&v.secret);
        let now = unix_secs(&v.now);
        let iv: [u8; 16] = v.iv.as_slice().try_into().expect("a 16-byte IV");
        let token = fernet::seal(&key, now, iv, v.src.as_bytes());
        assert_eq!(token, v.token, "generate vector {v:?}");
        assert_eq!(fernet::timestamp(&token), Some(now));
        assert_eq!(
            fernet::open(&key, &token, now, Some(0)).as_deref(),
            Ok(v.src.as_bytes()),
            "the generated token opens back: {v:?}"
        );
    }
    eprintln!("{} generate vectors passed", vectors.len());
}

#[test]
fn every_verify_vector_opens_to_its_source() {
    let vectors: Vec<VerifyVector> = vectors(VERIFY);
    assert_eq!(vectors.len(), 1, "verify.json holds 1 vector");
    for v in &vectors {
        let opened = fernet::open(
            &key(&v.secret),
            &v.token,
            unix_secs(&v.now),
            Some(v.ttl_sec),
        );
        assert_eq!(
            opened.as_deref(),
            Ok(v.src.as_bytes()),
            "verify vector {v:?}"
        );
    }
    eprintln!("{} verify vectors passed", vectors.len());
}

#[test]
fn every_invalid_vector_is_refused() {
    let vectors: Vec<InvalidVector> = vectors(INVALID);
    assert_eq!(vectors.len(), 8, "invalid.json holds 8 vectors");
    for v in &vectors {
        let refused = fernet::open(
            &key(&v.secret),
            &v.token,
            unix_secs(&v.now),
            Some(v.ttl_sec),
        )
        .expect_err(&v.desc);
        // The time vectors are authentic tokens, refused for their time alone; every other
        // is simply invalid.
        match v.desc.as_str() {
            "expired TTL" => assert!(
                matches!(
                    refused,
                    FernetError::Expired {
                        age_secs: 90,
                        ttl_secs: 60
                    }
                ),
                "{v:?}: {refused:?}"
            ),
            "far-future TS (unacceptable clock skew)" => assert!(
                matches!(refused, FernetError::FromTheFuture { ahead_secs: 36_000 }),
                "{v:?}: {refused:?}"
            ),
            _ => assert_eq!(refused, FernetError::Invalid, "{v:?}"),
        }
    }
    eprintln!("{} invalid vectors refused", vectors.len());
}

#[test]
fn the_time_rules_hold_at_their_edges() {
    let key = [7u8; KEY_LEN];
    let at = 1_750_000_000;
    let token = fernet::seal(&key, at, [9; 16], b"edge");
    let open = |now, ttl| fernet::open(&key, &token, now, ttl);
    // Expiry: `timestamp + ttl < now` is refused; equal is not.
    assert_eq!(open(at + 60, Some(60)).as_deref(), Ok(&b"edge"[..]));
    assert_eq!(
        open(at + 61, Some(60)),
        Err(FernetError::Expired {
            age_secs: 61,
            ttl_secs: 60
        })
    );
    assert_eq!(
        open(at + 1, Some(0)),
        Err(FernetError::Expired {
            age_secs: 1,
            ttl_secs: 0
        })
    );
    // No TTL, no expiry.
    assert_eq!(open(u64::MAX, None).as_deref(), Ok(&b"edge"[..]));
    // Clock skew: `now + 60 < timestamp` is refused, with or without a TTL; 60 s is not.
    assert_eq!(open(at - 60, Some(10)).as_deref(), Ok(&b"edge"[..]));
    assert_eq!(
        open(at - 61, Some(10)),
        Err(FernetError::FromTheFuture { ahead_secs: 61 })
    );
    assert_eq!(
        open(at - 61, None),
        Err(FernetError::FromTheFuture { ahead_secs: 61 })
    );
    // A refusal for time is given only to an authentic token: the same token under another
    // key is invalid, whatever the clock.
    let other = [8u8; KEY_LEN];
    for now in [at, at + 61, at - 61] {
        assert_eq!(
            fernet::open(&other, &token, now, Some(60)),
            Err(FernetError::Invalid)
        );
    }
    // Saturating arithmetic at the ends of the clock.
    let last = fernet::seal(&key, u64::MAX, [0; 16], b"late");
    assert_eq!(
        fernet::open(&key, &last, u64::MAX, Some(u64::MAX)).as_deref(),
        Ok(&b"late"[..])
    );
    assert_eq!(
        fernet::open(&key, &last, 0, Some(u64::MAX)),
        Err(FernetError::FromTheFuture {
            ahead_secs: u64::MAX
        })
    );
    let first = fernet::seal(&key, 0, [0; 16], b"early");
    assert_eq!(
        fernet::open(&key, &first, u64::MAX, Some(u64::MAX - 1)),
        Err(FernetError::Expired {
            age_secs: u64::MAX,
            ttl_secs: u64::MAX - 1
        })
    );
}

#[test]
fn keys_round_trip_through_base64url() {
    let key: [u8; KEY_LEN] = std::array::from_fn(|i| (i * 7) as u8);
    let encoded = fernet::encode_key(&key);
    assert_eq!(encoded.len(), 44);
    assert_eq!(fernet::decode_key(&encoded), Some(key));
    assert_eq!(fernet::decode_key(encoded.trim_end_matches('=')), Some(key));
    assert_eq!(fernet::decode_key("c2hvcnQ="), None, "too short");
    assert_eq!(fernet::decode_key("not base64!"), None);
}

/// The `fernet` crate, the reference the `fernet_differential` fuzz target compares with (the
/// same code as in `fuzz/fuzz_targets/fernet_differential.rs`).
struct FernetCrate;

impl Reference for FernetCrate {
    fn seal(&self, key: &[u8; KEY_LEN], unix_secs: u64, plaintext: &[u8]) -> String {
        ::fernet::Fernet::new(&fernet::encode_key(key))
            .expect("any 32 bytes are a key")
            .encrypt_at_time(plaintext, unix_secs)
    }

    fn open(
        &self,
        key: &[u8; KEY_LEN],
        token: &str,
        now_secs: u64,
        ttl_secs: Option<u64>,
    ) -> Option<Vec<u8>> {
        ::fernet::Fernet::new(&fernet::encode_key(key))
            .expect("any 32 bytes are a key")
            .decrypt_at_time(token, ttl_secs, now_secs)
            .ok()
    }
}

fn differential(data: &[u8]) {
    fernet::differential(data, &FernetCrate);
}

#[test]
fn fernet_differential_regressions_pass() {
    fuzz::replay_regressions(kept_inputs("fernet_differential"), differential);
}

#[test]
fn the_spec_vectors_agree_with_the_fernet_crate_under_the_differential_check() {
    // Every token of the three files, as a `Text` input of the differential check, at the
    // vector's clock and TTL: the same verdicts from both implementations.
    let inputs = vectors::<GenerateVector>(GENERATE)
        .into_iter()
        .map(|v| (v.secret, v.token, v.now, None))
        .chain(
            vectors::<VerifyVector>(VERIFY)
                .into_iter()
                .map(|v| (v.secret, v.token, v.now, Some(v.ttl_sec))),
        )
        .chain(
            vectors::<InvalidVector>(INVALID)
                .into_iter()
                .map(|v| (v.secret, v.token, v.now, Some(v.ttl_sec))),
        );
    for (secret, token, now, ttl) in inputs {
        let now = unix_secs(&now);
        let input = DifferentialInput {
            key: key(&secret),
            stamp: now,
            // The clock is relative to the token's timestamp, where it has one.
            now_offset: fernet::timestamp(&token).map_or(0, |at| {
                i32::try_from(i128::from(now) - i128::from(at)).expect("a small offset")
            }),
            ttl_secs: ttl.map(|t| u32::try_from(t).expect("a small TTL")),
            iv: [0; 16],
            mode: DifferentialMode::Text,
            payload: token.into_bytes(),
        };
        assert_eq!(DifferentialInput::from_bytes(&input.to_bytes()), input);
        differential(&input.to_bytes());
    }
}

#[test]
fn the_differential_check_tolerates_any_input() {
    // Short inputs read as zeros; every mode, with and without a TTL.
    for len in [0, 1, 44, 69, 70, 200] {
        for flags in 0..8u8 {
            let mut data: Vec<u8> = (0..len).map(|i| (i * 31 + 5) as u8).collect();
            if data.len() > 44 {
                data[44] = flags;
            }
            differential(&data);
        }
    }
}
