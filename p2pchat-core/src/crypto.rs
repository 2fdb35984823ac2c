//! Pairwise keys and sealed messages.
//!
//! Two users derive the same [`PairKey`] from their own identity secret and the other's public
//! key: `HKDF-SHA256(X25519(mine, theirs))`, with salt and info naming the protocol version and
//! both public keys (sorted, so both ends agree). Nobody else can compute it: not the discovery
//! server, not Redis, not the network. The key seals a [`Payload`] into a Fernet token, and
//! also keys the MAC on acknowledgements so an on-path attacker cannot forge an ack.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::identity::{Identity, PublicKey};
use crate::protocol::MessageId;

mod fernet;

use self::fernet::FernetKey;
#[cfg(feature = "test-utils")]
pub(crate) use self::fernet::hooks as fernet_hooks;

/// The protocol label mixed into every derived key: a new protocol version derives new keys.
pub const KEY_DERIVATION_LABEL: &str = "p2pchat/1";

/// How far in the future a token's timestamp may be before Fernet refuses it. Fixed by the
/// Fernet specification; peers whose clocks differ by more than this cannot talk.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Errors sealing or opening messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// The peer's key gives a degenerate shared secret (a small-order point): it is not a key
    /// anyone holds the secret for.
    #[error("the peer's public key is degenerate; refusing to derive a shared key")]
    DegenerateKey,
    /// The token is not a Fernet token at all.
    #[error("not a Fernet token")]
    Malformed,
    /// The token's MAC does not verify: it was altered, or sealed under another pair's key.
    #[error("token was tampered with or was not sealed for this pair of users")]
    Tampered,
    /// The token claims to be from the future by more than Fernet's 60 s allowance.
    #[error(
        "token timestamp is {ahead_secs} s in the future; Fernet allows at most 60 s of clock \
         skew: check that both machines' clocks are set correctly"
    )]
    FromTheFuture {
        /// Seconds ahead of this machine's clock.
        ahead_secs: u64,
    },
    /// The token is older than the accepted time-to-live.
    #[error("token expired: sealed {age_secs} s ago, limit is {ttl_secs} s")]
    Expired {
        /// Age of the token.
        age_secs: u64,
        /// The limit it exceeded.
        ttl_secs: u64,
    },
    /// The token decrypted but does not hold a message payload.
    #[error("token does not contain a p2pchat message")]
    BadPayload,
    /// The payload names another sender or recipient than the connection it arrived on: a
    /// reflected or re-routed token.
    #[error("message names {from} → {to}, but arrived on the {expected_from} → {expected_to} path")]
    Misrouted {
        /// Sender named in the payload.
        from: String,
        /// Recipient named in the payload.
        to: String,
        /// Sender this path authenticates.
        expected_from: String,
        /// Recipient this path delivers to.
        expected_to: String,
    },
}

/// What a sealed message carries. Everything here is encrypted and authenticated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    /// Sender-generated unique id.
    pub id: MessageId,
    /// Sender's username.
    pub from: String,
    /// Recipient's username.
    pub to: String,
    /// When the sender sent it, in milliseconds since the Unix epoch (by the sender's
    /// clock, for display).
    pub sent_at_ms: u64,
    /// The sender's sequence number: larger for every message it sends, to anyone, across
    /// its restarts and whatever its clock does. Receivers refuse a token older than the
    /// oldest id they remember from the sender by this, not by the clock.
    pub seq: u64,
    /// The message text.
    pub body: String,
}

impl Payload {
    /// When the message was sent, by the sender's clock.
    pub fn sent_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.sent_at_ms)
    }
}

/// The fields of a [`Payload`], borrowed: serialises to exactly the same bytes, so sealing
/// does not copy the names and the body, and opening checks the names without allocating.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct PayloadRef<'a> {
    pub(crate) id: MessageId,
    pub(crate) from: &'a str,
    pub(crate) to: &'a str,
    pub(crate) sent_at_ms: u64,
    pub(crate) seq: u64,
    pub(crate) body: &'a str,
}

impl<'a> From<&'a Payload> for PayloadRef<'a> {
    fn from(p: &'a Payload) -> Self {
        Self {
            id: p.id,
            from: &p.from,
            to: &p.to,
            sent_at_ms: p.sent_at_ms,
            seq: p.seq,
            body: &p.body,
        }
    }
}

