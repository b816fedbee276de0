//! Operator snapshots: a member's key-value state written out as a stream of
//! chunks (etcd's `Maintenance.Snapshot`, so `etcdctl snapshot save` writes a
//! file), and read back into the data directory of a new member
//! (`cellplane snapshot restore`).
//!
//! The file format, version 1 (integers big-endian):
//!
//! ```text
//! magic     "cellplane-snapshot v1\n"                    (22 bytes)
//! records   one of
//!             0x01 len:u8 name             column family: the records after it belong to it
//!             0x02 klen:u32 key vlen:u32 value   one key-value pair of that column family
//!             0x03 revision:i64 compacted:i64    end: the state's revision and compaction revision
//! padding   zero bytes up to a multiple of 512
//! trailer   SHA-256 of every byte before it            (32 bytes)
//! ```
//!
//! The padding is for `etcdctl snapshot save`, which accepts a download only if
//! it is whole 512-byte pages and a 32-byte SHA-256 (etcd's own layout).
//!
//! It holds the state-machine column families (current keys, history, leases,
//! alarms) as one RocksDB snapshot saw them, and nothing of Raft: a restored
//! member starts a new Raft group whose first revision follows the snapshot's.
//! Alarms are not restored (they name the old cell's members).
//!
//! Memory is bounded on both sides: export holds one chunk and one record at a
//! time (the caller bounds how many chunks wait to be sent); import holds one
//! record and one write batch of at most [`IMPORT_BATCH_BYTES`].

use std::io::Read;
use std::path::Path;

use rocksdb::{IteratorMode, ReadOptions, WriteBatch};
use sha2::{Digest, Sha256};

use crate::db::{CF_ALARM, CF_META, CF_OWNER, SM_CFS, Store};
use crate::error::KvError;
use crate::mvcc::{KEY_COMPACTED, KEY_REVISION, read_i64};

const MAGIC: &[u8; 22] = b"cellplane-snapshot v1\n";
const TAG_CF: u8 = 1;
const TAG_PAIR: u8 = 2;
const TAG_END: u8 = 3;

/// Largest key or value a snapshot may hold: far above anything a cell stores
/// (requests are at most a few MiB), low enough that a damaged length cannot make
/// a restore allocate without bound.
pub const MAX_RECORD_BYTES: u32 = 64 << 20;

/// How much a restore buffers before writing to RocksDB.
pub const IMPORT_BATCH_BYTES: usize = 4 << 20;

/// What a snapshot held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnapshotSummary {
    pub revision: i64,
    pub compacted: i64,
    /// Key-value pairs, over every column family.
    pub pairs: u64,
    /// Bytes of the whole file, trailer included.
    pub bytes: u64,
}

/// Why a snapshot could not be written or read back.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("storage error: {0}")]
    Storage(#[from] KvError),
    #[error("cannot read the snapshot: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a cellplane snapshot (bad magic): etcd's snapshots cannot be restored here")]
    NotASnapshot,
    #[error("the snapshot is damaged: {0}")]
    Damaged(String),
    #[error("the snapshot's checksum does not match: the file is damaged or truncated")]
    Checksum,
    #[error("{0} already holds a store: restore into an empty directory")]
    NotEmpty(String),
    /// The receiver went away: the export stopped.
    #[error("the snapshot's receiver went away")]
    Abandoned,
}

/// Writes `store`'s state as one consistent snapshot, handing chunks of
/// `chunk_bytes` (the last one shorter) to `send` in order, with whether it is
/// the last; `send` returning false stops the export (the receiver is gone).
/// Reads RocksDB: run it off the async runtime.
pub fn export(
    store: &Store,
    chunk_bytes: usize,
    send: impl FnMut(Vec<u8>, bool) -> bool,
) -> Result<SnapshotSummary, SnapshotError> {
    let snap = store.read_view()?;
    export_at(store, &snap, chunk_bytes, send)
}

