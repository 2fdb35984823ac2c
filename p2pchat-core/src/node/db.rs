//! The node database: everything a node must not forget (outbox, inbox, held messages, seen
//! ids, block/mute/pins, operator pin and announcement ids), in one place.
//!
//! A generic, table-keyed byte store with two layers:
//! - an **append-only journal** of [`Batch`]es, memory-mapped so that [`Db::write`] is a copy
//!   into the operating system's page cache: a write survives a kill of the process as soon
//!   as it returns, and costs no system call on the hot path. With
//!   [`Durability::PowerLoss`] a sync thread also `fdatasync`s the journal, grouping every
//!   write made since the last sync ([`Db::durable`] waits for it).
//! - a **redb database** (`node.redb`) the journal is compacted into, a segment at a time,
//!   in a blocking task: committed with fsync, after which the segment file is deleted.
//!
//! Without a data directory the same code runs in memory: journal segments are `Vec<u8>`s and
//! the database is redb's in-memory backend.
//!
//! Files in the data directory: `node.lock` (held exclusively while open: two processes
//! never share a journal), `node.redb`, `journal-<n>.log` (segments not yet compacted).
//! Everything is created 0600, the directory 0700.

mod journal;

use parking_lot::{Condvar, Mutex};
use std::cell::Cell;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{DirBuilder, File, OpenOptions, Permissions, TryLockError};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use backon::{BlockingRetryable, ConstantBuilder};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::watch;

use journal::{HEADER_LEN, Op, Segment};

/// The length of a journal segment file: 8 MiB. Files are created sparse at this length and
/// mapped whole; a segment holds records until the next one does not fit, then it is
/// compacted into `node.redb` and deleted. It bounds one batch (to this minus a record
/// header), and the journal a restart replays is a segment or two.
pub(crate) const SEGMENT_LEN: usize = 8 << 20;

/// The lock file, held exclusively while the database is open.
const LOCK_FILE: &str = "node.lock";

/// How long [`lock_dir`] keeps trying a taken lock before it reports [`DbError::Locked`].
const LOCK_WAIT: Duration = Duration::from_millis(500);

/// How often [`lock_dir`] tries a taken lock.
const LOCK_POLL: Duration = Duration::from_millis(10);
/// The compacted database.
const REDB_FILE: &str = "node.redb";

/// The private table of the database itself: `compacted_through` = the highest journal
/// segment number already compacted into the tables.
const DB_META: TableDefinition<'_, &str, u64> = TableDefinition::new("db_meta");
const COMPACTED_THROUGH: &str = "compacted_through";

/// How durable a message must be before [`crate::ChatNode::send`] returns, and before a
/// received message is acknowledged to its sender.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// Kept across a crash or kill of the process: written to the operating system (its page
    /// cache) before returning. Not kept across a power loss or a kernel crash. The default.
    #[default]
    Process,
    /// Kept across a power loss too: synced to disk before returning. Syncs are grouped
    /// across concurrent senders, so a node with many messages in flight pays one sync per
    /// group, and one awaiting each send pays one per message.
    PowerLoss,
}

/// The tables of the node database. The discriminant is written to disk: never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub(crate) enum Table {
    /// Messages not yet delivered or stored: key = message id.
    Outbox = 1,
    /// Received messages the application has not confirmed: key = sequence number.
    Inbox = 2,
    /// Received messages under a key the user has not trusted yet: key = sequence number.
    Held = 3,
    /// Ids already received, per sender, in a ring of slots: key = sender, 0, slot.
    Seen = 4,
    /// Small records: block/mute/pins, operator pin, announcement ids; sequence counters.
    Meta = 5,
    /// Conversation history, when kept: key = peer, 0, sequence number.
    History = 6,
}

impl Table {
    /// Whether a key of this table is only ever put while it is absent (message ids, fresh
    /// sequence numbers): a put of such a key followed by its delete within the journal
    /// being compacted is dropped rather than applied ([`Changes`]). Every writer of these
    /// tables must keep to it.
    fn write_once(self) -> bool {
        matches!(
            self,
            Table::Outbox | Table::Inbox | Table::Held | Table::History
        )
    }

    /// Whether the table's rows are packed in redb, those whose keys differ in their last
    /// byte sharing a row (see `pack`): for a table whose rows are rewritten in groups.
    fn packed(self) -> bool {
        matches!(self, Table::Seen)
    }

    /// Every table.
    const ALL: [Table; 6] = [
        Table::Outbox,
        Table::Inbox,
        Table::Held,
        Table::Seen,
        Table::Meta,
        Table::History,
    ];

    /// The table's redb table.
    fn definition(self) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
        TableDefinition::new(match self {
            Table::Outbox => "outbox",
            Table::Inbox => "inbox",
            Table::Held => "held",
            Table::Seen => "seen_packed",
            Table::Meta => "meta",
            Table::History => "history",
        })
    }
}

/// A set of changes written atomically: after a crash, either all of a batch is there or
/// none of it.
#[derive(Debug, Default, Clone)]
pub(crate) struct Batch {
    /// The encoded ops (the journal format, see `journal`): a write copies them as they are.
    bytes: Vec<u8>,
}

impl Batch {
    /// An empty batch.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Sets `key` in `table` to `value`.
    pub(crate) fn put(&mut self, table: Table, key: &[u8], value: &[u8]) {
        journal::encode_put(&mut self.bytes, table, key, value);
    }
    /// Sets `key` in `table` to `record`, serialized straight into the batch.
    pub(crate) fn put_record<T: serde::Serialize>(&mut self, table: Table, key: &[u8], record: &T) {
        let len_at = journal::begin_put(&mut self.bytes, table, key);
        if postcard::to_io(record, &mut self.bytes).is_err() {
            // Our records always serialize; one that did not would be stored empty (and not
            // decode), as `records::encode` does.
            self.bytes.truncate(len_at + 4);
        }
        journal::end_put(&mut self.bytes, len_at);
    }
    /// Removes `key` from `table` (nothing if absent).
    pub(crate) fn delete(&mut self, table: Table, key: &[u8]) {
        journal::encode_delete(&mut self.bytes, table, key);
    }
    /// Whether the batch holds no change.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Where a write ended in the journal; [`Db::durable`] waits until everything up to it is
/// synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Written(u64);

/// The contents of the database at open: every table, key order.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    tables: HashMap<Table, BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl Snapshot {
    /// Takes one table's rows out of the snapshot.
    pub(crate) fn take(&mut self, table: Table) -> BTreeMap<Vec<u8>, Vec<u8>> {
        self.tables.remove(&table).unwrap_or_default()
    }
}

/// Errors of the node database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// A file of the database could not be read or written.
    #[error("node database file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// Another process has the data directory open.
    #[error(
        "the data directory {path} is in use by another p2pchat process; stop it or use another directory"
    )]
    Locked {
        /// The directory.
        path: PathBuf,
    },
    /// redb failed.
    #[error("node database {path}")]
    Database {
        /// The database file (or "memory").
        path: PathBuf,
        /// The failure.
        #[source]
        source: Box<redb::Error>,
    },
    /// One batch is larger than a journal segment.
    #[error("a batch of {len} bytes is larger than the journal allows ({max} bytes)")]
    TooLarge {
        /// Its encoded length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The database was closed.
    #[error("the node database is closed")]
    Closed,
    /// A record was written by a version of p2pchat this one cannot read.
    #[error("the node database holds {what} this version cannot read")]
    Unreadable {
        /// Which record.
        what: &'static str,
    },
}

/// A closure turning an I/O error on `path` into a [`DbError::Io`].
fn io_error(path: &Path) -> impl FnOnce(io::Error) -> DbError + '_ {
    move |source| DbError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A closure turning a redb error on `path` into a [`DbError::Database`].
fn db_error<E: Into<redb::Error>>(path: &Path) -> impl FnOnce(E) -> DbError + '_ {
    move |e| DbError::Database {
        path: path.to_owned(),
        source: Box::new(e.into()),
    }
}

/// The node database. `Send + Sync`; writes are serialized inside.
pub(crate) struct Db {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("path", &self.inner.path)
            .field("durability", &self.inner.durability)
            .finish_non_exhaustive()
    }
}

