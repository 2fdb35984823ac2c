//! [`RedbStorage`]: name claims in an embedded redb file, presence in memory.
//!
//! The file is `directory.redb` in the data directory. Each claim is one row, username →
//! 32 key bytes followed by `last_seen` as big-endian Unix milliseconds. Writes commit
//! durably before the registration is confirmed, so a claim survives a crash of the server.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ::redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use async_trait::async_trait;
use p2pchat_core::store::{OfflineStore, Quotas};
use p2pchat_core::{Announcement, Cause, PublicKey};
use tokio::sync::broadcast;

use super::presence::LocalPresence;
use super::redb_mailbox::RedbMailbox;
use super::{
    ANNOUNCEMENT_FEED_CAPACITY, Lease, NameClaim, PresenceChange, SIGNAL_FEED_CAPACITY, SessionId,
    Signal, Storage, StorageError, touch_interval, unix_ms,
};

/// The claims table: username → key bytes ‖ last-seen milliseconds.
const CLAIMS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("claims");

/// Announcements relayed recently: id → issued-at Unix ms (pruned as they age out).
const ANNOUNCED: TableDefinition<'_, &str, u64> = TableDefinition::new("announced");

/// The database file inside the data directory.
pub const DIRECTORY_FILE: &str = "directory.redb";

/// Claims and offline mailboxes in redb, presence in memory. For one server instance.
#[derive(Debug, Clone)]
pub struct RedbStorage {
    db: Arc<Database>,
    presence: Arc<LocalPresence>,
    mailbox: RedbMailbox,
    announcements: broadcast::Sender<Announcement>,
    signals: broadcast::Sender<Signal>,
}

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> StorageError {
    StorageError::unavailable(e)
}

fn encode(claim: &NameClaim) -> [u8; 40] {
    let mut out = [0; 40];
    out[..32].copy_from_slice(&claim.public_key.to_bytes());
    out[32..].copy_from_slice(&unix_ms(claim.last_seen).to_be_bytes());
    out
}

fn decode(username: &str, bytes: &[u8]) -> Result<NameClaim, StorageError> {
    let corrupt = || StorageError::corrupt(format!("the claim on '{username}'"), None);
    let key: &[u8; 32] = bytes
        .get(..32)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(corrupt)?;
    let ms: [u8; 8] = bytes
        .get(32..40)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(corrupt)?;
    Ok(NameClaim {
        public_key: PublicKey::from_bytes(key).map_err(|_| corrupt())?,
        last_seen: SystemTime::UNIX_EPOCH + Duration::from_millis(u64::from_be_bytes(ms)),
    })
}

/// Whether `username` is claimed by `key` and its owner was seen within the touch interval
/// of `lapse`: read from the row's bytes, without decoding the key (a point decompression,
/// which would cost more than the read).
fn claimed_fresh(
    db: &Database,
    username: &str,
    key: &[u8; 32],
    lapse: Duration,
    now: SystemTime,
) -> Result<bool, StorageError> {
    let txn = db.begin_read().map_err(unavailable)?;
    let table = txn.open_table(CLAIMS).map_err(unavailable)?;
    let Some(row) = table.get(username).map_err(unavailable)? else {
        return Ok(false);
    };
    let bytes = row.value();
    let (Some(stored), Some(ms)) = (bytes.get(..32), bytes.get(32..40)) else {
        return Ok(false);
    };
    let ms = u64::from_be_bytes(ms.try_into().unwrap_or_default());
    let last_seen = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
    Ok(stored == key
        && now
            .duration_since(last_seen)
            .is_ok_and(|age| age < touch_interval(lapse)))
}

impl RedbStorage {
    /// Opens (or creates) the directory in `data_dir`, creating the directory if needed, with
    /// mailboxes under the default [`Quotas`].
    ///
    /// On Unix, directories it creates are mode 0700 (an existing `data_dir` keeps its mode),
    /// and `directory.redb` is made 0600, when created and when opened (a file left 0644 by
    /// an earlier version is tightened).
    ///
    /// Fails if another process has the file open.
    pub fn open(data_dir: &Path) -> Result<Self, StorageError> {
        Self::open_with_quotas(data_dir, Quotas::default())
    }

