//! The journal format, and the segments it is written to.
//!
//! A segment is a fixed-length file (or, in memory, a growing `Vec<u8>`) holding records
//! back to back, the rest of the file zero:
//!
//! ```text
//! record = [len: u32 LE][checksum: u32 LE][body: len bytes]
//! checksum = crc32(body) XOR salt(segment number)
//! body   = op*                       (the ops of one Batch, in order)
//! op     = [1][table u8][key len u32 LE][key][value len u32 LE][value]    put
//!        | [2][table u8][key len u32 LE][key]                             delete
//! ```
//!
//! Reading stops at the first record that is not whole and intact: a zero length (the unused
//! rest of a segment), a length running past the segment, a checksum mismatch or a body that
//! does not decode. That is where a write torn by a crash ended; a batch is one record, so it
//! is there entirely or not at all.
//!
//! Segment files are recycled: a compacted segment is renamed to a later number and written
//! over from the start, its pages still mapped (no page faults, no block allocation). What
//! follows the new records is then the old records, intact but salted with the old number:
//! their checksums fail under the new one, so reading stops there as at a zero tail (the
//! recyclable log format of LevelDB and RocksDB, with the number in the checksum).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Advice, MmapMut};

use super::Table;

/// A mapped segment's pages are allocated and mapped this many bytes at a time, ahead of the
/// writes (`MADV_POPULATE_WRITE`): one system call instead of a page fault per 4 KiB, and a
/// full file system is an error there rather than a SIGBUS at the write. Default: 256 KiB.
const POPULATE_CHUNK: usize = 256 << 10;

/// Bytes before a record's body: its length and its checksum.
pub(super) const HEADER_LEN: usize = 8;

const PUT: u8 = 1;
const DELETE: u8 = 2;

/// The file name of segment `number`.
pub(super) fn segment_name(number: u64) -> String {
    format!("journal-{number:020}.log")
}

/// The segment number in a file name written by [`segment_name`], if it is one.
pub(super) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("journal-")?.strip_suffix(".log")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The checksum of a record of segment `number` with this body: its CRC-32, XORed with a
/// salt that differs for every segment number (mod 2^32), so that a record left over from an
/// earlier use of a recycled file never checks out.
pub(super) fn checksum(number: u64, body: &[u8]) -> u32 {
    crc32fast::hash(body) ^ salt(number)
}

/// The salt of segment `number`'s checksums.
pub(super) fn salt(number: u64) -> u32 {
    // An odd multiplier is a bijection on u32: distinct numbers, distinct salts.
    (number as u32).wrapping_mul(0x9E37_79B1)
}

/// Appends a put op to an encoded batch.
pub(super) fn encode_put(out: &mut Vec<u8>, table: Table, key: &[u8], value: &[u8]) {
    out.reserve(1 + 1 + 4 + key.len() + 4 + value.len());
    out.push(PUT);
    out.push(table as u8);
    push_bytes(out, key);
    push_bytes(out, value);
}

/// Appends the start of a put op whose value follows: the caller appends the value, then
/// calls [`end_put`] with the returned position of its length.
pub(super) fn begin_put(out: &mut Vec<u8>, table: Table, key: &[u8]) -> usize {
    out.push(PUT);
    out.push(table as u8);
    push_bytes(out, key);
    let len_at = out.len();
    out.extend_from_slice(&[0; 4]);
    len_at
}

/// Ends a put op begun by [`begin_put`]: writes the length of the value appended since.
pub(super) fn end_put(out: &mut [u8], len_at: usize) {
    let len = u32::try_from(out.len() - len_at - 4).unwrap_or(u32::MAX);
    out[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
}

/// Appends a delete op to an encoded batch.
pub(super) fn encode_delete(out: &mut Vec<u8>, table: Table, key: &[u8]) {
    out.reserve(1 + 1 + 4 + key.len());
    out.push(DELETE);
    out.push(table as u8);
    push_bytes(out, key);
}

fn push_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // A batch is limited to a segment (far below 4 GiB) when written; a longer field would
    // be refused there as too large, so saturating here cannot produce a valid record.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

/// One change, borrowing from the journal bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op<'a> {
    Put(Table, &'a [u8], &'a [u8]),
    Delete(Table, &'a [u8]),
}

/// The ops of one encoded batch, or `None` if it does not decode (it never panics).
#[cfg(test)]
pub(super) fn decode_ops(body: &[u8]) -> Option<Vec<Op<'_>>> {
    let mut ops = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        ops.push(decode_op(&mut rest)?);
    }
    Some(ops)
}