/// What a [`Db`] shares with its compaction jobs and sync thread.
struct Inner {
    /// The data directory, or "memory"; for errors.
    path: PathBuf,
    /// The data directory; `None` in memory.
    dir: Option<PathBuf>,
    durability: Durability,
    segment_len: usize,
    /// The segment being written. Held for the copy of each write.
    writer: Mutex<Writer>,
    /// Set by [`Db::close`] (after `writer.closed`): stops segment preparation.
    closed: AtomicBool,
    /// The number of the segment being written, for the preparation of the next one; only
    /// changed with `next` locked.
    current: AtomicU64,
    /// The next segment: created and mapped ahead of time, or recycled (a compacted file;
    /// in memory, a compacted segment's emptied buffer).
    next: Mutex<Option<(u64, Segment)>>,
    /// Full segments waiting for compaction, oldest first.
    compactor: Mutex<Compactor>,
    /// The database; held by a compaction for its whole run (so compactions run one at a time
    /// and in order), taken out by [`Db::close`].
    redb: Mutex<Option<redb::Database>>,
    /// `node.lock`, locked; dropped by [`Db::close`].
    lock_file: Mutex<Option<File>>,
    /// The sync thread, with [`Durability::PowerLoss`] in a directory.
    sync: Option<SyncThread>,
}

struct Writer {
    closed: bool,
    /// The current segment's number.
    number: u64,
    /// The current segment; `None` once closed.
    segment: Option<Segment>,
    /// Where the next record goes in it.
    pos: usize,
    /// Bytes of records written since open, all segments: a write's position.
    lsn: u64,
    /// Files of segments written since the last sync, other than the current one.
    unsynced: Vec<Arc<File>>,
    /// Whether a segment file was created since the last sync (the directory needs a sync).
    dir_unsynced: bool,
}

#[derive(Default)]
struct Compactor {
    queue: VecDeque<(u64, Segment)>,
    /// Whether a compaction job is scheduled or running.
    running: bool,
}

/// Group commit: the thread syncs everything written before each sync started, and
/// publishes how far that was.
struct SyncThread {
    request: Mutex<SyncRequest>,
    wake: Condvar,
    handle: Mutex<Option<JoinHandle<()>>>,
    synced: watch::Receiver<Synced>,
    /// Syncs done, for tests.
    syncs: AtomicU64,
}

#[derive(Default)]
struct SyncRequest {
    requested: bool,
    stop: bool,
}

#[derive(Debug, Clone, Default)]
struct Synced {
    /// Every write ending at or before this is synced.
    lsn: u64,
    /// A sync failed: the kernel may have dropped the unsynced pages, so nothing after
    /// `lsn` is ever reported durable.
    failed: Option<(io::ErrorKind, String)>,
}

/// One key's change over the segments being compacted: the last value (`None` deletes), and
/// whether the first op on the key in them was a put.
#[derive(Debug, Clone, Copy)]
struct Change<'a> {
    value: Option<&'a [u8]>,
    first_put: bool,
}

/// A key of an unpacked table: up to 16 bytes as an integer (message ids, sequence numbers),
/// so that hashing and comparing it never reaches back into the segment, longer ones
/// borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum RowKey<'a> {
    Short(Table, u8, u128),
    Long(Table, &'a [u8]),
}

impl<'a> RowKey<'a> {
    fn new(table: Table, key: &'a [u8]) -> Self {
        if key.len() <= 16 {
            let mut bytes = [0; 16];
            bytes[..key.len()].copy_from_slice(key);
            // Fits: at most 16.
            RowKey::Short(table, key.len() as u8, u128::from_be_bytes(bytes))
        } else {
            RowKey::Long(table, key)
        }
    }

    fn table(&self) -> Table {
        match self {
            RowKey::Short(table, ..) | RowKey::Long(table, _) => *table,
        }
    }

    /// The key's bytes, in `buf` if it is short.
    fn bytes<'b>(&'b self, buf: &'b mut [u8; 16]) -> &'b [u8] {
        match self {
            RowKey::Short(_, len, value) => {
                *buf = value.to_be_bytes();
                &buf[..usize::from(*len)]
            }
            RowKey::Long(_, key) => key,
        }
    }
}

/// The changes of one group of a packed table (see `pack`): by the last byte of the key,
/// the last value (`None` deletes), for the keys touched.
struct Group<'a> {
    table: Table,
    prefix: &'a [u8],
    /// The key equal to the prefix (an empty suffix).
    bare: Option<Option<&'a [u8]>>,
    slots: Box<[Option<Option<&'a [u8]>>; 256]>,
}

/// The changes of the segments being compacted, last wins per key.
///
/// A key of a [`Table::write_once`] table put and then deleted within the changes was
/// absent before them and is absent after: it leaves the map at its delete and never
/// reaches redb (most messages are queued and delivered, or received and read, within one
/// segment), so the map holds little more than what is still pending. A packed table's
/// changes go to their group directly, a slot per last key byte; consecutive changes mostly
/// touch one group (the `Seen` ring turns slot by slot), which is tried first.
#[derive(Default)]
struct Changes<'a> {
    rows: HashMap<RowKey<'a>, Change<'a>, foldhash::fast::RandomState>,
    groups: Vec<Group<'a>>,
    group_index: HashMap<(Table, &'a [u8]), usize, foldhash::fast::RandomState>,
    last_group: Option<usize>,
}

impl<'a> Changes<'a> {
    fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.groups.is_empty()
    }

    /// Adds the changes of segment `number`.
    fn add_segment(&mut self, segment: &'a [u8], number: u64) {
        for ops in journal::records(segment, number) {
            for op in ops {
                match op {
                    Op::Put(table, key, value) => self.add(table, key, Some(value)),
                    Op::Delete(table, key) => self.add(table, key, None),
                }
            }
        }
    }

    fn add(&mut self, table: Table, key: &'a [u8], value: Option<&'a [u8]>) {
        if table.packed() {
            let (prefix, suffix) = pack::split(key);
            let group = self.group(table, prefix);
            match suffix.first() {
                Some(&slot) => group.slots[usize::from(slot)] = Some(value),
                None => group.bare = Some(value),
            }
            return;
        }
        match self.rows.entry(RowKey::new(table, key)) {
            Entry::Occupied(mut change) => {
                if value.is_none() && change.get().first_put && table.write_once() {
                    // Put and deleted within the changes: absent before and after.
                    change.remove();
                } else {
                    change.get_mut().value = value;
                }
            }
            Entry::Vacant(slot) => {
                slot.insert(Change {
                    value,
                    first_put: value.is_some(),
                });
            }
        }
    }

    fn group(&mut self, table: Table, prefix: &'a [u8]) -> &mut Group<'a> {
        let index = match self.last_group {
            Some(i) if self.groups[i].table == table && self.groups[i].prefix == prefix => i,
            _ => {
                let groups = &mut self.groups;
                let i = *self.group_index.entry((table, prefix)).or_insert_with(|| {
                    groups.push(Group {
                        table,
                        prefix,
                        bare: None,
                        slots: Box::new([None; 256]),
                    });
                    groups.len() - 1
                });
                self.last_group = Some(i);
                i
            }
        };
        &mut self.groups[index]
    }

    /// Every change: table, key, the last value (`None` deletes).
    #[cfg(test)]
    fn each(&self, mut f: impl FnMut(Table, &[u8], Option<&[u8]>)) {
        for (key, change) in &self.rows {
            let mut buf = [0; 16];
            f(key.table(), key.bytes(&mut buf), change.value);
        }
        for group in &self.groups {
            if let Some(value) = group.bare {
                f(group.table, group.prefix, value);
            }
            for (slot, value) in group.slots.iter().enumerate() {
                if let Some(value) = value {
                    f(group.table, &[group.prefix, &[slot as u8]].concat(), *value);
                }
            }
        }
    }
}