/// [`export`] of the state `snap` sees.
pub(crate) fn export_at(
    store: &Store,
    snap: &rocksdb::SnapshotWithThreadMode<'_, rocksdb::DB>,
    chunk_bytes: usize,
    mut send: impl FnMut(Vec<u8>, bool) -> bool,
) -> Result<SnapshotSummary, SnapshotError> {
    let opts = || {
        let mut o = ReadOptions::default();
        o.set_snapshot(snap);
        // One pass over everything: keep it out of the block cache.
        o.fill_cache(false);
        o
    };
    let mut out = Chunker {
        buf: Vec::with_capacity(chunk_bytes.min(16 << 20)),
        chunk_bytes: chunk_bytes.max(1),
        hash: Sha256::new(),
        send: &mut send,
        summary: SnapshotSummary::default(),
    };
    out.write(MAGIC)?;
    for name in SM_CFS {
        out.write(&[TAG_CF, name.len() as u8])?;
        out.write(name.as_bytes())?;
        for item in store
            .db
            .iterator_cf_opt(store.cf(name), opts(), IteratorMode::Start)
        {
            let (k, v) = item.map_err(KvError::from)?;
            out.write(&[TAG_PAIR])?;
            out.write(&(k.len() as u32).to_be_bytes())?;
            out.write(&k)?;
            out.write(&(v.len() as u32).to_be_bytes())?;
            out.write(&v)?;
            out.summary.pairs += 1;
        }
    }
    let revision = read_i64(store, &opts(), KEY_REVISION)?;
    let compacted = read_i64(store, &opts(), KEY_COMPACTED)?;
    out.write(&[TAG_END])?;
    out.write(&revision.to_be_bytes())?;
    out.write(&compacted.to_be_bytes())?;
    out.summary.revision = revision;
    out.summary.compacted = compacted;
    let pad = padding(out.summary.bytes);
    out.write(&vec![0u8; pad])?;
    out.finish()
}

struct Chunker<'a, F: FnMut(Vec<u8>, bool) -> bool> {
    buf: Vec<u8>,
    chunk_bytes: usize,
    hash: Sha256,
    send: &'a mut F,
    summary: SnapshotSummary,
}

impl<F: FnMut(Vec<u8>, bool) -> bool> Chunker<'_, F> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), SnapshotError> {
        self.hash.update(bytes);
        self.summary.bytes += bytes.len() as u64;
        let mut rest = bytes;
        while !rest.is_empty() {
            let room = self.chunk_bytes - self.buf.len();
            let (now, later) = rest.split_at(room.min(rest.len()));
            self.buf.extend_from_slice(now);
            rest = later;
            if self.buf.len() == self.chunk_bytes {
                self.flush(false)?;
            }
        }
        Ok(())
    }

    fn flush(&mut self, last: bool) -> Result<(), SnapshotError> {
        let next = if last {
            Vec::new()
        } else {
            Vec::with_capacity(self.chunk_bytes.min(16 << 20))
        };
        let full = std::mem::replace(&mut self.buf, next);
        if (self.send)(full, last) {
            Ok(())
        } else {
            Err(SnapshotError::Abandoned)
        }
    }

    fn finish(mut self) -> Result<SnapshotSummary, SnapshotError> {
        let digest = std::mem::take(&mut self.hash).finalize();
        self.buf.extend_from_slice(&digest);
        self.summary.bytes += digest.len() as u64;
        self.flush(true)?;
        Ok(self.summary)
    }
}

/// Reads a snapshot from `input` into a new store at `dir`, which must not exist
/// or be empty. The store is built beside it (`<dir>.partial`) and renamed into
/// place only once the format and the checksum have been checked, so a restore
/// that fails or is killed never leaves a store a member could start from.
pub fn import(dir: &Path, input: impl Read) -> Result<SnapshotSummary, SnapshotError> {
    let occupied = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
    if occupied {
        return Err(SnapshotError::NotEmpty(dir.display().to_string()));
    }
    let mut partial = dir.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    // Left by a restore that was killed: ours by its name.
    if partial.exists() {
        std::fs::remove_dir_all(&partial)?;
    }
    match import_into(&partial, input) {
        Ok(summary) => {
            std::fs::rename(&partial, dir)?;
            Ok(summary)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            Err(e)
        }
    }
}

fn import_into(dir: &Path, input: impl Read) -> Result<SnapshotSummary, SnapshotError> {
    let store = crate::open(dir).map_err(|e| KvError::Storage(e.to_string()))?;
    // The old cell's alarms name its members, not the new cell's, and the map it
    // learned names the old cell: a restored cell starts with no alarm and serves
    // every tenant until a map is pushed to it.
    let (summary, mut batch) =
        load_records(&store, input, |name| name != CF_ALARM && name != CF_OWNER)?;
    let meta = store.cf(CF_META);
    batch.put_cf(meta, KEY_REVISION, summary.revision.to_be_bytes());
    batch.put_cf(meta, KEY_COMPACTED, summary.compacted.to_be_bytes());
    let mut opts = rocksdb::WriteOptions::default();
    opts.set_sync(true);
    store.db.write_opt(batch, &opts).map_err(KvError::from)?;
    Ok(summary)
}