/// What an opened token holds besides the two names the caller already checked.
#[derive(Debug)]
pub(crate) struct Opened {
    pub(crate) id: MessageId,
    pub(crate) sent_at_ms: u64,
    pub(crate) seq: u64,
    pub(crate) body: String,
}

/// The symmetric keys two users share. Cheap to use, not cheap to derive: cache it per peer.
#[derive(Clone)]
pub struct PairKey {
    fernet: FernetKey,
    /// HMAC-SHA256 keyed with the control key (acks and refusals), cloned per MAC.
    control: hmac::Hmac<Sha256>,
}

impl std::fmt::Debug for PairKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PairKey(..)")
    }
}

impl PairKey {
    /// Derives the key `me` shares with the owner of `peer`. Both ends compute the same key.
    pub fn derive(me: &Identity, peer: &PublicKey) -> Result<Self, CryptoError> {
        let shared = me.agreement_secret().diffie_hellman(&peer.agreement_key());
        if !shared.was_contributory() {
            return Err(CryptoError::DegenerateKey);
        }
        let (lo, hi) = {
            let (a, b) = (me.public_key().to_bytes(), peer.to_bytes());
            if a <= b { (a, b) } else { (b, a) }
        };
        let salt = format!("{KEY_DERIVATION_LABEL} pairwise key");
        let hk = hkdf::Hkdf::<Sha256>::new(Some(salt.as_bytes()), shared.as_bytes());
        let mut okm = Zeroizing::new([0u8; 64]);
        hk.expand_multi_info(&[KEY_DERIVATION_LABEL.as_bytes(), &lo, &hi], &mut okm[..])
            .map_err(|_| CryptoError::DegenerateKey)?;
        let mut fernet_key = Zeroizing::new([0u8; 32]);
        fernet_key.copy_from_slice(&okm[..32]);
        let control =
            hmac::Hmac::<Sha256>::new_from_slice(&okm[32..]).expect("HMAC accepts any key length");
        Ok(Self {
            fernet: FernetKey::new(&fernet_key),
            control,
        })
    }

    /// Seals `payload` into a Fernet token stamped with the current time.
    pub fn seal(&self, payload: &Payload) -> String {
        self.seal_ref(&payload.into())
    }

    pub(crate) fn seal_ref(&self, payload: &PayloadRef<'_>) -> String {
        self.seal_ref_at(payload, unix_secs_now())
    }

    fn seal_ref_at(&self, payload: &PayloadRef<'_>, unix_secs: u64) -> String {
        self.fernet.seal_with(unix_secs, |buf| {
            postcard::to_io(payload, buf)
                .expect("a payload of strings and integers serialises into a Vec");
        })
    }