/// Applies `changes` and records `compacted_through`, in `txn`. Opening the tables also
/// creates them.
fn apply(
    txn: &redb::WriteTransaction,
    changes: &Changes<'_>,
    compacted_through: u64,
) -> Result<(), redb::Error> {
    let mut tables = Vec::with_capacity(Table::ALL.len());
    for table in Table::ALL {
        tables.push((table, txn.open_table(table.definition())?));
    }
    // In key order: redb inserts faster so.
    let mut rows: Vec<(Table, [u8; 16], &RowKey<'_>, &Change<'_>)> = changes
        .rows
        .iter()
        .map(|(key, change)| {
            let mut buf = [0; 16];
            key.bytes(&mut buf);
            (key.table(), buf, key, change)
        })
        .collect();
    rows.sort_unstable_by(|a, b| {
        let (mut x, mut y) = ([0; 16], [0; 16]);
        (a.0, a.2.bytes(&mut x)).cmp(&(b.0, b.2.bytes(&mut y)))
    });
    for (table, _, key, change) in rows {
        let Some((_, rows)) = tables.iter_mut().find(|(t, _)| *t == table) else {
            continue;
        };
        let mut buf = [0; 16];
        let key = key.bytes(&mut buf);
        match change.value {
            Some(value) => drop(rows.insert(key, value)?),
            None => drop(rows.remove(key)?),
        }
    }
    let mut packed = Vec::new();
    for group in &changes.groups {
        let Some((_, rows)) = tables.iter_mut().find(|(t, _)| *t == group.table) else {
            continue;
        };
        let old: Vec<u8> = rows
            .get(group.prefix)?
            .map(|row| row.value().to_vec())
            .unwrap_or_default();
        let (mut bare, mut slots) = (None, [None; 256]);
        if !pack::decode(&old, &mut bare, &mut slots) {
            tracing::warn!(table = ?group.table, "a packed row does not decode; rewritten");
        }
        if let Some(value) = group.bare {
            bare = value;
        }
        for (slot, change) in slots.iter_mut().zip(group.slots.iter()) {
            if let Some(value) = change {
                *slot = *value;
            }
        }
        packed.clear();
        pack::encode(bare, &slots, &mut packed);
        if packed.is_empty() {
            rows.remove(group.prefix)?;
        } else {
            rows.insert(group.prefix, packed.as_slice())?;
        }
    }
    let mut meta = txn.open_table(DB_META)?;
    meta.insert(COMPACTED_THROUGH, compacted_through)?;
    Ok(())
}

/// A packed table's rows in redb: the rows whose keys differ in their last byte only share
/// one redb row, keyed by the rest of the key, holding each row's last key byte (if any) and
/// value. A compaction then rewrites one redb row per group rather than one per key: the
/// `Seen` ring, 16,384 slots per sender, rewritten as the window turns, is 64 redb rows.
mod pack {
    /// The group prefix and the suffix (the last byte, or nothing) of a key.
    pub(super) fn split(key: &[u8]) -> (&[u8], &[u8]) {
        key.split_at(key.len().saturating_sub(1))
    }

    /// A group's rows, `bare` (the key without a last byte) first, then by last byte: each
    /// `[suffix len u8][suffix][value len u32 LE][value]`.
    pub(super) fn encode(bare: Option<&[u8]>, slots: &[Option<&[u8]>; 256], out: &mut Vec<u8>) {
        let entries =
            bare.map(|value| (None, value))
                .into_iter()
                .chain(slots.iter().enumerate().filter_map(|(slot, value)| {
                    // Fits: 256 slots.
                    Some((Some(slot as u8), (*value)?))
                }));
        for (suffix, value) in entries {
            match suffix {
                Some(byte) => out.extend_from_slice(&[1, byte]),
                None => out.push(0),
            }
            out.extend_from_slice(&u32::try_from(value.len()).unwrap_or(u32::MAX).to_le_bytes());
            out.extend_from_slice(value);
        }
    }

    /// Reads a group's rows into `bare` and `slots`; false (and what was read before the
    /// fault kept) if the bytes are not [`encode`]'s.
    pub(super) fn decode<'a>(
        mut bytes: &'a [u8],
        bare: &mut Option<&'a [u8]>,
        slots: &mut [Option<&'a [u8]>; 256],
    ) -> bool {
        while let Some((&len, rest)) = bytes.split_first() {
            let parsed = (|| {
                let (suffix, rest) = rest.split_at_checked(usize::from(len))?;
                let (len, rest) = rest.split_first_chunk::<4>()?;
                let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
                let (value, rest) = rest.split_at_checked(len)?;
                Some((suffix, value, rest))
            })();
            match parsed {
                Some(([], value, rest)) => {
                    *bare = Some(value);
                    bytes = rest;
                }
                Some(([slot], value, rest)) => {
                    slots[usize::from(*slot)] = Some(value);
                    bytes = rest;
                }
                _ => return false,
            }
        }
        true
    }
}

fn compacted_through(txn: &redb::WriteTransaction) -> Result<u64, redb::Error> {
    let meta = txn.open_table(DB_META)?;
    Ok(meta.get(COMPACTED_THROUGH)?.map_or(0, |v| v.value()))
}

/// Compacts segment `number` into the database: one write transaction, committed durably.
fn compact_segment(db: &redb::Database, number: u64, segment: &[u8]) -> Result<(), redb::Error> {
    let mut changes = Changes::default();
    changes.add_segment(segment, number);
    let txn = db.begin_write()?;
    let through = compacted_through(&txn)?.max(number);
    apply(&txn, &changes, through)?;
    txn.commit()?;
    Ok(())
}

/// Every table's rows.
fn load(db: &redb::Database) -> Result<Snapshot, redb::Error> {
    let txn = db.begin_read()?;
    let mut snapshot = Snapshot::default();
    for table in Table::ALL {
        let rows = txn.open_table(table.definition())?;
        let mut map = BTreeMap::new();
        for row in rows.iter()? {
            let (key, value) = row?;
            if !table.packed() {
                map.insert(key.value().to_vec(), value.value().to_vec());
                continue;
            }
            let prefix = key.value();
            let (mut bare, mut slots) = (None, [None; 256]);
            if !pack::decode(value.value(), &mut bare, &mut slots) {
                tracing::warn!(table = ?table, "a packed row does not decode in full");
            }
            if let Some(value) = bare {
                map.insert(prefix.to_vec(), value.to_vec());
            }
            for (slot, value) in slots.iter().enumerate() {
                if let Some(value) = value {
                    map.insert([prefix, &[slot as u8]].concat(), value.to_vec());
                }
            }
        }
        snapshot.tables.insert(table, map);
    }
    Ok(snapshot)
}

/// Creates `dir` 0700 if it does not exist.
fn create_dir(dir: &Path) -> Result<(), DbError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error(dir))
}

/// Opens (creating it 0600) and locks `node.lock`.
///
/// A lock that is taken is tried again for up to [`LOCK_WAIT`]: the lock belongs to the open
/// file, and a child this process starts (any `Command::spawn` in the embedding application,
/// or in a test) holds a copy of every open file from its fork to its `exec`. A database
/// closed a moment ago can therefore look locked for that moment; a directory another node
/// really holds is still reported as [`DbError::Locked`], [`LOCK_WAIT`] later.
fn lock_dir(dir: &Path) -> Result<File, DbError> {
    let path = dir.join(LOCK_FILE);
    let file = open_private(&path)?;
    let polls = LOCK_WAIT.as_millis() / LOCK_POLL.as_millis();
    let locked = (|| file.try_lock())
        .retry(
            ConstantBuilder::new()
                .with_delay(LOCK_POLL)
                .with_max_times(polls as usize),
        )
        .sleep(std::thread::sleep)
        .when(|e| matches!(e, TryLockError::WouldBlock))
        .call();
    match locked {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(DbError::Locked {
            path: dir.to_owned(),
        }),
        Err(TryLockError::Error(e)) => Err(io_error(&path)(e)),
    }
}

/// Opens `path` for reading and writing, creating it 0600.
fn open_private(path: &Path) -> Result<File, DbError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io_error(path))
}

/// Opens (creating it 0600) `node.redb`.
fn open_redb(dir: &Path) -> Result<redb::Database, DbError> {
    let path = dir.join(REDB_FILE);
    let file = open_private(&path)?;
    file.set_permissions(Permissions::from_mode(0o600))
        .map_err(io_error(&path))?;
    let backend = redb::backends::FileBackend::new(file).map_err(db_error(&path))?;
    redb::Builder::new()
        .create_with_backend(backend)
        .map_err(db_error(&path))
}

/// The journal segments in `dir`, by number.
fn list_segments(dir: &Path) -> Result<BTreeMap<u64, PathBuf>, DbError> {
    let mut segments = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let name = entry.file_name();
        if let Some(number) = name.to_str().and_then(journal::parse_segment_name) {
            segments.insert(number, entry.path());
        }
    }
    Ok(segments)
}

/// Deletes a segment file (absent is fine).
fn remove_file(path: &Path) -> Result<(), DbError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error(path)(e)),
        _ => Ok(()),
    }
}

