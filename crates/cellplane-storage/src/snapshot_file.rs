//! Raft snapshots as files, so that no member holds a database-sized buffer.
//!
//! - Build: a RocksDB snapshot is streamed to `<data>/snapshots/` in the
//!   operator-snapshot format ([`crate::export`], checksummed), 1 MiB at a time.
//! - Send: openraft reads the file in chunks of `snapshot_max_chunk_size`.
//! - Receive: openraft writes the chunks into a new file in the same folder.
//! - Install: the file is checked whole (format and checksum), recorded as the
//!   install in progress, and streamed into the state-machine column families in
//!   write batches of at most [`crate::export::IMPORT_BATCH_BYTES`]; the last
//!   batch writes the applied log id and clears the record. A member killed
//!   part-way finishes the install from the file when it opens again; readers
//!   are refused until the install is done.
//!
//! The member keeps one snapshot file (the newest); older ones are deleted when
//! a newer one is stored. Disk: one file about the size of the key-value state
//! uncompressed.

use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use openraft::{LogId, SnapshotMeta, StoredMembership};
use rocksdb::{IteratorMode, ReadOptions, WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use crate::db::{CF_META, SM_CFS, Store};
use crate::export::{IMPORT_BATCH_BYTES, SnapshotError, SnapshotSummary, export_at, read_records};
use crate::types::{Member, NodeId};

/// A Raft snapshot's data: a file in the member's snapshot folder.
#[derive(Debug)]
pub struct SnapshotFile {
    file: tokio::fs::File,
    path: PathBuf,
}

impl SnapshotFile {
    /// Opens the snapshot at `path` for reading.
    pub async fn open(path: &Path) -> std::io::Result<SnapshotFile> {
        Ok(SnapshotFile {
            file: tokio::fs::File::open(path).await?,
            path: path.to_path_buf(),
        })
    }

    /// A snapshot file already open.
    pub(crate) fn from_std(file: std::fs::File, path: PathBuf) -> SnapshotFile {
        SnapshotFile {
            file: tokio::fs::File::from_std(file),
            path,
        }
    }

    /// Creates an empty file at `path` to receive a snapshot into.
    pub async fn create(path: &Path) -> std::io::Result<SnapshotFile> {
        Ok(SnapshotFile {
            file: tokio::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)
                .await?,
            path: path.to_path_buf(),
        })
    }

    /// Where the data is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes what was written and makes it durable.
    pub(crate) async fn sync(&mut self) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.file.flush().await?;
        self.file.sync_all().await
    }
}

impl AsyncRead for SnapshotFile {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

impl AsyncWrite for SnapshotFile {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.file).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

impl AsyncSeek for SnapshotFile {
    fn start_seek(mut self: Pin<&mut Self>, position: std::io::SeekFrom) -> std::io::Result<()> {
        Pin::new(&mut self.file).start_seek(position)
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        Pin::new(&mut self.file).poll_complete(cx)
    }
}

/// The snapshot a member holds (or is installing): openraft's meta and the
/// file's name in the snapshot folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredSnapshot {
    pub meta: SnapshotMeta<NodeId, Member>,
    pub file: String,
}

impl StoredSnapshot {
    pub fn path(&self, store: &Store) -> PathBuf {
        store.snapshot_dir().join(&self.file)
    }
}

/// Bytes written to the file at a time while building.
const BUILD_CHUNK_BYTES: usize = 1 << 20;

/// A file name no other snapshot of this member has.
fn fresh_name(suffix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("snap-{nanos}-{}.{suffix}", std::process::id())
}

/// Where a snapshot being received is written. openraft receives one at a
/// time: a file left by a transfer it gave up is deleted here.
pub(crate) fn receive_path(store: &Store) -> std::io::Result<PathBuf> {
    let dir = store.snapshot_dir();
    std::fs::create_dir_all(&dir)?;
    for entry in std::fs::read_dir(&dir)?.flatten() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(RECEIVING))
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(dir.join(format!("{RECEIVING}{}", fresh_name("partial"))))
}

const RECEIVING: &str = "recv-";

/// A name for a complete snapshot file.
pub(crate) fn snap_name() -> String {
    fresh_name("snap")
}