    /// As [`RedbStorage::open`], with mailboxes holding at most `quota` messages (the other
    /// [`Quotas`] at their defaults).
    pub fn open_with_quota(data_dir: &Path, quota: usize) -> Result<Self, StorageError> {
        Self::open_with_quotas(data_dir, Quotas::mailbox(quota))
    }

    /// As [`RedbStorage::open`], with the mailboxes under `quotas`.
    pub fn open_with_quotas(data_dir: &Path, quotas: Quotas) -> Result<Self, StorageError> {
        let mut dirs = std::fs::DirBuilder::new();
        dirs.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut dirs, 0o700);
        dirs.create(data_dir).map_err(|e| StorageError::Open {
            path: data_dir.to_owned(),
            source: Cause::new(e),
        })?;
        let path = data_dir.join(DIRECTORY_FILE);
        let open_error = |e: std::io::Error| StorageError::Open {
            path: path.clone(),
            source: Cause::new(e),
        };
        // Created here 0600 rather than by redb (which would make it 0666 less the umask);
        // redb initializes an empty file as a new database.
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(&path).map_err(open_error)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(open_error)?;
        }
        drop(file);
        let db = Database::create(&path).map_err(|e| StorageError::Open {
            path: path.clone(),
            source: Cause::new(e),
        })?;
        Self::on(db, quotas)
    }

    /// As [`RedbStorage::open_with_quota`], on a database held in this process's memory
    /// (redb's [`InMemoryBackend`](::redb::backends::InMemoryBackend)) instead of a file: the
    /// same tables, transactions and commits, without the file's writes and syncs, and gone
    /// with the process. For the fuzz check (feature `test-utils`), which opens a session
    /// for every input.
    #[cfg(feature = "test-utils")]
    pub fn in_memory_with_quota(quota: usize) -> Result<Self, StorageError> {
        let db = ::redb::Builder::new()
            .create_with_backend(::redb::backends::InMemoryBackend::new())
            .map_err(unavailable)?;
        Self::on(db, Quotas::mailbox(quota))
    }

    /// The storage on `db`: its tables created if missing, its mailboxes under `quotas`.
    fn on(db: Database, quotas: Quotas) -> Result<Self, StorageError> {
        let txn = db.begin_write().map_err(unavailable)?;
        txn.open_table(CLAIMS).map_err(unavailable)?;
        txn.open_table(ANNOUNCED).map_err(unavailable)?;
        txn.commit().map_err(unavailable)?;
        let db = Arc::new(db);
        let mailbox = RedbMailbox::open(db.clone(), quotas).map_err(unavailable)?;
        Ok(Self {
            db,
            presence: Arc::new(LocalPresence::new()),
            mailbox,
            announcements: broadcast::channel(ANNOUNCEMENT_FEED_CAPACITY).0,
            signals: broadcast::channel(SIGNAL_FEED_CAPACITY).0,
        })
    }

    fn read_claim(db: &Database, username: &str) -> Result<Option<NameClaim>, StorageError> {
        let txn = db.begin_read().map_err(unavailable)?;
        let table = txn.open_table(CLAIMS).map_err(unavailable)?;
        let row = table.get(username).map_err(unavailable)?;
        row.map(|v| decode(username, v.value())).transpose()
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(unavailable)?
    }
}