/// Compacts what an earlier run left in the journal of `dir` into `db`, deletes the segment
/// files, and returns the highest segment number seen (the next run starts after it).
fn recover(dir: &Path, db: &redb::Database) -> Result<u64, DbError> {
    let db_path = dir.join(REDB_FILE);
    let segments = list_segments(dir)?;
    let mut txn = db.begin_write().map_err(db_error(&db_path))?;
    let through = compacted_through(&txn).map_err(db_error(&db_path))?;
    let mut contents = Vec::new();
    for (&number, path) in segments.range(through.saturating_add(1)..) {
        let file = File::open(path).map_err(io_error(path))?;
        contents.push((
            number,
            journal::read_segment(file, number).map_err(io_error(path))?,
        ));
        tracing::debug!(segment = number, "replaying the journal");
    }
    let mut changes = Changes::default();
    for (number, segment) in &contents {
        changes.add_segment(segment, *number);
    }
    let last = segments
        .keys()
        .next_back()
        .map_or(through, |&n| n.max(through));
    if changes.is_empty() {
        // Nothing to keep (creating the tables, forgetting empty segments): spare the fsync.
        // Lost in a power loss, it is done again; `compacted_through` only lags.
        txn.set_durability(redb::Durability::None)
            .map_err(db_error(&db_path))?;
    }
    apply(&txn, &changes, last).map_err(db_error(&db_path))?;
    txn.commit().map_err(db_error(&db_path))?;
    for path in segments.values() {
        remove_file(path)?;
    }
    Ok(last)
}

impl Db {
    /// Opens (or creates) the database in `dir`, or in memory without one, replays and
    /// compacts any journal segments left by an earlier run, and returns its contents.
    /// Blocking: call it from a blocking task.
    pub(crate) fn open(
        dir: Option<&Path>,
        durability: Durability,
    ) -> Result<(Arc<Db>, Snapshot), DbError> {
        Self::open_with(dir, durability, SEGMENT_LEN)
    }

    /// [`Db::open`] with segments of `segment_len` bytes (tests use small ones).
    fn open_with(
        dir: Option<&Path>,
        durability: Durability,
        segment_len: usize,
    ) -> Result<(Arc<Db>, Snapshot), DbError> {
        // Record lengths are u32 on disk.
        let segment_len = segment_len.clamp(HEADER_LEN + 1, u32::MAX as usize);
        let (path, redb, lock_file, snapshot, number, segment, next) = match dir {
            None => {
                let path = PathBuf::from("memory");
                let redb = redb::Builder::new()
                    .create_with_backend(redb::backends::InMemoryBackend::new())
                    .map_err(db_error(&path))?;
                let txn = redb.begin_write().map_err(db_error(&path))?;
                apply(&txn, &Changes::default(), 0).map_err(db_error(&path))?;
                txn.commit().map_err(db_error(&path))?;
                let segment = Segment::Memory(Vec::new());
                (path, redb, None, Snapshot::default(), 1, segment, None)
            }
            Some(dir) => {
                create_dir(dir)?;
                let lock_file = lock_dir(dir)?;
                let redb = open_redb(dir)?;
                let last = recover(dir, &redb)?;
                let snapshot = load(&redb).map_err(db_error(&dir.join(REDB_FILE)))?;
                let number = last.saturating_add(1);
                let keep_files = durability == Durability::PowerLoss;
                let create = |n: u64| {
                    let path = dir.join(journal::segment_name(n));
                    Segment::create_mapped(&path, segment_len, keep_files).map_err(io_error(&path))
                };
                let segment = create(number)?;
                let next = create(number.saturating_add(1))?;
                let next = Some((number.saturating_add(1), next));
                let path = dir.to_owned();
                (path, redb, Some(lock_file), snapshot, number, segment, next)
            }
        };
        let (sync_tx, sync) = if durability == Durability::PowerLoss && dir.is_some() {
            let (tx, rx) = watch::channel(Synced::default());
            let sync = SyncThread {
                request: Mutex::new(SyncRequest::default()),
                wake: Condvar::new(),
                handle: Mutex::new(None),
                synced: rx,
                syncs: AtomicU64::new(0),
            };
            (Some(tx), Some(sync))
        } else {
            (None, None)
        };
        let inner = Arc::new(Inner {
            dir: dir.map(Path::to_owned),
            path,
            durability,
            segment_len,
            writer: Mutex::new(Writer {
                closed: false,
                number,
                segment: Some(segment),
                pos: 0,
                lsn: 0,
                unsynced: Vec::new(),
                dir_unsynced: true,
            }),
            closed: AtomicBool::new(false),
            current: AtomicU64::new(number),
            next: Mutex::new(next),
            compactor: Mutex::new(Compactor::default()),
            redb: Mutex::new(Some(redb)),
            lock_file: Mutex::new(lock_file),
            sync,
        });
        let db = Arc::new(Db {
            inner: inner.clone(),
        });
        if let (Some(tx), Some(sync)) = (sync_tx, &inner.sync) {
            let thread_inner = inner.clone();
            let handle = std::thread::Builder::new()
                .name("p2pchat-db-sync".into())
                .spawn(move || thread_inner.sync_loop(&tx))
                .map_err(io_error(&inner.path))?;
            *sync.handle.lock() = Some(handle);
        }
        Ok((db, snapshot))
    }