/// Whether a whole batch decodes.
fn decodes(mut body: &[u8]) -> bool {
    while !body.is_empty() {
        if decode_op(&mut body).is_none() {
            return false;
        }
    }
    true
}

/// Decodes the op at the start of `body` and moves past it.
fn decode_op<'a>(body: &mut &'a [u8]) -> Option<Op<'a>> {
    let (&kind, rest) = body.split_first()?;
    let (&table, rest) = rest.split_first()?;
    let table = Table::from_u8(table)?;
    let (key, rest) = take_bytes(rest)?;
    let (op, rest) = match kind {
        PUT => {
            let (value, rest) = take_bytes(rest)?;
            (Op::Put(table, key, value), rest)
        }
        DELETE => (Op::Delete(table, key), rest),
        _ => return None,
    };
    *body = rest;
    Some(op)
}

/// The ops of a batch that decodes whole ([`records`] yields only those), in order.
#[derive(Debug, Clone)]
pub(super) struct Ops<'a> {
    body: &'a [u8],
}

impl<'a> Iterator for Ops<'a> {
    type Item = Op<'a>;

    fn next(&mut self) -> Option<Op<'a>> {
        decode_op(&mut self.body)
    }
}

fn take_bytes(input: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = input.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
    if len > rest.len() {
        return None;
    }
    Some(rest.split_at(len))
}

/// The batches in the bytes of segment `number`, in order, up to the first record that is
/// not intact.
pub(super) fn records(segment: &[u8], number: u64) -> Records<'_> {
    Records {
        segment,
        number,
        pos: 0,
    }
}

/// Reads the file of segment `number` up to the end of its intact records, without reading
/// the unused rest of it.
pub(super) fn read_segment(mut file: impl Read, number: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut end = 0;
    loop {
        if !fill(&mut file, &mut bytes, end + HEADER_LEN)? {
            break;
        }
        let Some((len, crc)) = header_at(&bytes, end) else {
            break;
        };
        if len == 0 || !fill(&mut file, &mut bytes, end + HEADER_LEN + len)? {
            break;
        }
        let body = &bytes[end + HEADER_LEN..end + HEADER_LEN + len];
        if checksum(number, body) != crc {
            break;
        }
        end += HEADER_LEN + len;
    }
    bytes.truncate(end);
    Ok(bytes)
}

