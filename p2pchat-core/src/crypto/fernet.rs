//! Fernet tokens, built on the RustCrypto primitives with the key state prepared once.
//!
//! The token format is the [Fernet specification]'s, byte for byte: `0x80 ‖ timestamp (u64
//! big-endian) ‖ IV (16) ‖ AES-128-CBC ciphertext (PKCS#7) ‖ HMAC-SHA256 (32)`, base64url with
//! padding. Tokens interoperate with the `fernet` crate in both directions (tested below).
//!
//! Why not the `fernet` crate itself: it expands the AES key schedule and keys the HMAC for
//! every token, reads the IV with one `getrandom` system call per token, and allocates five
//! or six buffers per token. On the send path of small messages those costs were the largest
//! single item in the profile (see `BENCHMARKS.md`). Here the AES key schedule and the keyed
//! HMAC state are built once per pair key and cloned per token, the IV comes from the thread's
//! CSPRNG, and a token costs one allocation to seal (its string) and none to open. The
//! scratch buffer is zeroed after opening, so no plaintext stays behind in it.
//!
//! Time checks (expiry, clock skew) are the caller's: [`super::PairKey::open`] applies them
//! from the clear-text timestamp before the token is authenticated and decrypted here.
//!
//! [Fernet specification]: https://github.com/fernet/spec/blob/master/Spec.md

use aes::Aes128;
use base64::Engine as _;
use cbc::cipher::block_padding::Pkcs7;
use cbc::cipher::{BlockDecryptMut, BlockEncryptMut, InnerIvInit, KeyInit as _};
use hmac::Mac as _;
use sha2::Sha256;
use zeroize::Zeroize as _;

/// The version byte every Fernet token starts with.
const VERSION: u8 = 0x80;
/// Version, timestamp and IV.
const HEADER_LEN: usize = 1 + 8 + 16;
/// HMAC-SHA256 tag.
const TAG_LEN: usize = 32;
/// AES block.
const BLOCK: usize = 16;

/// Base64url with `=` padding, as Fernet writes it; decoding accepts it with or without.
/// (Tokens are written, and read first, with `base64_simd`: the same alphabet and padding.)
const B64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// One Fernet key, ready to use: the AES-128 key schedule and the HMAC keyed with the
/// signing key.
#[derive(Clone)]
pub(crate) struct FernetKey {
    aes: Aes128,
    mac: hmac::Hmac<Sha256>,
}

/// A token that does not authenticate or does not decrypt. Deliberately without detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Invalid;

impl FernetKey {
    /// The key from its 32 bytes: the signing key, then the encryption key.
    pub(crate) fn new(key: &[u8; 32]) -> Self {
        let (signing, encryption) = key.split_at(16);
        Self {
            aes: Aes128::new(encryption.into()),
            mac: <hmac::Hmac<Sha256> as hmac::KeyInit>::new_from_slice(signing)
                .expect("HMAC takes a key of any length"),
        }
    }

    /// Seals the plaintext that `write` appends to the buffer it is given, stamped
    /// `unix_secs`, under a fresh random IV.
    pub(crate) fn seal_with(&self, unix_secs: u64, write: impl FnOnce(&mut Vec<u8>)) -> String {
        // The thread's CSPRNG (ChaCha, seeded and periodically reseeded from the OS): an
        // unpredictable IV, as CBC needs, without a system call per token.
        let iv: [u8; BLOCK] = rand::random();
        self.seal_with_iv(unix_secs, iv, write)
    }

    fn seal_with_iv(
        &self,
        unix_secs: u64,
        iv: [u8; BLOCK],
        write: impl FnOnce(&mut Vec<u8>),
    ) -> String {
        SCRATCH.with_borrow_mut(|raw| {
            raw.clear();
            raw.push(VERSION);
            raw.extend_from_slice(&unix_secs.to_be_bytes());
            raw.extend_from_slice(&iv);
            write(raw);
            let plain_len = raw.len() - HEADER_LEN;
            let padded_len = (plain_len / BLOCK + 1) * BLOCK;
            raw.resize(HEADER_LEN + padded_len, 0);
            cbc::Encryptor::<Aes128>::inner_iv_init(self.aes.clone(), &iv.into())
                .encrypt_padded_mut::<Pkcs7>(&mut raw[HEADER_LEN..], plain_len)
                .expect("the buffer holds the padded plaintext");
            let mut mac = self.mac.clone();
            mac.update(raw);
            raw.extend_from_slice(&mac.finalize().into_bytes());
            let token = base64_simd::URL_SAFE.encode_to_string(&raw[..]);
            shrink(raw);
            token
        })
    }