/// Writes the pairs of the snapshot in `input` whose column family `keep`s
/// into `store`, in write batches of [`IMPORT_BATCH_BYTES`] (not synced).
/// Returns the summary and the last batch, not written yet: the caller adds
/// its meta to it and writes it synced.
pub(crate) fn load_records(
    store: &Store,
    input: impl Read,
    keep: impl Fn(&str) -> bool,
) -> Result<(SnapshotSummary, WriteBatch), SnapshotError> {
    let mut batch = WriteBatch::default();
    let summary = read_records(input, |name, key, value| {
        if !keep(name) {
            return Ok(());
        }
        batch.put_cf(store.cf(name), key, value);
        if batch.size_in_bytes() >= IMPORT_BATCH_BYTES {
            store
                .db
                .write(std::mem::take(&mut batch))
                .map_err(KvError::from)?;
        }
        Ok(())
    })?;
    Ok((summary, batch))
}

/// Reads a snapshot from `input`, handing every key-value pair to `sink` with its
/// column family, and checks the format, the padding and the checksum. The pairs
/// reach `sink` before the checksum is checked: a caller that must not act on a
/// damaged file reads it twice (once with a sink that does nothing). Holds one
/// record at a time.
pub(crate) fn read_records(
    input: impl Read,
    mut sink: impl FnMut(&'static str, Vec<u8>, Vec<u8>) -> Result<(), SnapshotError>,
) -> Result<SnapshotSummary, SnapshotError> {
    let mut r = Hashing {
        inner: input,
        hash: Sha256::new(),
        bytes: 0,
    };
    let mut magic = [0u8; 22];
    r.read_exact(&mut magic).map_err(eof)?;
    if &magic != MAGIC {
        return Err(SnapshotError::NotASnapshot);
    }
    let mut summary = SnapshotSummary::default();
    let mut cf: Option<&'static str> = None;
    loop {
        match r.u8()? {
            TAG_CF => {
                let len = r.u8()? as usize;
                let name = r.bytes(len)?;
                cf = Some(
                    SM_CFS
                        .into_iter()
                        .find(|c| c.as_bytes() == name.as_slice())
                        .ok_or_else(|| {
                            SnapshotError::Damaged(format!(
                                "unknown column family {:?}",
                                String::from_utf8_lossy(&name)
                            ))
                        })?,
                );
            }
            TAG_PAIR => {
                let name = cf.ok_or_else(|| {
                    SnapshotError::Damaged("a pair before any column family".into())
                })?;
                let klen = r.len()?;
                let key = r.bytes(klen)?;
                let vlen = r.len()?;
                let value = r.bytes(vlen)?;
                summary.pairs += 1;
                sink(name, key, value)?;
            }
            TAG_END => {
                summary.revision = r.i64()?;
                summary.compacted = r.i64()?;
                break;
            }
            other => {
                return Err(SnapshotError::Damaged(format!(
                    "unknown record tag {other}"
                )));
            }
        }
    }
    let pad = r.bytes(padding(r.bytes))?;
    if pad.iter().any(|b| *b != 0) {
        return Err(SnapshotError::Damaged("non-zero padding".into()));
    }
    let expected = std::mem::take(&mut r.hash).finalize();
    let mut trailer = [0u8; 32];
    r.inner.read_exact(&mut trailer).map_err(eof)?;
    if trailer[..] != expected[..] {
        return Err(SnapshotError::Checksum);
    }
    let mut extra = [0u8; 1];
    if r.inner.read(&mut extra)? != 0 {
        return Err(SnapshotError::Damaged("bytes after the checksum".into()));
    }
    summary.bytes = r.bytes + 32;
    Ok(summary)
}

/// Zero bytes that bring `len` to a multiple of [`PAGE`].
fn padding(len: u64) -> usize {
    ((PAGE - len % PAGE) % PAGE) as usize
}

const PAGE: u64 = 512;

fn eof(e: std::io::Error) -> SnapshotError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        SnapshotError::Damaged("truncated".into())
    } else {
        SnapshotError::Io(e)
    }
}

/// A reader that hashes what it reads.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
    bytes: u64,
}

impl<R: Read> Hashing<R> {
    fn read_exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_exact(buf)?;
        self.hash.update(&*buf);
        self.bytes += buf.len() as u64;
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, SnapshotError> {
        let mut b = [0u8; 1];
        self.read_exact(&mut b).map_err(eof)?;
        Ok(b[0])
    }

    fn len(&mut self) -> Result<usize, SnapshotError> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b).map_err(eof)?;
        let n = u32::from_be_bytes(b);
        if n > MAX_RECORD_BYTES {
            return Err(SnapshotError::Damaged(format!(
                "a record of {n} bytes (at most {MAX_RECORD_BYTES})"
            )));
        }
        Ok(n as usize)
    }

    fn i64(&mut self) -> Result<i64, SnapshotError> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b).map_err(eof)?;
        Ok(i64::from_be_bytes(b))
    }

    fn bytes(&mut self, n: usize) -> Result<Vec<u8>, SnapshotError> {
        let mut v = vec![0u8; n];
        self.read_exact(&mut v).map_err(eof)?;
        Ok(v)
    }
}
