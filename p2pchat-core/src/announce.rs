//! Operator announcements: short texts broadcast to every online node, signed by the
//! discovery server's operator key.
//!
//! A node learns the operator key when it registers and pins it (trust on first use, like
//! peer keys). It shows an announcement only if the pinned key signed it, it is fresh
//! ([`ANNOUNCEMENT_MAX_AGE`]), and its id was not seen before: unsigned, forged and replayed
//! announcements are dropped. The same announcement may arrive twice (relayed by the server
//! and on a Redis channel); it is shown once.
//!
//! On the wire and on the Redis channel (default `special`) an announcement is JSON:
//!
//! ```text
//! {"id":"<32 hex>","issued_at_ms":1764000000000,"text":"maintenance at noon","signature":"<128 hex>"}
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::crypto::MAX_CLOCK_SKEW;
use crate::identity::{Identity, PublicKey};

/// Longest announcement text, in bytes of UTF-8. Default: 4 KiB.
pub const MAX_ANNOUNCEMENT_LEN: usize = 4096;

/// Announcements older than this are dropped, so a recorded one cannot be replayed later;
/// ids seen within it are remembered. Default: 10 minutes.
pub const ANNOUNCEMENT_MAX_AGE: Duration = Duration::from_secs(600);

pub use crate::protocol::announcement::Announcement;

/// Why an announcement was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AnnouncementError {
    /// Not an announcement at all (bad JSON, bad hex).
    #[error("malformed announcement")]
    Malformed,
    /// Longer than [`MAX_ANNOUNCEMENT_LEN`].
    #[error("announcement longer than {MAX_ANNOUNCEMENT_LEN} bytes")]
    TooLong,
    /// Not signed by the pinned operator key.
    #[error("announcement not signed by the operator key")]
    BadSignature,
    /// Older than [`ANNOUNCEMENT_MAX_AGE`], or from the future beyond the allowed skew.
    #[error("announcement too old or from the future (check the clocks)")]
    Stale,
    /// Already shown.
    #[error("announcement already seen")]
    Replayed,
    /// Nothing to say: empty, or only blanks.
    #[error("an announcement needs some text")]
    Empty,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
        .try_into()
        .unwrap_or(u64::MAX)
}

impl Announcement {
    /// Signs `text` with the operator's key, now.
    pub fn sign(operator: &Identity, text: &str) -> Result<Self, AnnouncementError> {
        if text.len() > MAX_ANNOUNCEMENT_LEN {
            return Err(AnnouncementError::TooLong);
        }
        if text.trim().is_empty() {
            return Err(AnnouncementError::Empty);
        }
        let mut announcement = Self {
            id: hex::encode(rand::random::<[u8; 16]>()),
            issued_at_ms: unix_ms(SystemTime::now()),
            text: text.to_owned(),
            signature: String::new(),
        };
        announcement.signature = hex::encode(operator.sign(&announcement.transcript()));
        Ok(announcement)
    }

    /// The signed bytes: a label, the id, the time and the text.
    pub fn transcript(&self) -> Vec<u8> {
        let mut out = b"p2pchat/1 announcement\0".to_vec();
        out.extend_from_slice(self.id.as_bytes());
        out.push(0);
        out.extend_from_slice(&self.issued_at_ms.to_be_bytes());
        out.extend_from_slice(self.text.as_bytes());
        out
    }

    /// Checks the signature against `operator` (freshness and replays are the receiver's
    /// business: see [`AnnouncementGuard`]).
    pub fn verify(&self, operator: &PublicKey) -> Result<(), AnnouncementError> {
        if self.text.len() > MAX_ANNOUNCEMENT_LEN {
            return Err(AnnouncementError::TooLong);
        }
        if self.text.trim().is_empty() {
            return Err(AnnouncementError::Empty);
        }
        let mut id = [0u8; 16];
        let mut signature = [0u8; 64];
        hex::decode_to_slice(&self.id, &mut id).map_err(|_| AnnouncementError::Malformed)?;
        hex::decode_to_slice(&self.signature, &mut signature)
            .map_err(|_| AnnouncementError::Malformed)?;
        if operator.verify(&self.transcript(), &signature) {
            Ok(())
        } else {
            Err(AnnouncementError::BadSignature)
        }
    }

    /// The JSON form (as published on the Redis channel).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an announcement always serializes")
    }

    /// Parses the JSON form.
    pub fn from_json(json: &str) -> Result<Self, AnnouncementError> {
        if json.len() > 4 * MAX_ANNOUNCEMENT_LEN {
            return Err(AnnouncementError::TooLong);
        }
        serde_json::from_str(json).map_err(|_| AnnouncementError::Malformed)
    }
}

