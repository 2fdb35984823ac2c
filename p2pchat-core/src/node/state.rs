//! What a node remembers about other users across restarts: block and mute lists, pinned
//! keys, the operator pin and the announcement ids already shown. Kept as one
//! [`PeersRecord`] in the node database ([`Db`]), written on every change.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::db::DbError;
use super::db::{Batch, Db, Table};
use super::records::{self, PEERS_KEY, PeersRecord};
use crate::announce::{Announcement, AnnouncementError, AnnouncementGuard};
use crate::error::chain;
use crate::identity::PublicKey;

/// Longest mute; longer ones are cut to this. Default: 100 years.
pub const MAX_MUTE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The persisted part of [`PeerState`], in memory.
#[derive(Debug, Default)]
struct PeersFile {
    blocked: BTreeSet<String>,
    /// Username → end of the mute, in milliseconds since the Unix epoch.
    muted: BTreeMap<String, u64>,
    pins: BTreeMap<String, PublicKey>,
    /// The directory operator's announcement key, pinned on first sight.
    operator: Option<PublicKey>,
    /// Announcement ids shown recently (id → issued-at ms), so replays are dropped across
    /// restarts too.
    announcements: BTreeMap<String, u64>,
    /// The users written to or accepted: whom contacts-only mode lets through.
    contacts: BTreeSet<String>,
}

impl PeersFile {
    fn from_parts(
        blocked: BTreeSet<String>,
        muted: BTreeMap<String, u64>,
        pins: BTreeMap<String, [u8; 32]>,
        operator: Option<[u8; 32]>,
        announcements: BTreeMap<String, u64>,
        contacts: BTreeSet<String>,
    ) -> Self {
        Self {
            blocked,
            muted,
            pins: pins
                .into_iter()
                .filter_map(|(user, key)| Some((user, PublicKey::from_bytes(&key).ok()?)))
                .collect(),
            operator: operator.and_then(|key| PublicKey::from_bytes(&key).ok()),
            announcements,
            contacts,
        }
    }
}

/// Block list, mutes and pinned keys.
#[derive(Debug)]
pub(crate) struct PeerState {
    db: Arc<Db>,
    file: PeersFile,
    /// Mute deadlines on tokio's clock (so paused-clock tests control them).
    mute_until: HashMap<String, Instant>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
        .try_into()
        .unwrap_or(u64::MAX)
}

impl PeerState {
    /// The state as the database holds it (`record`: the bytes under [`PEERS_KEY`]).
    pub(crate) fn load(db: Arc<Db>, record: Option<&[u8]>) -> Result<Self, DbError> {
        let record = match record {
            Some(bytes) => records::decode::<PeersRecord>(bytes).ok_or(DbError::Unreadable {
                what: "a peers record",
            })?,
            None => PeersRecord::Empty,
        };
        let file = match record {
            PeersRecord::Empty => PeersFile::default(),
            PeersRecord::V1 {
                blocked,
                muted,
                pins,
                operator,
                announcements,
            } => {
                // Written before contacts existed: everyone with a pinned key has talked
                // with this node, and was let through then.
                let contacts = pins.keys().cloned().collect();
                PeersFile::from_parts(blocked, muted, pins, operator, announcements, contacts)
            }
            PeersRecord::V2 {
                blocked,
                muted,
                pins,
                operator,
                announcements,
                contacts,
            } => PeersFile::from_parts(blocked, muted, pins, operator, announcements, contacts),
        };
        let now_wall = unix_ms(SystemTime::now());
        let now = Instant::now();
        let mute_until = file
            .muted
            .iter()
            .filter(|&(_, &until)| until > now_wall)
            .map(|(name, &until)| (name.clone(), now + Duration::from_millis(until - now_wall)))
            .collect();
        Ok(Self {
            db,
            file,
            mute_until,
        })
    }

    fn save(&self) -> Result<(), DbError> {
        let record = PeersRecord::V2 {
            contacts: self.file.contacts.clone(),
            blocked: self.file.blocked.clone(),
            muted: self.file.muted.clone(),
            pins: self
                .file
                .pins
                .iter()
                .map(|(user, key)| (user.clone(), key.to_bytes()))
                .collect(),
            operator: self.file.operator.map(|key| key.to_bytes()),
            announcements: self.file.announcements.clone(),
        };
        let mut batch = Batch::new();
        batch.put(Table::Meta, PEERS_KEY, &records::encode(&record));
        self.db.write(&batch)?;
        Ok(())
    }

    pub(crate) fn is_blocked(&self, user: &str) -> bool {
        self.file.blocked.contains(user)
    }

    /// Whether `user` was written to or accepted.
    pub(crate) fn is_contact(&self, user: &str) -> bool {
        self.file.contacts.contains(user)
    }