/// Reads until `bytes` holds `want` bytes; false at the end of the file before.
fn fill(file: &mut impl Read, bytes: &mut Vec<u8>, want: usize) -> io::Result<bool> {
    const CHUNK: usize = 64 << 10;
    while bytes.len() < want {
        let more = (want - bytes.len()).max(CHUNK);
        let more = u64::try_from(more).map_err(io::Error::other)?;
        if file.by_ref().take(more).read_to_end(bytes)? == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The length and checksum in the record header at `pos`.
fn header_at(segment: &[u8], pos: usize) -> Option<(usize, u32)> {
    let header = segment.get(pos..)?.first_chunk::<HEADER_LEN>()?;
    let (len, crc) = header.split_at(4);
    let len = u32::from_le_bytes(len.try_into().ok()?);
    let crc = u32::from_le_bytes(crc.try_into().ok()?);
    Some((usize::try_from(len).ok()?, crc))
}

/// Iterator of [`records`].
#[derive(Debug)]
pub(super) struct Records<'a> {
    segment: &'a [u8],
    number: u64,
    pos: usize,
}

impl<'a> Records<'a> {
    /// Where the intact records read so far end.
    #[cfg(test)]
    pub(super) fn position(&self) -> usize {
        self.pos
    }

    fn next_record(&self) -> Option<(Ops<'a>, usize)> {
        let (len, crc) = header_at(self.segment, self.pos)?;
        let rest = self.segment.get(self.pos + HEADER_LEN..)?;
        if len == 0 || len > rest.len() {
            return None;
        }
        let body = &rest[..len];
        if checksum(self.number, body) != crc {
            return None;
        }
        if !decodes(body) {
            return None;
        }
        Some((Ops { body }, HEADER_LEN + len))
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Ops<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.next_record() {
            Some((ops, len)) => {
                self.pos += len;
                Some(ops)
            }
            None => {
                // Everything after a bad record is the torn tail: stop for good.
                self.segment = &[];
                None
            }
        }
    }
}

/// A journal segment being written, or waiting for compaction.
pub(super) enum Segment {
    /// A file of the data directory, mapped shared: what is copied into the map is in the
    /// page cache, and reaches the file without a system call.
    Mapped {
        path: PathBuf,
        /// Kept open only to sync it ([`super::Durability::PowerLoss`]): the map does not
        /// need it, and a node has two file descriptors fewer without.
        file: Option<Arc<File>>,
        map: MmapMut,
        /// The map's pages before this offset are allocated and mapped writable.
        populated: usize,
    },
    /// In memory, grown as written.
    Memory(Vec<u8>),
}

impl Segment {
    /// Creates segment file `path`, `len` bytes of zeros (sparse), and maps it; keeps the
    /// file open if `keep_file` (to sync it).
    ///
    /// Sparse, a segment costs disk space only as it is written, which matters with many
    /// nodes in one process: [`Segment::reserve`] allocates it a chunk at a time, ahead of
    /// the writes.
    pub(super) fn create_mapped(path: &Path, len: usize, keep_file: bool) -> io::Result<Segment> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        let len64 = u64::try_from(len).map_err(io::Error::other)?;
        file.set_len(len64)?;
        let map = map_segment(&file)?;
        Ok(Segment::Mapped {
            path: path.to_owned(),
            file: keep_file.then(|| Arc::new(file)),
            map,
            populated: 0,
        })
    }

    /// Makes sure the bytes before `end` can be written: allocates the file's blocks and maps
    /// its pages a chunk at a time. An error (the file system is full) leaves the segment as
    /// it was; without this, the write to an unallocated page of a full file system would
    /// kill the process with SIGBUS. A kernel without `MADV_POPULATE_WRITE` (before Linux
    /// 5.14) leaves pages to be faulted in as they are written.
    pub(super) fn reserve(&mut self, end: usize) -> io::Result<()> {
        let Segment::Mapped { map, populated, .. } = self else {
            return Ok(());
        };
        if end <= *populated {
            return Ok(());
        }
        let to = end.max(*populated + POPULATE_CHUNK).min(map.len());
        match map.advise_range(Advice::PopulateWrite, *populated, to - *populated) {
            Ok(()) => {
                *populated = to;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                *populated = map.len();
                Ok(())
            }
            Err(e) => Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!("cannot allocate space for the journal (is the disk full?): {e}"),
            )),
        }
    }

    /// Copies a record (header, then `body`) to offset `pos`, the end of the records written
    /// so far. False (and nothing written) if it does not fit: the caller checks first.
    #[must_use]
    pub(super) fn write_record(
        &mut self,
        pos: usize,
        header: &[u8; HEADER_LEN],
        body: &[u8],
    ) -> bool {
        match self {
            Segment::Mapped { map, .. } => {
                let Some(dst) = map.get_mut(pos..pos + HEADER_LEN + body.len()) else {
                    return false;
                };
                let (head, rest) = dst.split_at_mut(HEADER_LEN);
                head.copy_from_slice(header);
                rest.copy_from_slice(body);
                true
            }
            Segment::Memory(bytes) => {
                if bytes.len() != pos {
                    return false;
                }
                bytes.extend_from_slice(header);
                bytes.extend_from_slice(body);
                true
            }
        }
    }

    /// The segment's bytes (for a file, all of it, zeros after the last record).
    pub(super) fn bytes(&self) -> &[u8] {
        match self {
            Segment::Mapped { map, .. } => map,
            Segment::Memory(bytes) => bytes,
        }
    }

    /// The segment's file, if it has one.
    pub(super) fn file(&self) -> Option<&Arc<File>> {
        match self {
            Segment::Mapped { file, .. } => file.as_ref(),
            Segment::Memory(_) => None,
        }
    }

    /// Renames a compacted segment's file to `to`, to be written over from the start as a
    /// later segment (see the module docs). The map stays, its pages populated.
    pub(super) fn recycle(&mut self, to: &Path) -> io::Result<()> {
        match self {
            Segment::Mapped { path, .. } => {
                std::fs::rename(&*path, to)?;
                *path = to.to_owned();
                Ok(())
            }
            Segment::Memory(bytes) => {
                bytes.clear();
                Ok(())
            }
        }
    }

    /// Drops the segment and deletes its file: for a segment that is compacted, or that
    /// never held a record.
    pub(super) fn remove(self) -> io::Result<()> {
        match self {
            Segment::Mapped {
                path, file, map, ..
            } => {
                drop(map);
                drop(file);
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                }
            }
            Segment::Memory(_) => Ok(()),
        }
    }
}