    /// Authenticates and decrypts `token`, then hands the plaintext to `read`. Does not look
    /// at the timestamp.
    pub(crate) fn open_with<T>(
        &self,
        token: &str,
        read: impl FnOnce(&[u8]) -> T,
    ) -> Result<T, Invalid> {
        SCRATCH.with_borrow_mut(|raw| {
            raw.clear();
            let result = self.open_into(token, raw).map(read);
            // The plaintext was decrypted in place: it does not stay behind in the buffer.
            raw.as_mut_slice().zeroize();
            shrink(raw);
            result
        })
    }

    fn open_into<'a>(&self, token: &str, raw: &'a mut Vec<u8>) -> Result<&'a [u8], Invalid> {
        // SIMD for the tokens Fernet writes (padded); the general engine for the rest: a
        // token without its padding, or with more `=` than it needs, which the specification's
        // decoders accept too (the `fernet` crate trims every trailing `=`; the
        // `fernet_differential` fuzz target checks that we agree with it). Either way the data
        // must be canonical base64url.
        if base64_simd::URL_SAFE.decode_append(token, raw).is_err() {
            raw.clear();
            B64.decode_vec(token.trim_end_matches('='), raw)
                .map_err(|_| Invalid)?;
        }
        let len = raw.len();
        let body_len = len
            .checked_sub(HEADER_LEN + TAG_LEN)
            .filter(|n| *n > 0 && n % BLOCK == 0)
            .ok_or(Invalid)?;
        if raw[0] != VERSION {
            return Err(Invalid);
        }
        let (signed, tag) = raw.split_at_mut(len - TAG_LEN);
        let mut mac = self.mac.clone();
        mac.update(signed);
        // Constant-time comparison.
        mac.verify_slice(tag).map_err(|_| Invalid)?;
        let iv: [u8; BLOCK] = signed[9..HEADER_LEN].try_into().map_err(|_| Invalid)?;
        let body = &mut signed[HEADER_LEN..HEADER_LEN + body_len];
        cbc::Decryptor::<Aes128>::inner_iv_init(self.aes.clone(), &iv.into())
            .decrypt_padded_mut::<Pkcs7>(body)
            .map(|plain| plain as &[u8])
            .map_err(|_| Invalid)
    }
}

/// What [`crate::testing::fernet`] needs from this module, which is private to `crate::crypto`
/// (re-exported there as `crypto::fernet_hooks`). Test support only (feature `test-utils`):
/// the production paths above do not go through here.
#[cfg(feature = "test-utils")]
pub(crate) mod hooks {
    use super::{BLOCK, FernetKey};

    /// Seals `plaintext` under the 32-byte `key` (signing key, then encryption key), stamped
    /// `unix_secs`, with the given IV instead of a random one.
    pub(crate) fn seal(
        key: &[u8; 32],
        unix_secs: u64,
        iv: [u8; BLOCK],
        plaintext: &[u8],
    ) -> String {
        FernetKey::new(key).seal_with_iv(unix_secs, iv, |buf| buf.extend_from_slice(plaintext))
    }

    /// Authenticates and decrypts `token` under `key`, without looking at its timestamp.
    pub(crate) fn open(key: &[u8; 32], token: &str) -> Option<Vec<u8>> {
        FernetKey::new(key).open_with(token, <[u8]>::to_vec).ok()
    }

    /// The token's timestamp, read without authenticating it (as [`PairKey::open`] reads it).
    ///
    /// [`PairKey::open`]: crate::crypto::PairKey::open
    pub(crate) fn timestamp(token: &str) -> Option<u64> {
        super::timestamp(token)
    }
}

/// The timestamp in a token's header, read without authenticating it.
pub(crate) fn timestamp(token: &str) -> Option<u64> {
    // 12 base64 characters decode to exactly the 9 bytes of version and timestamp.
    let head = token.get(..12)?;
    let mut bytes = [0u8; 9];
    let n = B64.decode_slice(head, &mut bytes).ok()?;
    if n != 9 || bytes[0] != VERSION {
        return None;
    }
    Some(u64::from_be_bytes(bytes[1..9].try_into().ok()?))
}

/// The timestamp of a token shaped like a Fernet token: base64url (padding optional),
/// version `0x80`, the header, a whole number of AES blocks (at least one) and the tag.
/// Nothing is authenticated: this is what someone without the key can check.
pub(crate) fn shape(token: &str) -> Option<u64> {
    let stamped = timestamp(token)?;
    let mut raw = Vec::new();
    if base64_simd::URL_SAFE
        .decode_append(token, &mut raw)
        .is_err()
    {
        raw.clear();
        B64.decode_vec(token.trim_end_matches('='), &mut raw).ok()?;
    }
    let body = raw.len().checked_sub(HEADER_LEN + TAG_LEN)?;
    (body >= BLOCK && body % BLOCK == 0).then_some(stamped)
}