/// Decides which announcements to show: signed by the pinned key, fresh, not seen before.
#[derive(Debug, Default, Clone)]
pub struct AnnouncementGuard {
    /// Ids seen within the freshness window, with their issue times.
    seen: std::collections::BTreeMap<String, u64>,
}

impl AnnouncementGuard {
    /// A guard that remembers `seen` (id → issued-at ms), e.g. loaded from disk.
    pub fn with_seen(seen: impl IntoIterator<Item = (String, u64)>) -> Self {
        Self {
            seen: seen.into_iter().collect(),
        }
    }

    /// The ids remembered now, to persist.
    pub fn seen(&self) -> impl Iterator<Item = (&String, &u64)> {
        self.seen.iter()
    }

    /// Accepts `announcement` (and remembers it) or says why not.
    pub fn admit(
        &mut self,
        announcement: &Announcement,
        operator: &PublicKey,
        now: SystemTime,
    ) -> Result<(), AnnouncementError> {
        announcement.verify(operator)?;
        let now_ms = unix_ms(now);
        let max_age = ANNOUNCEMENT_MAX_AGE.as_millis() as u64;
        let skew = MAX_CLOCK_SKEW.as_millis() as u64;
        self.seen
            .retain(|_, issued| now_ms.saturating_sub(*issued) <= max_age);
        let issued = announcement.issued_at_ms;
        if now_ms.saturating_sub(issued) > max_age || issued > now_ms.saturating_add(skew) {
            return Err(AnnouncementError::Stale);
        }
        if self.seen.insert(announcement.id.clone(), issued).is_some() {
            return Err(AnnouncementError::Replayed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_announcement_is_admitted_once() {
        let operator = Identity::generate();
        let a = Announcement::sign(&operator, "maintenance at noon").unwrap();
        let json = a.to_json();
        let parsed = Announcement::from_json(&json).unwrap();
        let mut guard = AnnouncementGuard::default();
        let now = SystemTime::now();
        guard.admit(&parsed, &operator.public_key(), now).unwrap();
        assert_eq!(
            guard.admit(&parsed, &operator.public_key(), now),
            Err(AnnouncementError::Replayed)
        );
    }

    #[test]
    fn a_blank_announcement_is_neither_signed_nor_shown() {
        let operator = Identity::generate();
        for blank in ["", "   ", "\n\t"] {
            assert_eq!(
                Announcement::sign(&operator, blank),
                Err(AnnouncementError::Empty)
            );
        }
        // One an older tool signed is dropped by whoever checks it.
        let mut blank = Announcement::sign(&operator, "x").unwrap();
        blank.text = " ".into();
        blank.signature = hex::encode(operator.sign(&blank.transcript()));
        assert_eq!(
            blank.verify(&operator.public_key()),
            Err(AnnouncementError::Empty)
        );
    }

    #[test]
    fn forged_tampered_stale_and_malformed_announcements_are_refused() {
        let operator = Identity::generate();
        let key = operator.public_key();
        let now = SystemTime::now();
        let mut guard = AnnouncementGuard::default();
        let forged = Announcement::sign(&Identity::generate(), "free coins").unwrap();
        assert_eq!(
            guard.admit(&forged, &key, now),
            Err(AnnouncementError::BadSignature)
        );
        let mut tampered = Announcement::sign(&operator, "maintenance at noon").unwrap();
        tampered.text = "maintenance at midnight".into();
        assert_eq!(
            guard.admit(&tampered, &key, now),
            Err(AnnouncementError::BadSignature)
        );
        let old = Announcement::sign(&operator, "old news").unwrap();
        assert_eq!(
            guard.admit(
                &old,
                &key,
                now + ANNOUNCEMENT_MAX_AGE + Duration::from_secs(1)
            ),
            Err(AnnouncementError::Stale)
        );
        let mut unsigned = Announcement::sign(&operator, "x").unwrap();
        unsigned.signature.clear();
        assert_eq!(
            guard.admit(&unsigned, &key, now),
            Err(AnnouncementError::Malformed)
        );
        assert_eq!(
            Announcement::from_json("{\"text\":\"hi\"}"),
            Err(AnnouncementError::Malformed)
        );
        assert_eq!(
            Announcement::sign(&operator, &"x".repeat(MAX_ANNOUNCEMENT_LEN + 1)),
            Err(AnnouncementError::TooLong)
        );
    }
}
