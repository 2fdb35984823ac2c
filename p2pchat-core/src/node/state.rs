//! What a node remembers across restarts: block and mute lists, pinned keys (`peers.json`),
//! and the ids of messages already shown (`seen.log`), all in the node's data directory.
//! Without a data directory the same state lives in memory only.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::NodeError;
use crate::announce::{Announcement, AnnouncementError, AnnouncementGuard};
use crate::identity::PublicKey;
use crate::protocol::MessageId;

/// How many recently shown message ids a node remembers to drop duplicates: bounded memory
/// (about 3 MiB) and a bounded log file. Default: 65,536.
pub const DEDUP_WINDOW: usize = 65_536;

/// Longest mute; longer ones are cut to this. Default: 100 years.
pub const MAX_MUTE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

const PEERS_FILE: &str = "peers.json";
const SEEN_FILE: &str = "seen.log";
const SEEN_RECORD_LEN: usize = 24;

/// The persisted part of [`PeerState`].
#[derive(Debug, Default, Serialize, Deserialize)]
struct PeersFile {
    #[serde(default)]
    blocked: BTreeSet<String>,
    /// Username → end of the mute, in milliseconds since the Unix epoch.
    #[serde(default)]
    muted: BTreeMap<String, u64>,
    #[serde(default)]
    pins: BTreeMap<String, PublicKey>,
    /// The directory operator's announcement key, pinned on first sight.
    #[serde(default)]
    operator: Option<PublicKey>,
    /// Announcement ids shown recently (id → issued-at ms), so replays are dropped across
    /// restarts too.
    #[serde(default)]
    announcements: BTreeMap<String, u64>,
}

/// Block list, mutes and pinned keys.
#[derive(Debug)]
pub(crate) struct PeerState {
    path: Option<PathBuf>,
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

fn state_error(path: &Path, source: std::io::Error) -> NodeError {
    NodeError::State {
        path: path.display().to_string(),
        source,
    }
}

impl PeerState {
    pub(crate) fn load(dir: Option<&Path>) -> Result<Self, NodeError> {
        let path = dir.map(|d| d.join(PEERS_FILE));
        let file = match &path {
            Some(path) => match std::fs::read(path) {
                Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                    state_error(
                        path,
                        std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                    )
                })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => PeersFile::default(),
                Err(e) => return Err(state_error(path, e)),
            },
            None => PeersFile::default(),
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
            path,
            file,
            mute_until,
        })
    }

    fn save(&self) -> Result<(), NodeError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let json = serde_json::to_vec_pretty(&self.file)
            .map_err(|e| state_error(path, std::io::Error::other(e)))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, json).map_err(|e| state_error(path, e))?;
        std::fs::rename(&tmp, path).map_err(|e| state_error(path, e))
    }

    pub(crate) fn is_blocked(&self, user: &str) -> bool {
        self.file.blocked.contains(user)
    }

    pub(crate) fn is_muted(&self, user: &str) -> bool {
        self.mute_until
            .get(user)
            .is_some_and(|&until| until > Instant::now())
    }

    pub(crate) fn set_blocked(&mut self, user: &str, blocked: bool) -> Result<(), NodeError> {
        let changed = if blocked {
            self.file.blocked.insert(user.to_owned())
        } else {
            self.file.blocked.remove(user)
        };
        if changed { self.save() } else { Ok(()) }
    }

    pub(crate) fn mute(&mut self, user: &str, duration: Duration) -> Result<(), NodeError> {
        // A mute "forever" saturates instead of overflowing the clocks.
        let duration = duration.min(MAX_MUTE);
        self.mute_until
            .insert(user.to_owned(), Instant::now() + duration);
        self.file
            .muted
            .insert(user.to_owned(), unix_ms(SystemTime::now() + duration));
        self.save()
    }

    pub(crate) fn unmute(&mut self, user: &str) -> Result<(), NodeError> {
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
    pub(crate) fn pin_operator(&mut self, key: PublicKey) -> Result<Option<PublicKey>, NodeError> {
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
            tracing::warn!(error = %e, "cannot record the announcement as seen");
        }
        admitted
    }

    pub(crate) fn set_pin(&mut self, user: &str, key: PublicKey) -> Result<(), NodeError> {
        if self.file.pins.insert(user.to_owned(), key) != Some(key) {
            self.save()
        } else {
            Ok(())
        }
    }
}