    /// Makes `user` a contact (saved only when they were not one): whether they are new.
    pub(crate) fn add_contact(&mut self, user: &str) -> Result<bool, DbError> {
        let new = self.file.contacts.insert(user.to_owned());
        if new {
            self.save()?;
        }
        Ok(new)
    }

    /// The contacts, in name order.
    pub(crate) fn contacts(&self) -> Vec<String> {
        self.file.contacts.iter().cloned().collect()
    }

    /// The users muted now and how long each mute has left, in name order.
    pub(crate) fn muted(&self) -> Vec<(String, Duration)> {
        let now = Instant::now();
        let mut muted: Vec<(String, Duration)> = self
            .mute_until
            .iter()
            .filter(|&(_, &until)| until > now)
            .map(|(user, &until)| (user.clone(), until - now))
            .collect();
        muted.sort();
        muted
    }

    pub(crate) fn is_muted(&self, user: &str) -> bool {
        self.mute_until
            .get(user)
            .is_some_and(|&until| until > Instant::now())
    }

    pub(crate) fn set_blocked(&mut self, user: &str, blocked: bool) -> Result<(), DbError> {
        let changed = if blocked {
            self.file.blocked.insert(user.to_owned())
        } else {
            self.file.blocked.remove(user)
        };
        if changed { self.save() } else { Ok(()) }
    }

    pub(crate) fn mute(&mut self, user: &str, duration: Duration) -> Result<(), DbError> {
        // A mute "forever" saturates instead of overflowing the clocks.
        let duration = duration.min(MAX_MUTE);
        self.mute_until
            .insert(user.to_owned(), Instant::now() + duration);
        self.file
            .muted
            .insert(user.to_owned(), unix_ms(SystemTime::now() + duration));
        self.save()
    }

    pub(crate) fn unmute(&mut self, user: &str) -> Result<(), DbError> {
        self.mute_until.remove(user);
        if self.file.muted.remove(user).is_some() {
            self.save()
        } else {
            Ok(())
        }
    }

    pub(crate) fn blocked(&self) -> Vec<String> {
        self.file.blocked.iter().cloned().collect()
    }

    pub(crate) fn pin(&self, user: &str) -> Option<PublicKey> {
        self.file.pins.get(user).copied()
    }

    /// Pins the operator key on first sight. `Some(pinned)` when another key is pinned
    /// already (it stays pinned).
    pub(crate) fn pin_operator(&mut self, key: PublicKey) -> Result<Option<PublicKey>, DbError> {
        match self.file.operator {
            Some(pinned) if pinned == key => Ok(None),
            Some(pinned) => Ok(Some(pinned)),
            None => {
                self.file.operator = Some(key);
                self.save().map(|()| None)
            }
        }
    }

    /// Checks an announcement against the pinned operator key, freshness and the ids already
    /// shown; remembers it when admitted.
    pub(crate) fn admit_announcement(
        &mut self,
        announcement: &Announcement,
    ) -> Result<(), AnnouncementError> {
        let operator = self.file.operator.ok_or(AnnouncementError::BadSignature)?;
        let mut guard = AnnouncementGuard::with_seen(std::mem::take(&mut self.file.announcements));
        let admitted = guard.admit(announcement, &operator, SystemTime::now());
        self.file.announcements = guard.seen().map(|(id, at)| (id.clone(), *at)).collect();
        if admitted.is_ok()
            && let Err(e) = self.save()
        {
            // Worst case a replay after a restart is shown again.
            tracing::warn!(error = %chain(&e), "cannot record the announcement as seen");
        }
        admitted
    }

    pub(crate) fn set_pin(&mut self, user: &str, key: PublicKey) -> Result<(), DbError> {
        if self.file.pins.insert(user.to_owned(), key) != Some(key) {
            self.save()
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::db::Durability;

    #[test]
    fn a_mute_for_ever_saturates_instead_of_panicking() {
        let (db, _) = Db::open(None, Durability::Process).unwrap();
        let mut state = PeerState::load(db, None).unwrap();
        state.mute("carol", Duration::MAX).unwrap();
        assert!(state.is_muted("carol"));
    }

    #[test]
    fn block_mute_and_pins_persist() {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::Identity::generate().public_key();
        {
            let (db, _) = Db::open(Some(dir.path()), Durability::Process).unwrap();
            let mut state = PeerState::load(db.clone(), None).unwrap();
            state.set_blocked("mallory", true).unwrap();
            state.mute("carol", Duration::from_secs(3600)).unwrap();
            state.set_pin("bob", key).unwrap();
            db.close();
        }
        let (db, mut snapshot) = Db::open(Some(dir.path()), Durability::Process).unwrap();
        let record = snapshot.take(Table::Meta).remove(PEERS_KEY);
        let state = PeerState::load(db, record.as_deref()).unwrap();
        assert!(state.is_blocked("mallory"));
        assert!(state.is_muted("carol"));
        assert!(!state.is_muted("bob"));
        assert_eq!(state.pin("bob"), Some(key));
    }
}