#[async_trait]
impl Storage for RedbStorage {
    async fn claim(
        &self,
        username: &str,
        key: &PublicKey,
        lapse: Duration,
    ) -> Result<(), StorageError> {
        let owner_online = self.presence.online(username).map(|l| l.public_key);
        if owner_online.is_some_and(|k| k != *key) {
            return Err(StorageError::NameTaken(username.to_owned()));
        }
        // The common case, a name re-registered by its owner within the touch interval,
        // is one read of one row: done here, without a trip to a blocking thread (which
        // costs more than the read). Only a write goes to one.
        let key_bytes = key.to_bytes();
        if claimed_fresh(&self.db, username, &key_bytes, lapse, SystemTime::now())? {
            return Ok(());
        }
        let (username, key) = (username.to_owned(), *key);
        self.blocking(move |db| {
            let now = SystemTime::now();
            // Decide again inside the write transaction: writers are serialized, so two
            // racing claims cannot both see the name free.
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut table = txn.open_table(CLAIMS).map_err(unavailable)?;
                let current = table
                    .get(username.as_str())
                    .map_err(unavailable)?
                    .map(|v| decode(&username, v.value()))
                    .transpose()?;
                if let Some(current) = current
                    && current.public_key != key
                {
                    let lapsed = now
                        .duration_since(current.last_seen)
                        .is_ok_and(|age| age >= lapse);
                    if !lapsed {
                        return Err(StorageError::NameTaken(username));
                    }
                }
                let claim = NameClaim {
                    public_key: key,
                    last_seen: now,
                };
                table
                    .insert(username.as_str(), encode(&claim).as_slice())
                    .map_err(unavailable)?;
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn claim_of(&self, username: &str) -> Result<Option<NameClaim>, StorageError> {
        let username = username.to_owned();
        self.blocking(move |db| Self::read_claim(db, &username))
            .await
    }

    async fn touch(&self, username: &str, key: &PublicKey) -> Result<(), StorageError> {
        let (username, key) = (username.to_owned(), *key);
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut table = txn.open_table(CLAIMS).map_err(unavailable)?;
                let owned = table
                    .get(username.as_str())
                    .map_err(unavailable)?
                    .map(|v| decode(&username, v.value()))
                    .transpose()?
                    .is_some_and(|c| c.public_key == key);
                if owned {
                    let claim = NameClaim {
                        public_key: key,
                        last_seen: SystemTime::now(),
                    };
                    table
                        .insert(username.as_str(), encode(&claim).as_slice())
                        .map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn set_online(&self, lease: &Lease, ttl: Duration) -> Result<(), StorageError> {
        self.presence.set_online(lease, ttl);
        Ok(())
    }

    async fn revive(&self, lease: &Lease, ttl: Duration) -> Result<bool, StorageError> {
        Ok(self.presence.revive(lease, ttl))
    }

    async fn refresh(
        &self,
        username: &str,
        session: SessionId,
        ttl: Duration,
    ) -> Result<bool, StorageError> {
        Ok(self.presence.refresh(username, session, ttl))
    }

    async fn set_offline(&self, username: &str, session: SessionId) -> Result<bool, StorageError> {
        Ok(self.presence.set_offline(username, session))
    }

    async fn online(&self, username: &str) -> Result<Option<Lease>, StorageError> {
        Ok(self.presence.online(username))
    }

    async fn list_online(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Lease>, StorageError> {
        Ok(self.presence.list_online(after, limit))
    }

    async fn sweep(&self) -> Result<(), StorageError> {
        self.presence.sweep();
        Ok(())
    }

    fn presence_changes(&self) -> broadcast::Receiver<PresenceChange> {
        self.presence.subscribe()
    }

    fn mailbox(&self) -> Arc<dyn OfflineStore> {
        Arc::new(self.mailbox.clone())
    }

    async fn publish_announcement(&self, announcement: &Announcement) -> Result<(), StorageError> {
        // Nobody listening is fine.
        let _ = self.announcements.send(announcement.clone());
        Ok(())
    }

    fn announcements(&self) -> broadcast::Receiver<Announcement> {
        self.announcements.subscribe()
    }

    async fn record_announcement(&self, id: &str, issued_at_ms: u64) -> Result<(), StorageError> {
        let id = id.to_owned();
        let max_age = p2pchat_core::announce::ANNOUNCEMENT_MAX_AGE.as_millis() as u64;
        let oldest = unix_ms(SystemTime::now()).saturating_sub(max_age);
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut table = txn.open_table(ANNOUNCED).map_err(unavailable)?;
                table
                    .insert(id.as_str(), issued_at_ms)
                    .map_err(unavailable)?;
                table
                    .retain(|_, issued| issued >= oldest)
                    .map_err(unavailable)?;
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn recent_announcements(
        &self,
        since_ms: u64,
    ) -> Result<Vec<(String, u64)>, StorageError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(ANNOUNCED).map_err(unavailable)?;
            let mut out = Vec::new();
            for row in table.iter().map_err(unavailable)? {
                let (id, issued) = row.map_err(unavailable)?;
                if issued.value() >= since_ms {
                    out.push((id.value().to_owned(), issued.value()));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn publish_signal(&self, signal: &Signal) -> Result<(), StorageError> {
        // One instance: its sessions are all here, so this reaches nobody but is allowed.
        let _ = self.signals.send(signal.clone());
        Ok(())
    }

    fn signals(&self) -> broadcast::Receiver<Signal> {
        self.signals.subscribe()
    }
}
