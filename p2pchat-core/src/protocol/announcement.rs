//! The announcement document, as it travels in session frames and (as JSON) on the Redis
//! channel. Signing, checking and the guard against replays are [`crate::announce`]'s.

use serde::{Deserialize, Serialize};

/// A signed operator announcement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// 128 random bits, hex: what replays are recognised by.
    pub id: String,
    /// When the operator signed it, in milliseconds since the Unix epoch.
    pub issued_at_ms: u64,
    /// The text to show.
    pub text: String,
    /// Ed25519 signature by the operator key over [`Announcement::transcript`], hex.
    pub signature: String,
}