    /// Appends `batch` to the journal. When this returns, the batch survives a kill of the
    /// process; with [`Durability::PowerLoss`], await [`Db::durable`] for a power loss.
    /// Never waits for the disk; cheap enough for every message.
    pub(crate) fn write(&self, batch: &Batch) -> Result<Written, DbError> {
        let inner = &self.inner;
        let body = batch.bytes.as_slice();
        let max = inner.segment_len - HEADER_LEN;
        if body.len() > max {
            return Err(DbError::TooLarge {
                len: body.len(),
                max,
            });
        }
        let mut header = [0; HEADER_LEN];
        // Fits: at most a segment, and segments are at most u32::MAX.
        header[..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
        let crc = crc32fast::hash(body);
        let record_len = HEADER_LEN + body.len();

        let mut writer = inner.writer.lock();
        if writer.closed {
            return Err(DbError::Closed);
        }
        if body.is_empty() {
            return Ok(Written(writer.lsn));
        }
        let mut compact_inline = false;
        if writer.pos + record_len > inner.segment_len {
            compact_inline = Inner::rotate(inner, &mut writer)?;
        }
        let pos = writer.pos;
        header[4..].copy_from_slice(&(crc ^ journal::salt(writer.number)).to_le_bytes());
        let written = match writer.segment.as_mut() {
            Some(segment) => {
                segment
                    .reserve(pos + record_len)
                    .map_err(io_error(&inner.path))?;
                segment.write_record(pos, &header, body)
            }
            None => return Err(DbError::Closed),
        };
        if !written {
            // Unreachable: the record fits, and records are written in order.
            return Err(io_error(&inner.path)(io::Error::other(
                "journal segment position out of bounds",
            )));
        }
        writer.pos += record_len;
        writer.lsn += record_len as u64;
        let lsn = writer.lsn;
        drop(writer);
        if compact_inline {
            inner.drain(false);
            inner.prepare_next();
        }
        Ok(Written(lsn))
    }

    /// Fills a batch and appends it, as [`Db::write`]. The batch is a per-thread buffer,
    /// reused: no allocation per write.
    pub(crate) fn write_with(&self, fill: impl FnOnce(&mut Batch)) -> Result<Written, DbError> {
        /// A buffer grown past this by a large batch is not kept.
        const KEEP: usize = 1 << 20;
        thread_local! {
            static SCRATCH: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
        }
        let mut batch = Batch {
            bytes: SCRATCH.take(),
        };
        batch.bytes.clear();
        fill(&mut batch);
        let written = self.write(&batch);
        if batch.bytes.capacity() <= KEEP {
            SCRATCH.set(batch.bytes);
        }
        written
    }

    /// Resolves once everything up to `written` is durable at the configured level: at once
    /// for [`Durability::Process`].
    pub(crate) async fn durable(&self, written: Written) -> Result<(), DbError> {
        let Some(sync) = &self.inner.sync else {
            return Ok(());
        };
        let mut synced = sync.synced.clone();
        if synced.borrow_and_update().lsn >= written.0 {
            return Ok(());
        }
        sync.request();
        let failed = match synced
            .wait_for(|s| s.lsn >= written.0 || s.failed.is_some())
            .await
        {
            Ok(s) if s.lsn >= written.0 => return Ok(()),
            Ok(s) => s.failed.clone(),
            // The sync thread stopped (closed) before getting there.
            Err(_) => return Err(DbError::Closed),
        };
        let (kind, message) = failed.unwrap_or((io::ErrorKind::Other, String::new()));
        Err(DbError::Io {
            path: self.inner.path.clone(),
            source: io::Error::new(kind, message),
        })
    }

    /// Writes and waits for durability: [`Db::write`] then [`Db::durable`].
    #[cfg(test)]
    pub(crate) async fn commit(&self, batch: &Batch) -> Result<(), DbError> {
        let written = self.write(batch)?;
        self.durable(written).await
    }

    /// Stops the sync thread, releases the directory lock and the mappings. Later writes
    /// fail with [`DbError::Closed`]. Idempotent. Nothing written is lost: the journal stays
    /// for the next open to compact.
    pub(crate) fn close(&self) {
        let inner = &self.inner;
        {
            let mut writer = inner.writer.lock();
            if writer.closed {
                return;
            }
            writer.closed = true;
        }
        inner.closed.store(true, Ordering::Release);
        if let Some(sync) = &inner.sync {
            // A last sync covers every write (a waiter gets its answer), then the thread ends.
            sync.request.lock().stop = true;
            sync.wake.notify_one();
            let handle = sync.handle.lock().take();
            if let Some(handle) = handle
                && handle.join().is_err()
            {
                tracing::warn!("the node database sync thread panicked");
            }
        }
        {
            let mut writer = inner.writer.lock();
            writer.segment = None;
            writer.unsynced.clear();
        }
        if let Some((_, next)) = inner.next.lock().take()
            && let Err(e) = next.remove()
        {
            tracing::warn!("cannot delete an unused journal segment: {e}");
        }
        // Segments waiting for compaction stay on disk for the next open.
        inner.compactor.lock().queue.clear();
        // Waits for a compaction under way.
        drop(inner.redb.lock().take());
        drop(inner.lock_file.lock().take());
    }

    /// Everything in the database now: the tables with every write applied. Compacts the
    /// journal first, except the current segment.
    #[cfg(test)]
    fn contents(&self) -> Result<Snapshot, DbError> {
        let inner = &self.inner;
        let writer = inner.writer.lock();
        inner.drain(false);
        let mut snapshot = match inner.redb.lock().as_ref() {
            Some(db) => load(db).map_err(db_error(&inner.path))?,
            None => return Err(DbError::Closed),
        };
        let mut changes = Changes::default();
        let compactor = inner.compactor.lock();
        for (number, segment) in &compactor.queue {
            changes.add_segment(segment.bytes(), *number);
        }
        if let Some(segment) = &writer.segment {
            changes.add_segment(segment.bytes(), writer.number);
        }
        changes.each(|table, key, value| {
            let rows = snapshot.tables.entry(table).or_default();
            match value {
                Some(value) => rows.insert(key.to_vec(), value.to_vec()),
                None => rows.remove(key),
            };
        });
        Ok(snapshot)
    }

    /// The number of syncs done so far.
    #[cfg(test)]
    fn syncs(&self) -> u64 {
        self.inner
            .sync
            .as_ref()
            .map_or(0, |s| s.syncs.load(Ordering::Relaxed))
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        self.close();
    }
}

impl Inner {
    /// Switches `writer` to the next segment, and hands the full one to compaction. True if
    /// there is no runtime to compact it in: the caller compacts it, after unlocking.
    fn rotate(this: &Arc<Inner>, writer: &mut Writer) -> Result<bool, DbError> {
        let number = writer.number.saturating_add(1);
        let segment = match &this.dir {
            None => {
                // A compacted segment's buffer if there is one: no regrowing it.
                let spare = this.next.lock().take().map(|(_, segment)| segment);
                spare.unwrap_or_else(|| Segment::Memory(Vec::new()))
            }
            Some(dir) => {
                let mut next = this.next.lock();
                let ready = match next.take() {
                    Some((n, segment)) if n == number => Some(segment),
                    Some((_, stale)) => {
                        // Not expected: the slot only ever holds the segment after current.
                        if let Err(e) = stale.remove() {
                            tracing::warn!("cannot delete an unused journal segment: {e}");
                        }
                        None
                    }
                    None => None,
                };
                let segment = match ready {
                    Some(segment) => segment,
                    None => {
                        // Not prepared in time: create it here.
                        let path = dir.join(journal::segment_name(number));
                        Segment::create_mapped(&path, this.segment_len, this.sync.is_some())
                            .map_err(io_error(&path))?
                    }
                };
                this.current.store(number, Ordering::Release);
                segment
            }
        };
        let full = writer.segment.replace(segment);
        let full_number = writer.number;
        writer.number = number;
        writer.pos = 0;
        let Some(full) = full else {
            return Ok(false);
        };
        if this.sync.is_some() {
            if let Some(file) = full.file() {
                writer.unsynced.push(file.clone());
            }
            writer.dir_unsynced = true;
        }
        let mut compactor = this.compactor.lock();
        compactor.queue.push_back((full_number, full));
        if compactor.running {
            return Ok(false);
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                compactor.running = true;
                let job = this.clone();
                drop(runtime.spawn_blocking(move || {
                    // Compaction first: the compacted segment is recycled as the next one.
                    job.drain(true);
                    job.prepare_next();
                }));
                Ok(false)
            }
            Err(_) => Ok(true),
        }
    }

    /// Creates and maps the segment after the current one, unless it is ready.
    fn prepare_next(&self) {
        let Some(dir) = &self.dir else {
            return;
        };
        let mut next = self.next.lock();
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let want = self.current.load(Ordering::Acquire).saturating_add(1);
        if matches!(&*next, Some((n, _)) if *n == want) {
            return;
        }
        if let Some((_, stale)) = next.take()
            && let Err(e) = stale.remove()
        {
            tracing::warn!("cannot delete an unused journal segment: {e}");
        }
        let path = dir.join(journal::segment_name(want));
        match Segment::create_mapped(&path, self.segment_len, self.sync.is_some()) {
            Ok(segment) => *next = Some((want, segment)),
            // The writer will try again when it needs it.
            Err(e) => tracing::warn!("cannot create journal segment {}: {e}", path.display()),
        }
    }

    /// Keeps compacted segment `number` as the next segment, if none is ready, or deletes it.
    /// A recycled file keeps its blocks and its mapped pages: writing it costs no page fault
    /// (see `journal`'s docs for why its old records are never read again).
    fn recycle(&self, number: u64, mut segment: Segment) {
        let kept = match &self.dir {
            Some(dir) => {
                let mut next = self.next.lock();
                let want = self.current.load(Ordering::Acquire).saturating_add(1);
                if self.closed.load(Ordering::Acquire)
                    || matches!(&*next, Some((n, _)) if *n == want)
                {
                    Some(segment)
                } else {
                    let path = dir.join(journal::segment_name(want));
                    match segment.recycle(&path) {
                        Ok(()) => {
                            if let Some((_, stale)) = next.replace((want, segment))
                                && let Err(e) = stale.remove()
                            {
                                tracing::warn!("cannot delete an unused journal segment: {e}");
                            }
                            None
                        }
                        Err(e) => {
                            tracing::debug!("cannot recycle journal segment {number}: {e}");
                            Some(segment)
                        }
                    }
                }
            }
            None => {
                // In memory: its buffer, emptied, is the next segment's.
                let mut next = self.next.lock();
                if next.is_none() && segment.recycle(Path::new("")).is_ok() {
                    *next = Some((number, segment));
                    None
                } else {
                    Some(segment)
                }
            }
        };
        if let Some(segment) = kept
            && let Err(e) = segment.remove()
        {
            // The next open deletes it (it is at or below compacted_through).
            tracing::warn!("cannot delete compacted journal segment {number}: {e}");
        }
    }

    /// Compacts the queued segments, oldest first, until none is left or one fails (it stays
    /// queued, and on disk, for a later try or the next open). `job`: called by the
    /// compaction job, which marks itself done.
    fn drain(&self, job: bool) {
        loop {
            let redb = self.redb.lock();
            let popped = {
                let mut compactor = self.compactor.lock();
                let popped = if redb.is_some() {
                    compactor.queue.pop_front()
                } else {
                    None
                };
                if popped.is_none() && job {
                    compactor.running = false;
                }
                popped
            };
            let (Some(db), Some((number, segment))) = (redb.as_ref(), popped) else {
                return;
            };
            match compact_segment(db, number, segment.bytes()) {
                Ok(()) => {
                    drop(redb);
                    self.recycle(number, segment);
                }
                Err(e) => {
                    tracing::warn!(
                        "cannot compact journal segment {number} into {}: {e}",
                        self.path.display()
                    );
                    let mut compactor = self.compactor.lock();
                    compactor.queue.push_front((number, segment));
                    if job {
                        compactor.running = false;
                    }
                    return;
                }
            }
        }
    }