/// Maps a segment file shared and writable. The one use of `unsafe` in the crate.
#[allow(unsafe_code)]
fn map_segment(file: &File) -> io::Result<MmapMut> {
    // SAFETY: a mapping is undefined behaviour if the file is changed or shrunk behind it.
    // This file was just created by this process, 0600, in its private data directory
    // (0700), which it holds under the exclusive `node.lock`: no other process modifies it.
    // This process never truncates or resizes a segment while it is mapped (its length is
    // set once, before mapping), writes it only through this map (renaming it to recycle it
    // changes no byte), and reads or deletes it otherwise only once the map is dropped or in
    // a later open.
    unsafe { MmapMut::map_mut(file) }
}

impl Table {
    /// The table of a discriminant read from disk.
    pub(super) fn from_u8(value: u8) -> Option<Table> {
        Some(match value {
            1 => Table::Outbox,
            2 => Table::Inbox,
            3 => Table::Held,
            4 => Table::Seen,
            5 => Table::Meta,
            6 => Table::History,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&u32::try_from(body.len()).unwrap().to_le_bytes());
        out.extend_from_slice(&checksum(1, body).to_le_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn ops_round_trip() {
        let mut body = Vec::new();
        encode_put(&mut body, Table::Outbox, b"k1", b"v1");
        encode_delete(&mut body, Table::Seen, b"k2");
        encode_put(&mut body, Table::Meta, b"", b"");
        assert_eq!(
            decode_ops(&body).unwrap(),
            vec![
                Op::Put(Table::Outbox, b"k1", b"v1"),
                Op::Delete(Table::Seen, b"k2"),
                Op::Put(Table::Meta, b"", b""),
            ]
        );
        assert_eq!(decode_ops(&[]).unwrap(), vec![]);
    }

    #[test]
    fn a_put_begun_and_ended_encodes_as_a_put() {
        let mut whole = Vec::new();
        encode_put(&mut whole, Table::Inbox, b"key", b"value");
        let mut parts = Vec::new();
        let len_at = begin_put(&mut parts, Table::Inbox, b"key");
        parts.extend_from_slice(b"value");
        end_put(&mut parts, len_at);
        assert_eq!(parts, whole);
    }

    #[test]
    fn garbage_never_decodes_to_a_panic() {
        let mut body = Vec::new();
        encode_put(&mut body, Table::Inbox, b"key", b"value");
        // Every truncation fails cleanly; so do unknown kinds and tables, and huge lengths.
        for cut in 1..body.len() {
            assert!(decode_ops(&body[..cut]).is_none(), "cut at {cut}");
        }
        assert!(decode_ops(&[9, 1, 0, 0, 0, 0]).is_none());
        assert!(decode_ops(&[1, 9, 0, 0, 0, 0, 0, 0, 0, 0]).is_none());
        assert!(decode_ops(&[2, 1, 0xff, 0xff, 0xff, 0xff]).is_none());
        // Pseudo-random bytes, with and without a valid checksum around them.
        let mut x = 0x1234_5678_9abc_def0_u64;
        for len in 0..2000 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = decode_ops(&bytes);
            let _ = records(&bytes, 1).count();
            let _ = records(&record(&bytes), 1).count();
        }
    }

    #[test]
    fn records_stop_at_the_first_bad_one() {
        let mut a = Vec::new();
        encode_put(&mut a, Table::Outbox, b"a", b"1");
        let mut b = Vec::new();
        encode_delete(&mut b, Table::Held, b"b");
        let mut segment = record(&a);
        segment.extend(record(&b));
        let good = segment.len();
        assert_eq!(records(&segment, 1).count(), 2);

        // Zero tail (the unused rest of a file).
        let mut zeros = segment.clone();
        zeros.resize(good + 100, 0);
        let mut it = records(&zeros, 1);
        assert_eq!(it.by_ref().count(), 2);
        assert_eq!(it.position(), good);
        assert!(it.next().is_none());

        // Bad checksum, then a good record: the good one is not read.
        let mut bad = segment.clone();
        let mut third = record(b"\x02\x01\x00\x00\x00\x00");
        third[4] ^= 1;
        bad.extend(third);
        bad.extend(record(&a));
        assert_eq!(records(&bad, 1).count(), 2);

        // Length past the end.
        let mut long = segment.clone();
        long.extend_from_slice(&1000u32.to_le_bytes());
        long.extend_from_slice(&[0; 20]);
        assert_eq!(records(&long, 1).count(), 2);

        // Intact checksum around a body that does not decode.
        let mut undecodable = segment.clone();
        undecodable.extend(record(&[7, 7, 7]));
        assert_eq!(records(&undecodable, 1).count(), 2);

        // A partial header.
        let mut partial = segment;
        partial.extend_from_slice(&[5, 0, 0]);
        assert_eq!(records(&partial, 1).count(), 2);
    }

    #[test]
    fn records_of_an_earlier_use_of_a_recycled_file_are_not_read() {
        let salted = |number: u64, body: &[u8]| {
            let mut out = u32::try_from(body.len()).unwrap().to_le_bytes().to_vec();
            out.extend_from_slice(&checksum(number, body).to_le_bytes());
            out.extend_from_slice(body);
            out
        };
        let mut old = Vec::new();
        encode_put(&mut old, Table::Inbox, b"old", b"value");
        let mut new = Vec::new();
        encode_delete(&mut new, Table::Outbox, b"new");
        // Segment 7's file, recycled as segment 9: one new record over the first old one,
        // then old records, intact under 7's salt.
        let mut file = salted(9, &old);
        file.extend(salted(7, &old));
        file.extend(salted(7, &old));
        assert_eq!(records(&file, 9).count(), 1);
        assert_eq!(records(&file, 7).count(), 0);
        assert_eq!(read_segment(&file[..], 9).unwrap(), salted(9, &old));
        let mut overwritten = salted(9, &new);
        overwritten.extend(salted(7, &old));
        let ops: Vec<Vec<_>> = records(&overwritten, 9).map(Iterator::collect).collect();
        assert_eq!(ops, vec![vec![Op::Delete(Table::Outbox, b"new")]]);
        // Numbers 2^32 apart share a salt; nothing nearer does.
        assert_ne!(salt(1), salt(2));
        assert_eq!(salt(5), salt(5 + (1 << 32)));
        assert_ne!(salt(0), salt(u64::from(u32::MAX)));
    }

    #[test]
    fn read_segment_stops_at_the_records_end() {
        let mut segment = Vec::new();
        // Records straddling read chunks, one with a long run of zeros in its value.
        for len in [10, 70_000, 0, 200_000, 5] {
            let mut body = Vec::new();
            encode_put(&mut body, Table::Inbox, b"k", &vec![0; len]);
            segment.extend(record(&body));
        }
        let end = segment.len();
        assert_eq!(read_segment(&segment[..], 1).unwrap(), segment);
        let mut sparse = segment.clone();
        sparse.resize(1 << 20, 0);
        assert_eq!(read_segment(&sparse[..], 1).unwrap(), segment);
        let mut torn = segment.clone();
        torn.extend(&record(b"\x02\x01\x00\x00\x00\x00")[..9]);
        assert_eq!(read_segment(&torn[..], 1).unwrap().len(), end);
        let mut huge = segment.clone();
        huge.extend_from_slice(&[0xff; 8]);
        assert_eq!(read_segment(&huge[..], 1).unwrap().len(), end);
        assert!(read_segment(&[][..], 1).unwrap().is_empty());
        assert!(read_segment(&[1, 0][..], 1).unwrap().is_empty());
    }

    #[test]
    fn segment_names() {
        assert_eq!(parse_segment_name(&segment_name(0)), Some(0));
        assert_eq!(parse_segment_name(&segment_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_segment_name("journal-12.log"), Some(12));
        for bad in [
            "journal-.log",
            "journal-1x.log",
            "journal-+1.log",
            "journal-1.log.tmp",
            "node.redb",
            "journal-99999999999999999999999.log",
        ] {
            assert_eq!(parse_segment_name(bad), None, "{bad}");
        }
    }
}