    /// Seals with an explicit timestamp (seconds since the Unix epoch): for tests of
    /// expiry and clock skew.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn seal_at(&self, payload: &Payload, unix_secs: u64) -> String {
        self.seal_ref_at(&payload.into(), unix_secs)
    }

    /// Opens a token from `expected_from` to `expected_to`, accepting it only if it is
    /// authentic, younger than `ttl`, not from the future beyond [`MAX_CLOCK_SKEW`], and its
    /// payload names exactly that sender and recipient.
    pub fn open(
        &self,
        token: &str,
        expected_from: &str,
        expected_to: &str,
        ttl: Duration,
    ) -> Result<Payload, CryptoError> {
        self.open_at(token, expected_from, expected_to, ttl, unix_secs_now())
    }

    pub(crate) fn open_at(
        &self,
        token: &str,
        expected_from: &str,
        expected_to: &str,
        ttl: Duration,
        now_secs: u64,
    ) -> Result<Payload, CryptoError> {
        let opened = self.open_parts(token, expected_from, expected_to, ttl, now_secs)?;
        Ok(Payload {
            id: opened.id,
            from: expected_from.to_owned(),
            to: expected_to.to_owned(),
            sent_at_ms: opened.sent_at_ms,
            seq: opened.seq,
            body: opened.body,
        })
    }

    /// [`Self::open`] without copying the names the caller already has.
    pub(crate) fn open_parts(
        &self,
        token: &str,
        expected_from: &str,
        expected_to: &str,
        ttl: Duration,
        now_secs: u64,
    ) -> Result<Opened, CryptoError> {
        let stamped = fernet::timestamp(token).ok_or(CryptoError::Malformed)?;
        if stamped > now_secs.saturating_add(MAX_CLOCK_SKEW.as_secs()) {
            // The timestamp is in the clear: only a token that authenticates is "from the
            // future"; anything else is junk, not a clock problem.
            self.fernet
                .open_with(token, |_| ())
                .map_err(|_| CryptoError::Tampered)?;
            return Err(CryptoError::FromTheFuture {
                ahead_secs: stamped - now_secs,
            });
        }
        let age_secs = now_secs.saturating_sub(stamped);
        // Token timestamps are whole seconds, truncated: a token sealed 0.2 s ago can read as
        // 1 s old. Round the TTL up and allow that one truncated second, so a short TTL
        // (under a second) does not refuse fresh tokens.
        let ttl_secs = ttl
            .as_secs()
            .saturating_add(u64::from(ttl.subsec_nanos() > 0));
        if age_secs > ttl_secs.saturating_add(1) {
            // Like the future case: only a token that authenticates is "expired", so that
            // nobody on the path can turn an altered timestamp into a refusal.
            self.fernet
                .open_with(token, |_| ())
                .map_err(|_| CryptoError::Tampered)?;
            return Err(CryptoError::Expired { age_secs, ttl_secs });
        }
        self.fernet
            .open_with(token, |plain| {
                let payload: PayloadRef<'_> =
                    postcard::from_bytes(plain).map_err(|_| CryptoError::BadPayload)?;
                if payload.from != expected_from || payload.to != expected_to {
                    return Err(CryptoError::Misrouted {
                        from: payload.from.to_owned(),
                        to: payload.to.to_owned(),
                        expected_from: expected_from.to_owned(),
                        expected_to: expected_to.to_owned(),
                    });
                }
                Ok(Opened {
                    id: payload.id,
                    sent_at_ms: payload.sent_at_ms,
                    seq: payload.seq,
                    body: payload.body.to_owned(),
                })
            })
            .map_err(|_| CryptoError::Tampered)?
    }

    /// The MAC that authenticates an acknowledgement of `ids` sent by `acker`.
    pub fn ack_tag(&self, acker: &str, ids: &[MessageId]) -> [u8; 32] {
        self.ack_mac(acker, ids).finalize().into_bytes().into()
    }

    /// Checks an acknowledgement tag in constant time.
    pub fn verify_ack(&self, acker: &str, ids: &[MessageId], tag: &[u8; 32]) -> bool {
        self.ack_mac(acker, ids).verify_slice(tag).is_ok()
    }

    /// The MAC that authenticates `refuser`'s refusal of message `id` for the reason `detail`.
    pub fn reject_tag(&self, refuser: &str, id: MessageId, detail: &str) -> [u8; 32] {
        self.reject_mac(refuser, id, detail)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks a refusal's tag in constant time.
    pub fn verify_reject(
        &self,
        refuser: &str,
        id: MessageId,
        detail: &str,
        tag: &[u8; 32],
    ) -> bool {
        self.reject_mac(refuser, id, detail)
            .verify_slice(tag)
            .is_ok()
    }

    fn ack_mac(&self, acker: &str, ids: &[MessageId]) -> hmac::Hmac<Sha256> {
        let mut mac = self.control_mac(b"p2pchat/1 ack", acker);
        for id in ids {
            mac.update(id.as_bytes());
        }
        mac
    }

    fn reject_mac(&self, refuser: &str, id: MessageId, detail: &str) -> hmac::Hmac<Sha256> {
        let mut mac = self.control_mac(b"p2pchat/1 reject", refuser);
        mac.update(id.as_bytes());
        mac.update(detail.as_bytes());
        mac
    }

    /// A MAC under the control key, started with the frame kind and the sender's name (length
    /// first, so names and what follows cannot be shifted into each other).
    fn control_mac(&self, kind: &[u8], sender: &str) -> hmac::Hmac<Sha256> {
        let mut mac = self.control.clone();
        mac.update(kind);
        mac.update(&(sender.len() as u64).to_be_bytes());
        mac.update(sender.as_bytes());
        mac
    }
}

