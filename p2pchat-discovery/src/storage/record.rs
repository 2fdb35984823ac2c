//! The server's redb mail records: versioned types of their own, apart from the API's
//! [`StoredMessage`] and [`ExpiredMessage`], so that a field added to an API type cannot
//! change what is on disk.
//!
//! Version 1 is the layout every server has written so far (postcard, fields in this order),
//! so existing databases read as they are. A new layout gets a new type and a new table
//! (`mail_v2`, …), migrated when the database is opened; the golden-bytes tests below make
//! any change to these encodings a visible diff.

use std::time::SystemTime;

use p2pchat_core::MessageId;
use p2pchat_core::store::{ExpiredMessage, StoredMessage};
use serde::{Deserialize, Serialize};

/// A waiting message in the `mail` table, version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct MailRecordV1 {
    pub(super) id: MessageId,
    pub(super) from: String,
    pub(super) to: String,
    pub(super) token: String,
    pub(super) expires_at: SystemTime,
}

/// A sender's expiry notice in the `mail_expired` table, version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ExpiredRecordV1 {
    pub(super) id: MessageId,
    pub(super) to: String,
}

impl MailRecordV1 {
    pub(super) fn encode(message: &StoredMessage) -> Vec<u8> {
        #[derive(Serialize)]
        struct Borrowed<'a> {
            id: MessageId,
            from: &'a str,
            to: &'a str,
            token: &'a str,
            expires_at: SystemTime,
        }
        // Serializing strings, an id and a time into a Vec cannot fail.
        postcard::to_stdvec(&Borrowed {
            id: message.id,
            from: &message.from,
            to: &message.to,
            token: &message.token,
            expires_at: message.expires_at,
        })
        .unwrap_or_default()
    }

    pub(super) fn decode(bytes: &[u8]) -> Option<StoredMessage> {
        let r: Self = postcard::from_bytes(bytes).ok()?;
        Some(StoredMessage {
            id: r.id,
            from: r.from,
            to: r.to,
            token: r.token,
            expires_at: r.expires_at,
        })
    }
}

impl ExpiredRecordV1 {
    pub(super) fn encode(notice: &ExpiredMessage) -> Vec<u8> {
        postcard::to_stdvec(&(notice.id, notice.to.as_str())).unwrap_or_default()
    }

    pub(super) fn decode(bytes: &[u8]) -> Option<ExpiredMessage> {
        let r: Self = postcard::from_bytes(bytes).ok()?;
        Some(ExpiredMessage { id: r.id, to: r.to })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn id() -> MessageId {
        MessageId::from_bytes([0xab; 16])
    }

    #[test]
    fn a_mail_record_v1_has_these_bytes() {
        let message = StoredMessage {
            id: id(),
            from: "alice".into(),
            to: "bob".into(),
            token: "gAAA".into(),
            expires_at: UNIX_EPOCH + Duration::new(1_700_000_000, 5),
        };
        let bytes = MailRecordV1::encode(&message);
        assert_eq!(
            hex::encode(&bytes),
            "abababababababababababababababab05616c69636503626f62046741414180e2cfaa0605"
        );
        assert_eq!(MailRecordV1::decode(&bytes), Some(message));
    }

    #[test]
    fn an_expired_record_v1_has_these_bytes() {
        let notice = ExpiredMessage {
            id: id(),
            to: "bob".into(),
        };
        let bytes = ExpiredRecordV1::encode(&notice);
        assert_eq!(
            hex::encode(&bytes),
            "abababababababababababababababab03626f62"
        );
        assert_eq!(ExpiredRecordV1::decode(&bytes), Some(notice));
    }

    #[test]
    fn a_truncated_record_is_not_read() {
        let bytes = ExpiredRecordV1::encode(&ExpiredMessage {
            id: id(),
            to: "bob".into(),
        });
        assert_eq!(ExpiredRecordV1::decode(&bytes[..10]), None);
    }
}