thread_local! {
    /// The per-thread buffer tokens are built and opened in.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Scratch space kept between tokens; a rare large one does not stay allocated.
const SCRATCH_KEEP: usize = 16 * 1024;

fn shrink(raw: &mut Vec<u8>) {
    if raw.capacity() > SCRATCH_KEEP {
        *raw = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;

    fn keys() -> ([u8; 32], fernet::Fernet) {
        let key: [u8; 32] = rand::random();
        let encoded = base64::engine::general_purpose::URL_SAFE.encode(key);
        (key, fernet::Fernet::new(&encoded).unwrap())
    }

    fn seal(key: &FernetKey, plain: &[u8], at: u64) -> String {
        key.seal_with(at, |buf| buf.extend_from_slice(plain))
    }

    fn open(key: &FernetKey, token: &str) -> Result<Vec<u8>, Invalid> {
        key.open_with(token, <[u8]>::to_vec)
    }

    #[test]
    fn tokens_interoperate_with_the_fernet_crate_both_ways() {
        let now = 1_700_000_000;
        for len in [0, 1, 15, 16, 17, 64, 1024, 70_000] {
            let (raw, reference) = keys();
            let key = FernetKey::new(&raw);
            let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let ours = seal(&key, &plain, now);
            assert_eq!(reference.decrypt_at_time(&ours, None, now).unwrap(), plain);
            let theirs = reference.encrypt_at_time(&plain, now);
            assert_eq!(open(&key, &theirs).unwrap(), plain, "len {len}");
            assert_eq!(timestamp(&ours), Some(now));
        }
    }

    #[test]
    fn the_specifications_generate_vector_is_reproduced() {
        // From the Fernet spec's generate.json.
        let key: [u8; 32] = base64::engine::general_purpose::URL_SAFE
            .decode("cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=")
            .unwrap()
            .try_into()
            .unwrap();
        let iv: [u8; 16] = (0..16).collect::<Vec<u8>>().try_into().unwrap();
        let token = FernetKey::new(&key).seal_with_iv(499_162_800, iv, |b| {
            b.extend_from_slice(b"hello");
        });
        assert_eq!(
            token,
            "gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA=="
        );
    }

    #[test]
    fn altered_truncated_or_foreign_tokens_are_invalid() {
        let (raw, _) = keys();
        let key = FernetKey::new(&raw);
        let token = seal(&key, b"secret", 1);
        let mut bytes = token.clone().into_bytes();
        for i in 0..bytes.len() {
            let saved = bytes[i];
            bytes[i] = if saved == b'A' { b'B' } else { b'A' };
            if let Ok(altered) = std::str::from_utf8(&bytes) {
                // Changing a base64 character can leave the decoded bytes equal only in the
                // unused low bits of the last character; anything that opens must be intact.
                if let Ok(plain) = open(&key, altered) {
                    assert_eq!(plain, b"secret");
                }
            }
            bytes[i] = saved;
        }
        // Padding is optional on input (as in the `fernet` crate); a cut into the data is not.
        let data_len = token.trim_end_matches('=').len();
        for cut in [0, 1, 12, 40, data_len - 1] {
            assert_eq!(open(&key, &token[..cut]), Err(Invalid), "cut at {cut}");
        }
        let other = FernetKey::new(&keys().0);
        assert_eq!(open(&other, &token), Err(Invalid));
        assert_eq!(open(&key, "not base64 at all!"), Err(Invalid));
        assert_eq!(timestamp("junk"), None);
    }

    #[test]
    fn padding_may_be_missing_or_excess_but_the_data_must_be_canonical() {
        let (raw, reference) = keys();
        let key = FernetKey::new(&raw);
        // 20 plaintext bytes: 25 + 32 + 32 = 89 token bytes, which need one `=`.
        let plain = b"a twenty-byte secret";
        let token = seal(&key, plain, 1);
        assert!(token.ends_with('=') && !token.ends_with("=="), "{token}");
        let data = token.trim_end_matches('=');
        for padding in ["", "=", "==", "===", "========"] {
            let variant = format!("{data}{padding}");
            assert_eq!(open(&key, &variant).as_deref(), Ok(&plain[..]), "{variant}");
            assert!(
                reference.decrypt_at_time(&variant, None, 1).is_ok(),
                "{variant}"
            );
        }
        // The last character carries 2 unused bits; setting them is not the same token.
        let last = data.chars().last().unwrap();
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let index = alphabet.find(last).unwrap();
        let altered_char = alphabet.as_bytes()[index ^ 1] as char;
        let altered = format!("{}{altered_char}=", &data[..data.len() - 1]);
        assert_eq!(open(&key, &altered), Err(Invalid));
        assert!(reference.decrypt_at_time(&altered, None, 1).is_err());
        // `=` anywhere but at the end is not base64url.
        let inside = format!("{}={}", &data[..20], &data[20..]);
        assert_eq!(open(&key, &inside), Err(Invalid));
    }
}