/// Checks what a store can check of a token without any key, as the discovery server does
/// at deposit: that it is shaped like a Fernet token (base64url, version `0x80`, at least one
/// AES block, the tag: [`CryptoError::Malformed`] otherwise), that its clear-text timestamp
/// is at most `max_ahead` ahead of `now` ([`CryptoError::FromTheFuture`]; offline mail uses
/// `store::MAX_TOKEN_AHEAD`, as recipients keep such mail) and at most `max_age` behind it
/// ([`CryptoError::Expired`]). Returns the timestamp.
///
/// Nothing is authenticated: a token that passes may still be junk under every key. What
/// this buys is that a store keeps only what could be a message, no older than a message may
/// be.
pub fn check_token_shape(
    token: &str,
    now: SystemTime,
    max_age: Duration,
    max_ahead: Duration,
) -> Result<SystemTime, CryptoError> {
    let stamped = fernet::shape(token).ok_or(CryptoError::Malformed)?;
    let now_secs = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    if stamped > now_secs.saturating_add(max_ahead.as_secs()) {
        return Err(CryptoError::FromTheFuture {
            ahead_secs: stamped - now_secs,
        });
    }
    let age_secs = now_secs.saturating_sub(stamped);
    // One second more, for the truncation of token timestamps (as `open` allows).
    if age_secs > max_age.as_secs().saturating_add(1) {
        return Err(CryptoError::Expired {
            age_secs,
            ttl_secs: max_age.as_secs(),
        });
    }
    Ok(UNIX_EPOCH + Duration::from_secs(stamped))
}