    /// The sync thread: waits for a request, syncs everything written so far, publishes it.
    fn sync_loop(&self, synced: &watch::Sender<Synced>) {
        let Some(sync) = &self.sync else {
            return;
        };
        loop {
            let stop = {
                let mut request = sync.request.lock();
                while !request.requested && !request.stop {
                    sync.wake.wait(&mut request);
                }
                request.requested = false;
                request.stop
            };
            let (lsn, files, dir_unsynced) = {
                let mut writer = self.writer.lock();
                let mut files = std::mem::take(&mut writer.unsynced);
                if let Some(file) = writer.segment.as_ref().and_then(Segment::file) {
                    files.push(file.clone());
                }
                let dir_unsynced = std::mem::take(&mut writer.dir_unsynced);
                (writer.lsn, files, dir_unsynced)
            };
            let (done, failed) = {
                let state = synced.borrow();
                (state.lsn, state.failed.is_some())
            };
            if !failed && lsn > done {
                let result = self.sync_files(&files, dir_unsynced);
                sync.syncs.fetch_add(1, Ordering::Relaxed);
                synced.send_modify(|state| match result {
                    Ok(()) => state.lsn = lsn,
                    Err(e) => {
                        tracing::warn!("cannot sync the journal in {}: {e}", self.path.display());
                        state.failed = Some((e.kind(), e.to_string()));
                    }
                });
            }
            if stop {
                return;
            }
        }
    }

    fn sync_files(&self, files: &[Arc<File>], dir_unsynced: bool) -> io::Result<()> {
        if dir_unsynced && let Some(dir) = &self.dir {
            File::open(dir)?.sync_all()?;
        }
        for file in files {
            // Also writes back the pages dirtied through the mapping.
            file.sync_data()?;
        }
        Ok(())
    }
}

impl SyncThread {
    fn request(&self) {
        self.request.lock().requested = true;
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    use std::time::Instant;

    use super::*;

    type Model = BTreeMap<Table, BTreeMap<Vec<u8>, Vec<u8>>>;

    /// A deterministic xorshift generator.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn packed_groups_round_trip_and_garbage_does_not_decode() {
        let mut slots = [None; 256];
        slots[0] = Some(&[][..]);
        slots[255] = Some(&[9; 300][..]);
        let mut bytes = Vec::new();
        pack::encode(Some(&[1, 2, 3]), &slots, &mut bytes);
        let (mut bare, mut back) = (None, [None; 256]);
        assert!(pack::decode(&bytes, &mut bare, &mut back));
        assert_eq!((bare, back), (Some(&[1, 2, 3][..]), slots));
        for cut in 1..bytes.len() {
            let (mut bare, mut back) = (None, [None; 256]);
            // A cut inside an entry does not decode; every cut is read without a panic.
            let _ = pack::decode(&bytes[..cut], &mut bare, &mut back);
        }
        let (mut bare, mut back) = (None, [None; 256]);
        assert!(
            !pack::decode(&[2, 7, 7, 0, 0, 0, 0], &mut bare, &mut back),
            "a 2-byte suffix"
        );
        assert!(
            !pack::decode(&[0, 9, 0, 0, 0], &mut bare, &mut back),
            "a value past the end"
        );
        assert_eq!(
            pack::split(b"bob\0\x01\x02"),
            (&b"bob\0\x01"[..], &b"\x02"[..])
        );
        assert_eq!(pack::split(b""), (&b""[..], &b""[..]));
    }

    /// A batch of 1–4 random puts and deletes over a small key space (so they overwrite and
    /// delete each other), applied to `model` too.
    fn random_batch(rng: &mut Rng, model: &mut Model) -> Batch {
        let mut batch = Batch::new();
        for _ in 0..=rng.below(4) {
            let table = Table::ALL[rng.below(5) as usize];
            let key = rng.below(64).to_be_bytes().to_vec();
            // Keys of write-once tables are put only while absent (their writers' contract).
            let present = model
                .get(&table)
                .is_some_and(|rows| rows.contains_key(&key));
            if rng.below(4) == 0 || (present && table.write_once()) {
                batch.delete(table, &key);
                model.entry(table).or_default().remove(&key);
            } else {
                let value = vec![rng.next() as u8; rng.below(200) as usize];
                batch.put(table, &key, &value);
                model.entry(table).or_default().insert(key, value);
            }
        }
        batch
    }

    fn assert_matches(snapshot: &mut Snapshot, model: &Model) {
        for table in Table::ALL {
            let expected = model.get(&table).cloned().unwrap_or_default();
            assert_eq!(snapshot.take(table), expected, "{table:?}");
        }
    }

    fn segment_numbers(dir: &Path) -> Vec<u64> {
        list_segments(dir).unwrap().into_keys().collect()
    }

    /// `compacted_through` in a closed database's `node.redb`.
    fn read_compacted_through(dir: &Path) -> u64 {
        let db = redb::Database::open(dir.join(REDB_FILE)).unwrap();
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(DB_META).unwrap();
        meta.get(COMPACTED_THROUGH)
            .unwrap()
            .map_or(0, |v| v.value())
    }