/// Builds a snapshot of the state machine into a new file: the meta and the
/// data read from one RocksDB snapshot. Blocks: call it off the async runtime.
pub(crate) fn build(
    store: &Store,
) -> Result<(StoredSnapshot, std::fs::File, SnapshotSummary), SnapshotError> {
    let snap = store.wait_view();
    let mut opts = ReadOptions::default();
    opts.set_snapshot(&snap);
    let get = |key: &[u8]| store.db.get_cf_opt(store.cf(CF_META), key, &opts);
    let applied: Option<LogId<NodeId>> =
        match get(crate::state_machine::KEY_APPLIED).map_err(crate::KvError::from)? {
            Some(b) => postcard::from_bytes(&b).map_err(damaged)?,
            None => None,
        };
    let membership: StoredMembership<NodeId, Member> =
        match get(crate::state_machine::KEY_MEMBERSHIP).map_err(crate::KvError::from)? {
            Some(b) => postcard::from_bytes(&b).map_err(damaged)?,
            None => StoredMembership::default(),
        };
    let dir = store.snapshot_dir();
    std::fs::create_dir_all(&dir)?;
    let name = snap_name();
    let partial = dir.join(format!("{name}.partial"));
    let summary = match write_file(store, &snap, &partial) {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    // Opened before it is renamed: whatever happens to the name, this handle
    // reads the whole snapshot.
    let file = std::fs::File::open(&partial)?;
    std::fs::rename(&partial, dir.join(&name))?;
    sync_dir(&dir)?;
    let snapshot_id = match applied {
        Some(l) => format!("{}-{}-{}", l.leader_id, l.index, summary.revision),
        None => format!("empty-{}", summary.revision),
    };
    let meta = SnapshotMeta {
        last_log_id: applied,
        last_membership: membership,
        snapshot_id,
    };
    Ok((StoredSnapshot { meta, file: name }, file, summary))
}

fn write_file(
    store: &Store,
    snap: &rocksdb::SnapshotWithThreadMode<'_, rocksdb::DB>,
    path: &Path,
) -> Result<SnapshotSummary, SnapshotError> {
    let file = std::fs::File::create(path)?;
    let mut out = BufWriter::new(file);
    let mut failed: Option<std::io::Error> = None;
    let result = export_at(store, snap, BUILD_CHUNK_BYTES, |chunk, _| {
        match out.write_all(&chunk) {
            Ok(()) => true,
            Err(e) => {
                failed = Some(e);
                false
            }
        }
    });
    if let Some(e) = failed {
        return Err(SnapshotError::Io(e));
    }
    let summary = result?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(summary)
}

/// Checks a snapshot file whole (format, padding, checksum) without acting on
/// it. Blocks.
pub(crate) fn verify(path: &Path) -> Result<SnapshotSummary, SnapshotError> {
    let file = std::fs::File::open(path)?;
    read_records(BufReader::with_capacity(1 << 20, file), |_, _, _| Ok(()))
}

/// Replaces the state-machine column families with the snapshot at `path`
/// (already verified), in bounded write batches, none of them synced: the
/// caller's final batch is. Blocks.
pub(crate) fn load(store: &Store, path: &Path) -> Result<SnapshotSummary, SnapshotError> {
    let mut batch = WriteBatch::default();
    for name in SM_CFS {
        let cf = store.cf(name);
        let last = store.db.iterator_cf(cf, IteratorMode::End).next();
        if let Some(item) = last {
            let (k, _) = item.map_err(crate::KvError::from)?;
            let mut end = k.to_vec();
            end.push(0);
            batch.delete_range_cf(cf, &[][..], &end[..]);
        }
    }
    store.db.write(batch).map_err(crate::KvError::from)?;
    let mut batch = WriteBatch::default();
    let file = std::fs::File::open(path)?;
    let summary = read_records(BufReader::with_capacity(1 << 20, file), |name, k, v| {
        batch.put_cf(store.cf(name), k, v);
        if batch.size_in_bytes() >= IMPORT_BATCH_BYTES {
            store
                .db
                .write(std::mem::take(&mut batch))
                .map_err(crate::KvError::from)?;
        }
        Ok(())
    })?;
    let mut opts = WriteOptions::default();
    opts.set_sync(true);
    store
        .db
        .write_opt(batch, &opts)
        .map_err(crate::KvError::from)?;
    Ok(summary)
}

/// Deletes the snapshot files in the snapshot folder other than `keep`, and,
/// with `partials` (only when nothing can be building or receiving one: at
/// open), the unfinished ones a crash left behind. A file being sent stays
/// readable until its sender closes it.
pub(crate) fn remove_others(store: &Store, keep: Option<&str>, partials: bool) {
    let Ok(entries) = std::fs::read_dir(store.snapshot_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let old = name.ends_with(".snap") && keep != Some(name);
        if !(old || partials && name.ends_with(".partial")) {
            continue;
        }
        if let Err(e) = std::fs::remove_file(entry.path()) {
            tracing::warn!(file = %entry.path().display(), error = %e, "cannot delete an old snapshot file");
        }
    }
}

/// Makes the snapshot at `from` this member's file `to`: a file this member
/// received is renamed, any other (a caller's own) is copied, in a stream.
pub(crate) fn adopt(store: &Store, from: &Path, to: &Path) -> std::io::Result<()> {
    let dir = store.snapshot_dir();
    std::fs::create_dir_all(&dir)?;
    let received = from.parent() == Some(dir.as_path())
        && from
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(RECEIVING));
    if received {
        std::fs::rename(from, to)?;
    } else {
        std::fs::copy(from, to)?;
        std::fs::File::open(to)?.sync_all()?;
    }
    sync_dir(&dir)
}

pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn damaged(e: postcard::Error) -> SnapshotError {
    SnapshotError::Damaged(e.to_string())
}