/// Ids of messages already shown, per sender: a bounded window, appended to `seen.log`.
#[derive(Debug)]
pub(crate) struct Seen {
    set: HashSet<(u64, MessageId)>,
    order: VecDeque<(u64, MessageId)>,
    log: Option<(PathBuf, std::fs::File)>,
    logged: usize,
    /// Inserted in memory and not yet committed: a compaction leaves them out of the log.
    uncommitted: HashSet<(u64, MessageId)>,
    /// Committed records not yet written (a failed write leaves them for the next commit).
    unwritten: Vec<u8>,
}

/// A stable 64-bit key for a sender's name (FNV-1a): it is written to `seen.log`, so it must
/// not change between builds the way `std`'s `DefaultHasher` may.
fn sender_key(from: &str) -> u64 {
    from.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Seen {
    pub(crate) fn load(dir: Option<&Path>) -> Result<Self, NodeError> {
        let mut seen = Self {
            set: HashSet::new(),
            order: VecDeque::new(),
            log: None,
            logged: 0,
            uncommitted: HashSet::new(),
            unwritten: Vec::new(),
        };
        let Some(dir) = dir else { return Ok(seen) };
        let path = dir.join(SEEN_FILE);
        let mut bytes = Vec::new();
        match std::fs::File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes)
                    .map_err(|e| state_error(&path, e))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(state_error(&path, e)),
        }
        // A torn last record (a crash mid-write) is ignored.
        for record in bytes.chunks_exact(SEEN_RECORD_LEN) {
            let key = u64::from_be_bytes(record[..8].try_into().expect("8 bytes"));
            let id = MessageId::from_bytes(record[8..].try_into().expect("16 bytes"));
            seen.remember(key, id);
        }
        seen.compact(&path)?;
        Ok(seen)
    }

    fn remember(&mut self, key: u64, id: MessageId) -> bool {
        if !self.set.insert((key, id)) {
            return false;
        }
        self.order.push_back((key, id));
        if self.order.len() > DEDUP_WINDOW
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
            self.uncommitted.remove(&old);
        }
        true
    }

    /// Rewrites the log with just the window (less what no batch has committed yet) and
    /// reopens it for appending.
    fn compact(&mut self, path: &Path) -> Result<(), NodeError> {
        let tmp = path.with_extension("log.tmp");
        let mut buf = Vec::with_capacity(self.order.len() * SEEN_RECORD_LEN);
        let mut records = 0;
        for record @ (key, id) in &self.order {
            if self.uncommitted.contains(record) {
                continue;
            }
            buf.extend_from_slice(&key.to_be_bytes());
            buf.extend_from_slice(id.as_bytes());
            records += 1;
        }
        std::fs::write(&tmp, &buf).map_err(|e| state_error(path, e))?;
        std::fs::rename(&tmp, path).map_err(|e| state_error(path, e))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| state_error(path, e))?;
        self.logged = records;
        self.unwritten.clear();
        self.log = Some((path.to_owned(), file));
        Ok(())
    }

    /// Whether `id` from `from` was already recorded.
    pub(crate) fn contains(&self, from: &str, id: MessageId) -> bool {
        self.set.contains(&(sender_key(from), id))
    }

    /// Records `id` from `from` in memory; `false` if it was already seen. Nothing is
    /// written: the caller commits the ids of its batch when it is about to show them.
    pub(crate) fn insert(&mut self, from: &str, id: MessageId) -> bool {
        let key = sender_key(from);
        let new = self.remember(key, id);
        if new && self.log.is_some() {
            self.uncommitted.insert((key, id));
        }
        new
    }

    /// Appends `records` (ids this caller inserted and is about to show or hide), after any a
    /// failed write left, to the log in one write. Only the caller's own ids: another batch's ids, recorded but not yet
    /// shown, must not reach the log before they are, or a crash in between would drop them
    /// as duplicates when they come again. The page cache is enough: the log has to survive
    /// a process crash, not a power cut.
    pub(crate) fn commit<'a>(
        &mut self,
        records: impl IntoIterator<Item = (&'a str, MessageId)>,
    ) -> Result<(), NodeError> {
        let Some((path, file)) = &mut self.log else {
            return Ok(());
        };
        for (from, id) in records {
            let key = sender_key(from);
            self.uncommitted.remove(&(key, id));
            self.unwritten.extend_from_slice(&key.to_be_bytes());
            self.unwritten.extend_from_slice(id.as_bytes());
        }
        if self.unwritten.is_empty() {
            return Ok(());
        }
        if let Err(e) = file.write_all(&self.unwritten) {
            // Cut a partial record off so the log stays aligned; the records stay for the
            // next commit (or the compaction) to write.
            let _ = file.set_len((self.logged * SEEN_RECORD_LEN) as u64);
            return Err(state_error(path, e));
        }
        self.logged += self.unwritten.len() / SEEN_RECORD_LEN;
        self.unwritten.clear();
        if self.logged > 2 * DEDUP_WINDOW {
            let path = path.clone();
            self.compact(&path)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_ids_survive_a_restart_and_duplicates_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let id = MessageId::random();
        let mut seen = Seen::load(Some(dir.path())).unwrap();
        assert!(seen.insert("bob", id));
        assert!(!seen.insert("bob", id));
        assert!(seen.insert("carol", id), "ids are per sender");
        seen.commit([("bob", id), ("carol", id)]).unwrap();
        drop(seen);
        let mut seen = Seen::load(Some(dir.path())).unwrap();
        assert!(!seen.insert("bob", id));
    }

    #[test]
    fn a_compaction_leaves_out_what_no_batch_has_committed() {
        let dir = tempfile::tempdir().unwrap();
        let mut seen = Seen::load(Some(dir.path())).unwrap();
        // Other batches fill the log up to the point of compaction.
        let ids: Vec<MessageId> = (0..2 * DEDUP_WINDOW).map(|_| MessageId::random()).collect();
        for chunk in ids.chunks(4096) {
            for id in chunk {
                seen.insert("carol", *id);
            }
            seen.commit(chunk.iter().map(|id| ("carol", *id))).unwrap();
        }
        // A batch records an id and has not shown it yet when another batch's commit
        // compacts the log.
        let pending = MessageId::random();
        assert!(seen.insert("bob", pending));
        let last = MessageId::random();
        seen.insert("carol", last);
        seen.commit([("carol", last)]).unwrap();
        assert!(seen.logged <= DEDUP_WINDOW, "compacted: {}", seen.logged);
        drop(seen);
        let mut seen = Seen::load(Some(dir.path())).unwrap();
        assert!(!seen.insert("carol", last));
        assert!(
            seen.insert("bob", pending),
            "an uncommitted id did not reach the log"
        );
    }

    #[test]
    fn only_the_committed_ids_reach_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (mine, theirs) = (MessageId::random(), MessageId::random());
        let mut seen = Seen::load(Some(dir.path())).unwrap();
        assert!(seen.insert("bob", mine));
        // Another batch, recorded and not yet shown, when this one commits.
        assert!(seen.insert("bob", theirs));
        seen.commit([("bob", mine)]).unwrap();
        drop(seen);
        let mut seen = Seen::load(Some(dir.path())).unwrap();
        assert!(!seen.insert("bob", mine));
        assert!(
            seen.insert("bob", theirs),
            "an id never committed is not in the log"
        );
    }

    #[test]
    fn sender_keys_are_stable_across_builds() {
        // FNV-1a test vectors: the log format depends on these never changing.
        assert_eq!(sender_key(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(sender_key("a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn seen_window_is_bounded() {
        let mut seen = Seen::load(None).unwrap();
        let first = MessageId::random();
        seen.insert("bob", first);
        for _ in 0..DEDUP_WINDOW {
            seen.insert("bob", MessageId::random());
        }
        assert_eq!(seen.set.len(), DEDUP_WINDOW);
        assert!(seen.insert("bob", first), "the oldest id left the window");
    }

    #[test]
    fn a_mute_for_ever_saturates_instead_of_panicking() {
        let mut state = PeerState::load(None).unwrap();
        state.mute("carol", Duration::MAX).unwrap();
        assert!(state.is_muted("carol"));
    }

    #[test]
    fn block_mute_and_pins_persist() {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::Identity::generate().public_key();
        {
            let mut state = PeerState::load(Some(dir.path())).unwrap();
            state.set_blocked("mallory", true).unwrap();
            state.mute("carol", Duration::from_secs(3600)).unwrap();
            state.set_pin("bob", key).unwrap();
        }
        let state = PeerState::load(Some(dir.path())).unwrap();
        assert!(state.is_blocked("mallory"));
        assert!(state.is_muted("carol"));
        assert!(!state.is_muted("bob"));
        assert_eq!(state.pin("bob"), Some(key));
    }
}