    /// Waits until no compaction is queued or running.
    fn wait_compacted(db: &Db) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            {
                let compactor = db.inner.compactor.lock();
                if compactor.queue.is_empty() && !compactor.running {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "compaction did not finish");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn batch_encoding() {
        let mut batch = Batch::new();
        assert!(batch.is_empty());
        batch.put(Table::Outbox, b"k", b"v");
        batch.delete(Table::Seen, b"k");
        assert!(!batch.is_empty());
        assert_eq!(
            journal::decode_ops(&batch.bytes).unwrap(),
            vec![
                Op::Put(Table::Outbox, b"k", b"v"),
                Op::Delete(Table::Seen, b"k")
            ]
        );
    }

    #[test]
    fn round_trip_on_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let mut model = Model::new();
        let mut rng = Rng(1);
        for session in 0..4 {
            let (db, mut snapshot) = Db::open(Some(&dir), Durability::Process).unwrap();
            assert_matches(&mut snapshot, &model);
            for _ in 0..300 {
                db.write(&random_batch(&mut rng, &mut model)).unwrap();
            }
            // Alternately close and just drop (as a crash of the handle would).
            if session % 2 == 0 {
                db.close();
                db.close();
            }
            drop(db);
        }
        let (_db, mut snapshot) = Db::open(Some(&dir), Durability::Process).unwrap();
        assert_matches(&mut snapshot, &model);

        use std::os::unix::fs::MetadataExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(LOCK_FILE)), 0o600);
        assert_eq!(mode(&dir.join(REDB_FILE)), 0o600);
        for n in segment_numbers(&dir) {
            assert_eq!(mode(&dir.join(journal::segment_name(n))), 0o600);
        }
    }

    #[test]
    fn memory_mode_compacts_and_scans() {
        let (db, mut snapshot) = Db::open_with(None, Durability::Process, 4096).unwrap();
        assert_matches(&mut snapshot, &Model::new());
        let mut model = Model::new();
        let mut rng = Rng(2);
        let mut last = Written(0);
        for _ in 0..3000 {
            let written = db.write(&random_batch(&mut rng, &mut model)).unwrap();
            assert!(written > last);
            last = written;
        }
        assert!(db.inner.writer.lock().number > 20, "rotated");
        assert_matches(&mut db.contents().unwrap(), &model);
        // In memory everything is durable at once, whatever is asked.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(db.durable(last)).unwrap();
        let (db, _) = Db::open(None, Durability::PowerLoss).unwrap();
        rt.block_on(db.commit(&random_batch(&mut rng, &mut model)))
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_mode_compacts_in_blocking_tasks() {
        let (db, _) = Db::open_with(None, Durability::Process, 4096).unwrap();
        let mut model = Model::new();
        let mut rng = Rng(3);
        for _ in 0..3000 {
            db.write(&random_batch(&mut rng, &mut model)).unwrap();
        }
        wait_compacted(&db);
        assert_matches(&mut db.contents().unwrap(), &model);
    }

    /// Rotates through many segments with `segment_len` 4096, compacting inline (no runtime)
    /// or in blocking tasks; then checks the files and a reopen.
    fn rotation_and_compaction(runtime: bool) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let guard = runtime.then(|| rt.enter());
        let (db, _) = Db::open_with(Some(dir), Durability::Process, 4096).unwrap();
        let mut model = Model::new();
        let mut rng = Rng(4);
        // About 150 bytes a batch: more than 3 segments' worth, many times over.
        for _ in 0..500 {
            db.write(&random_batch(&mut rng, &mut model)).unwrap();
        }
        let current = db.inner.writer.lock().number;
        assert!(current > 10, "rotated {current} times");
        wait_compacted(&db);
        db.close();
        drop(guard);

        let through = read_compacted_through(dir);
        assert_eq!(through, current - 1, "every full segment is compacted");
        let left = segment_numbers(dir);
        assert_eq!(left, vec![current], "only the current segment is left");
        assert!(left.iter().all(|&n| n > through));

        let (db, mut snapshot) = Db::open_with(Some(dir), Durability::Process, 4096).unwrap();
        assert_matches(&mut snapshot, &model);
        // Replayed and deleted; writing goes on after the highest segment seen.
        assert_eq!(segment_numbers(dir), vec![current + 1, current + 2]);
        drop(db);
        assert_eq!(read_compacted_through(dir), current);
    }

    #[test]
    fn rotation_and_compaction_inline() {
        rotation_and_compaction(false);
    }

    #[test]
    fn rotation_and_compaction_in_blocking_tasks() {
        rotation_and_compaction(true);
    }

    #[test]
    fn leftover_segments_are_cleaned_up() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut model = Model::new();
        let mut rng = Rng(5);
        let (db, _) = Db::open(Some(dir), Durability::Process).unwrap();
        for _ in 0..50 {
            db.write(&random_batch(&mut rng, &mut model)).unwrap();
        }
        db.close();
        // A stale segment at or below compacted_through (as left by a crash between the
        // commit of a compaction and the deletion of its file) is deleted, not replayed;
        // foreign names and empty or tiny segments are harmless.
        std::fs::write(dir.join(journal::segment_name(0)), b"stale garbage").unwrap();
        std::fs::write(dir.join("journal-x.log"), b"not ours").unwrap();
        let high = segment_numbers(dir).into_iter().max().unwrap();
        std::fs::write(dir.join(journal::segment_name(high + 1)), b"").unwrap();
        std::fs::write(dir.join(journal::segment_name(high + 2)), b"\x05\x00").unwrap();
        let (db, mut snapshot) = Db::open(Some(dir), Durability::Process).unwrap();
        assert_matches(&mut snapshot, &model);
        assert_eq!(segment_numbers(dir), vec![high + 3, high + 4]);
        assert!(dir.join("journal-x.log").exists());
        drop(db);
    }

    /// Writes `batches` in a fresh directory, closes, and returns the directory, the journal
    /// file holding them (the only one) and where each batch ended in it.
    fn journal_with(batches: &[Batch]) -> (tempfile::TempDir, PathBuf, Vec<u64>) {
        let tmp = tempfile::tempdir().unwrap();
        let (db, _) = Db::open(Some(tmp.path()), Durability::Process).unwrap();
        let ends = batches.iter().map(|b| db.write(b).unwrap().0).collect();
        db.close();
        let numbers = segment_numbers(tmp.path());
        assert_eq!(numbers.len(), 1);
        let path = tmp.path().join(journal::segment_name(numbers[0]));
        (tmp, path, ends)
    }

    fn overwrite(path: &Path, at: u64, bytes: &[u8]) {
        use std::io::{Seek, SeekFrom};
        let mut file = OpenOptions::new().write(true).open(path).unwrap();
        file.seek(SeekFrom::Start(at)).unwrap();
        file.write_all(bytes).unwrap();
    }

    #[test]
    fn torn_tail_is_ignored() {
        let mut model = Model::new();
        let mut rng = Rng(6);
        let batches: Vec<Batch> = (0..20)
            .map(|_| random_batch(&mut rng, &mut model))
            .collect();
        let mut torn = Batch::new();
        torn.put(Table::Outbox, b"torn", &[7; 100]);
        let mut torn_record = Vec::new();
        torn_record.extend_from_slice(&(torn.bytes.len() as u32).to_le_bytes());
        torn_record.extend_from_slice(&crc32fast::hash(&torn.bytes).to_le_bytes());
        torn_record.extend_from_slice(&torn.bytes);

        let mut garbage = vec![0u8; 300];
        garbage.iter_mut().for_each(|b| *b = rng.next() as u8);
        let tails: Vec<(&str, Vec<u8>)> = vec![
            ("garbage", garbage),
            (
                "partial record",
                torn_record[..torn_record.len() / 2].to_vec(),
            ),
            ("length past the segment", {
                let mut r = torn_record.clone();
                r[..4].copy_from_slice(&(SEGMENT_LEN as u32).to_le_bytes());
                r
            }),
            ("checksum mismatch", {
                let mut r = torn_record.clone();
                r[20] ^= 0x40;
                r
            }),
            ("undecodable body", {
                let body = [1u8, 99, 0, 0, 0, 0, 0, 0, 0, 0];
                let mut r = (body.len() as u32).to_le_bytes().to_vec();
                r.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
                r.extend_from_slice(&body);
                r.extend_from_slice(&torn_record);
                r
            }),
        ];
        for (what, tail) in tails {
            let (tmp, path, ends) = journal_with(&batches);
            let end = *ends.last().unwrap();
            overwrite(&path, end, &tail);
            let (db, mut snapshot) = Db::open(Some(tmp.path()), Durability::Process).unwrap();
            assert_matches(&mut snapshot, &model);
            // Writing goes on, and survives the next reopen.
            db.write(&torn).unwrap();
            db.close();
            let (_db, mut snapshot) = Db::open(Some(tmp.path()), Durability::Process).unwrap();
            let mut with_torn = model.clone();
            with_torn
                .entry(Table::Outbox)
                .or_default()
                .insert(b"torn".to_vec(), vec![7; 100]);
            assert_matches(&mut snapshot, &with_torn);
            eprintln!("{what}: ignored");
        }
    }

    #[test]
    fn batch_is_atomic_after_a_torn_write() {
        let mut model = Model::new();
        let mut rng = Rng(7);
        let mut batches: Vec<Batch> = (0..10)
            .map(|_| random_batch(&mut rng, &mut model))
            .collect();
        // The last batch touches every table.
        let mut last = Batch::new();
        for table in Table::ALL {
            last.put(table, b"last", &[table as u8; 50]);
        }
        last.delete(Table::Outbox, &0u64.to_be_bytes());
        batches.push(last);
        let (tmp, path, ends) = journal_with(&batches);
        let (start, end) = (ends[ends.len() - 2], ends[ends.len() - 1]);
        // Cut anywhere inside the last record: none of it is there.
        for cut in [start + 1, start + 8, (start + end) / 2, end - 1] {
            let copy = tempfile::tempdir().unwrap();
            let data = std::fs::read(&path).unwrap();
            let name = path.file_name().unwrap();
            std::fs::write(copy.path().join(name), &data[..cut as usize]).unwrap();
            std::fs::copy(tmp.path().join(REDB_FILE), copy.path().join(REDB_FILE)).unwrap();
            let (_db, mut snapshot) = Db::open(Some(copy.path()), Durability::Process).unwrap();
            assert_matches(&mut snapshot, &model);
        }
        // Uncut, all of it is.
        let (_db, mut snapshot) = Db::open(Some(tmp.path()), Durability::Process).unwrap();
        for table in Table::ALL {
            model
                .entry(table)
                .or_default()
                .insert(b"last".to_vec(), vec![table as u8; 50]);
        }
        model
            .entry(Table::Outbox)
            .or_default()
            .remove(&0u64.to_be_bytes()[..]);
        assert_matches(&mut snapshot, &model);
    }

    #[test]
    fn second_open_is_locked() {
        let tmp = tempfile::tempdir().unwrap();
        let (db, _) = Db::open(Some(tmp.path()), Durability::Process).unwrap();
        for _ in 0..2 {
            match Db::open(Some(tmp.path()), Durability::Process) {
                Err(DbError::Locked { path }) => assert_eq!(path, tmp.path()),
                other => panic!("expected Locked, got {other:?}"),
            }
        }
        db.close();
        let (db, _) = Db::open(Some(tmp.path()), Durability::PowerLoss).unwrap();
        assert!(matches!(
            Db::open(Some(tmp.path()), Durability::Process),
            Err(DbError::Locked { .. })
        ));
        // Dropping releases it too.
        drop(db);
        let (_db, _) = Db::open(Some(tmp.path()), Durability::Process).unwrap();
    }

    #[test]
    #[allow(unsafe_code)]
    fn a_lock_copied_into_a_starting_child_is_waited_for() {
        use std::io::{Read, Write};
        use std::os::unix::net::UnixStream;
        use std::os::unix::process::CommandExt;

        let tmp = tempfile::tempdir().unwrap();
        let (db, _) = Db::open(Some(tmp.path()), Durability::Process).unwrap();
        // A child forked now holds a copy of the lock until it execs; it says when it has
        // forked, then lingers a little before its exec.
        let (mut forked, mut in_child) = UnixStream::pair().unwrap();
        let spawner = std::thread::spawn(move || {
            let mut command = std::process::Command::new("true");
            // SAFETY: the hook runs between fork and exec; it only calls write(2) and
            // nanosleep(2), both async-signal-safe, and allocates nothing.
            unsafe {
                command.pre_exec(move || {
                    in_child.write_all(b"f")?;
                    std::thread::sleep(Duration::from_millis(150));
                    Ok(())
                });
            }
            command.status().unwrap()
        });
        let mut byte = [0];
        forked.read_exact(&mut byte).unwrap();
        drop(db);
        let reopened = Db::open(Some(tmp.path()), Durability::Process);
        assert!(
            reopened.is_ok(),
            "closed but still locked: {:?}",
            reopened.err()
        );
        assert!(spawner.join().unwrap().success());
    }

    #[test]
    fn closed_and_too_large() {
        for dir in [None, Some(tempfile::tempdir().unwrap())] {
            let dir = dir.as_ref().map(|d| d.path());
            let (db, _) = Db::open_with(dir, Durability::Process, 1024).unwrap();
            let mut big = Batch::new();
            big.put(Table::Inbox, b"k", &[0; 1024]);
            assert!(matches!(
                db.write(&big),
                Err(DbError::TooLarge { max: 1016, .. })
            ));
            // The largest batch that fits, twice (the second rotates).
            let mut exact = Batch::new();
            // A put costs 10 bytes, the key and the value.
            exact.put(Table::Inbox, b"k", &[1; 1016 - 10 - 1]);
            assert_eq!(exact.bytes.len(), 1016);
            db.write(&exact).unwrap();
            db.write(&exact).unwrap();
            let empty = db.write(&Batch::new()).unwrap();
            assert_eq!(empty, Written(2 * 1024));
            db.close();
            assert!(matches!(db.write(&exact), Err(DbError::Closed)));
            assert!(matches!(db.write(&Batch::new()), Err(DbError::Closed)));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn power_loss_durable_and_grouped() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let (db, _) = Db::open_with(Some(&dir), Durability::PowerLoss, 64 << 10).unwrap();
        let mut one = Batch::new();
        one.put(Table::Meta, b"one", b"1");
        db.commit(&one).await.unwrap();
        assert_eq!(db.syncs(), 1);
        // Already synced: no new sync.
        db.durable(Written(0)).await.unwrap();
        assert_eq!(db.syncs(), 1);

        const TASKS: u64 = 64;
        const EACH: u64 = 8;
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..TASKS {
            let db = db.clone();
            tasks.spawn(async move {
                for i in 0..EACH {
                    let mut batch = Batch::new();
                    batch.put(Table::Outbox, &(t * EACH + i).to_be_bytes(), &[9; 150]);
                    db.commit(&batch).await.unwrap();
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        let syncs = db.syncs() - 1;
        eprintln!("{} commits, {syncs} syncs", TASKS * EACH);
        assert!((1..TASKS * EACH).contains(&syncs), "{syncs} syncs");

        // A write not awaited yet: closing syncs it.
        let mut last = Batch::new();
        last.put(Table::Meta, b"last", b"2");
        let written = db.write(&last).unwrap();
        db.close();
        db.durable(written).await.unwrap();
        assert!(matches!(db.commit(&last).await, Err(DbError::Closed)));
        drop(db);

        let (_db, mut snapshot) = Db::open(Some(&dir), Durability::PowerLoss).unwrap();
        assert_eq!(snapshot.take(Table::Outbox).len() as u64, TASKS * EACH);
        assert_eq!(snapshot.take(Table::Meta).len(), 2);
    }

    const CHILD_ENV: &str = "P2PCHAT_DB_CHILD";
    /// Small segments, so a killed child is usually between rotations and compactions.
    const KILL_SEGMENT_LEN: usize = 64 << 10;

    fn kill_value(i: u64) -> Vec<u8> {
        let mut value = i.to_be_bytes().repeat(19);
        value.truncate(150);
        value
    }

    fn kill_batch(i: u64) -> Batch {
        let mut batch = Batch::new();
        batch.put(Table::Outbox, &i.to_be_bytes(), &kill_value(i));
        batch.put(Table::Meta, b"last", &i.to_be_bytes());
        batch.put(Table::Seen, &i.to_be_bytes(), b"");
        if let Some(previous) = i.checked_sub(1) {
            batch.delete(Table::Seen, &previous.to_be_bytes());
        }
        batch
    }

    /// Writes numbered batches until `count` or `out` fails, printing each number once its
    /// write returned.
    fn write_numbered(dir: &Path, count: u64, out: &mut dyn Write) {
        let (db, _) = Db::open_with(Some(dir), Durability::Process, KILL_SEGMENT_LEN).unwrap();
        for i in 0..count {
            db.write(&kill_batch(i)).unwrap();
            if writeln!(out, "{i}").and_then(|()| out.flush()).is_err() {
                return;
            }
        }
    }

    /// Checks that every batch `0..written` is in `dir`; returns how many are present.
    fn check_numbered(dir: &Path, written: u64) -> u64 {
        let (db, mut snapshot) = Db::open(Some(dir), Durability::Process).unwrap();
        let outbox = snapshot.take(Table::Outbox);
        let meta = snapshot.take(Table::Meta);
        let seen = snapshot.take(Table::Seen);
        let last = meta
            .get(&b"last"[..])
            .map(|v| u64::from_be_bytes(v.as_slice().try_into().unwrap()));
        if written > 0 {
            let last = last.expect("a last number");
            assert!(last + 1 >= written, "last {last}, written {written}");
            // The batch's ops are all there or none: Seen holds exactly the last number.
            assert_eq!(seen.keys().collect::<Vec<_>>(), vec![&last.to_be_bytes()]);
            assert_eq!(outbox.len() as u64, last + 1);
        }
        let present = (0..written)
            .filter(|&i| outbox.get(&i.to_be_bytes()[..]) == Some(&kill_value(i)))
            .count() as u64;
        drop(db);
        present
    }

    /// The child of [`killed_process_loses_nothing`]; run alone, the same workload in process.
    #[test]
    fn kill_child() {
        let Some(dir) = std::env::var_os(CHILD_ENV) else {
            let tmp = tempfile::tempdir().unwrap();
            write_numbered(tmp.path(), 2000, &mut io::sink());
            assert_eq!(check_numbered(tmp.path(), 2000), 2000);
            return;
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _guard = rt.enter();
        write_numbered(Path::new(&dir), u64::MAX, &mut io::stdout().lock());
    }

    #[test]
    fn killed_process_loses_nothing() {
        for round in 0..3 {
            let tmp = tempfile::tempdir().unwrap();
            let kill_after: u64 = rand::random_range(1_000..=20_000);
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "node::db::tests::kill_child", "--nocapture"])
                .args(["--test-threads", "1"])
                .env(CHILD_ENV, tmp.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            let stdout = child.stdout.take().unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            let reader = std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    // The harness may print "test ... " before the first number.
                    let last = line.split_whitespace().next_back().unwrap_or("");
                    if let Ok(n) = last.parse::<u64>()
                        && tx.send(n).is_err()
                    {
                        break;
                    }
                }
            });
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut written = 0;
            let mut killed = false;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(n) => {
                        assert_eq!(n, written, "numbers in order");
                        written += 1;
                        if written == kill_after && !killed {
                            child.kill().unwrap();
                            killed = true;
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        let _ = child.kill();
                        panic!("the child wrote {written} batches in time");
                    }
                }
            }
            let status = child.wait().unwrap();
            reader.join().unwrap();
            assert!(
                killed,
                "the child ended by itself after {written}: {status}"
            );
            let present = check_numbered(tmp.path(), written);
            let lost = written - present;
            eprintln!(
                "round {round}: killed after {kill_after}: written {written}, present {present}, lost {lost}"
            );
            assert_eq!(lost, 0);
        }
    }
}