fn unix_secs_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(3600);

    #[test]
    fn the_shape_check_takes_tokens_and_refuses_junk_without_a_key() {
        let (alice, bob) = (Identity::generate(), Identity::generate());
        let key = PairKey::derive(&alice, &bob.public_key()).unwrap();
        let at = SystemTime::now();
        let token = key.seal(&payload("alice", "bob"));
        let stamped = check_token_shape(&token, at, TTL, MAX_CLOCK_SKEW).unwrap();
        assert!(at.duration_since(stamped).unwrap() < Duration::from_secs(2));
        assert!(check_token_shape(token.trim_end_matches('='), at, TTL, MAX_CLOCK_SKEW).is_ok());
        for junk in [
            String::new(),
            "token-1".to_owned(),
            "x".repeat(300),
            // The header alone, or the header and tag without a block.
            token[..40].to_owned(),
            token.replacen('g', "h", 1),
            format!("{}*", &token[..token.len() - 1]),
        ] {
            assert_eq!(
                check_token_shape(&junk, at, TTL, MAX_CLOCK_SKEW),
                Err(CryptoError::Malformed),
                "{junk:?}"
            );
        }
        let old = key.seal_at(&payload("alice", "bob"), now() - 7200);
        assert!(matches!(
            check_token_shape(&old, at, TTL, MAX_CLOCK_SKEW),
            Err(CryptoError::Expired { .. })
        ));
        let ahead = key.seal_at(&payload("alice", "bob"), now() + 600);
        assert!(matches!(
            check_token_shape(&ahead, at, TTL, MAX_CLOCK_SKEW),
            Err(CryptoError::FromTheFuture { .. })
        ));
    }

    fn payload(from: &str, to: &str) -> Payload {
        Payload {
            id: MessageId::random(),
            from: from.into(),
            to: to.into(),
            sent_at_ms: 1,
            seq: 1,
            body: "hello there".into(),
        }
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn both_ends_derive_the_same_key() {
        let (a, b) = (Identity::generate(), Identity::generate());
        let ab = PairKey::derive(&a, &b.public_key()).unwrap();
        let ba = PairKey::derive(&b, &a.public_key()).unwrap();
        let p = payload("alice", "bob");
        let token = ab.seal(&p);
        assert_eq!(ba.open(&token, "alice", "bob", TTL).unwrap(), p);
    }

    #[test]
    fn a_third_identity_cannot_open_the_pairs_tokens() {
        let (a, b, c) = (
            Identity::generate(),
            Identity::generate(),
            Identity::generate(),
        );
        let token = PairKey::derive(&a, &b.public_key())
            .unwrap()
            .seal(&payload("alice", "bob"));
        let ca = PairKey::derive(&c, &a.public_key()).unwrap();
        assert_eq!(
            ca.open(&token, "alice", "bob", TTL),
            Err(CryptoError::Tampered)
        );
    }

    #[test]
    fn tampered_token_is_rejected() {
        let (a, b) = (Identity::generate(), Identity::generate());
        let key = PairKey::derive(&a, &b.public_key()).unwrap();
        let token = key.seal(&payload("alice", "bob"));
        let mut bytes = token.into_bytes();
        let i = bytes.len() / 2;
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        assert_eq!(
            key.open(&tampered, "alice", "bob", TTL),
            Err(CryptoError::Tampered)
        );
        assert_eq!(
            key.open("garbage", "alice", "bob", TTL),
            Err(CryptoError::Malformed)
        );
    }

    #[test]
    fn reflected_and_rerouted_tokens_are_rejected() {
        let (a, b) = (Identity::generate(), Identity::generate());
        let key = PairKey::derive(&a, &b.public_key()).unwrap();
        let token = key.seal(&payload("alice", "bob"));
        // Reflected: bob's token sent back to alice, who expects bob → alice.
        let err = key.open(&token, "bob", "alice", TTL).unwrap_err();
        assert!(matches!(err, CryptoError::Misrouted { .. }), "{err}");
        let err = key.open(&token, "alice", "carol", TTL).unwrap_err();
        assert!(matches!(err, CryptoError::Misrouted { .. }), "{err}");
    }

    #[test]
    fn expired_and_future_tokens_get_clear_errors() {
        let (a, b) = (Identity::generate(), Identity::generate());
        let key = PairKey::derive(&a, &b.public_key()).unwrap();
        let p = payload("alice", "bob");
        let old = key.seal_at(&p, now() - 7200);
        assert!(matches!(
            key.open(&old, "alice", "bob", TTL),
            Err(CryptoError::Expired { ttl_secs: 3600, .. })
        ));
        let ahead = key.seal_at(&p, now() + 600);
        let err = key.open(&ahead, "alice", "bob", TTL).unwrap_err();
        assert!(matches!(err, CryptoError::FromTheFuture { .. }));
        // A future timestamp on a token the key did not seal is tampering, not a clock issue.
        let other = PairKey::derive(&a, &Identity::generate().public_key()).unwrap();
        let forged = other.seal_at(&p, now() + 600);
        assert!(matches!(
            key.open(&forged, "alice", "bob", TTL),
            Err(CryptoError::Tampered)
        ));
        assert!(err.to_string().contains("clock"), "{err}");
        // Within the 60 s allowance is fine.
        let slightly_ahead = key.seal_at(&p, now() + 30);
        assert_eq!(key.open(&slightly_ahead, "alice", "bob", TTL).unwrap(), p);
    }

    #[test]
    fn a_sub_second_ttl_still_accepts_a_token_stamped_in_the_previous_second() {
        // Stamps are truncated to whole seconds: a token sealed a moment ago can carry the
        // previous second. (Found by a node with a 300 ms TTL refusing fresh messages.)
        let (a, b) = (Identity::generate(), Identity::generate());
        let key = PairKey::derive(&a, &b.public_key()).unwrap();
        let p = payload("alice", "bob");
        let token = key.seal_at(&p, now() - 1);
        let short = Duration::from_millis(300);
        assert_eq!(key.open(&token, "alice", "bob", short).unwrap(), p);
        let old = key.seal_at(&p, now() - 3);
        assert!(matches!(
            key.open(&old, "alice", "bob", short),
            Err(CryptoError::Expired { ttl_secs: 1, .. })
        ));
    }

    #[test]
    fn ack_tags_bind_the_acker_and_ids() {
        let (a, b) = (Identity::generate(), Identity::generate());
        let key = PairKey::derive(&a, &b.public_key()).unwrap();
        let ids = [MessageId::random(), MessageId::random()];
        let tag = key.ack_tag("bob", &ids);
        assert!(key.verify_ack("bob", &ids, &tag));
        assert!(!key.verify_ack("alice", &ids, &tag));
        assert!(!key.verify_ack("bob", &ids[..1], &tag));
    }

    #[test]
    fn reject_tags_bind_the_refuser_id_and_reason() {
        let (a, b) = (Identity::generate(), Identity::generate());
        let key = PairKey::derive(&a, &b.public_key()).unwrap();
        let id = MessageId::random();
        let tag = key.reject_tag("bob", id, "expired");
        assert!(key.verify_reject("bob", id, "expired", &tag));
        assert!(!key.verify_reject("alice", id, "expired", &tag));
        assert!(!key.verify_reject("bob", MessageId::random(), "expired", &tag));
        assert!(!key.verify_reject("bob", id, "expired!", &tag));
        let other = PairKey::derive(&a, &Identity::generate().public_key()).unwrap();
        assert!(!other.verify_reject("bob", id, "expired", &tag));
    }
}
