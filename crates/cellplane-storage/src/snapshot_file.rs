//! Raft snapshots without database-sized buffers, and without copying the
//! database each time one is built.
//!
//! - Build: a RocksDB checkpoint in `<data>/snapshots/` (hard links to the SST
//!   files as they are, after a memtable flush): about as cheap for a large store
//!   as for a small one, which matters because openraft builds one every
//!   `raft.snapshot_every_entries` entries whether or not a follower needs it.
//! - Send: the first time a follower needs it, the checkpoint is streamed into a
//!   file in the operator-snapshot format ([`crate::export`], checksummed), 1 MiB
//!   at a time; openraft reads that file in chunks of `snapshot_max_chunk_size`.
//! - Receive: openraft writes the chunks into a new file in the same folder.
//! - Install: the file is checked whole (format and checksum), recorded as the
//!   install in progress, and streamed into the state-machine column families in
//!   write batches of at most [`crate::export::IMPORT_BATCH_BYTES`]; the last
//!   batch writes the applied log id and clears the record. A member killed
//!   part-way finishes the install from the file when it opens again; readers
//!   are refused until the install is done.
//!
//! The member keeps one snapshot (the newest: a checkpoint and, once sent, its
//! file, or a received file); older ones are deleted when a newer one is
//! stored. Disk: a checkpoint shares its SST files with the live store until
//! RocksDB compacts them away (at most one more copy of the store); a file is
//! about the size of the key-value state, uncompressed.

use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use openraft::SnapshotMeta;
use rocksdb::{IteratorMode, ReadOptions, WriteBatch};
use serde::{Deserialize, Serialize};
use std::future::Future;

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use crate::db::{SM_CFS, Store};
use crate::export::{SnapshotError, SnapshotSummary, export_at, load_records, read_records};
use crate::types::{Member, NodeId};

/// A Raft snapshot's data: a file in the member's snapshot folder, or a
/// checkpoint written out to one when it is first read.
#[derive(Debug)]
pub struct SnapshotFile {
    state: State,
    path: PathBuf,
    /// Keeps the stored snapshot this reads from on disk until it is dropped.
    _pin: Option<SnapshotPin>,
}

#[derive(Debug)]
enum State {
    Ready(tokio::fs::File),
    /// Not written out yet: reading or seeking starts the export.
    Lazy {
        checkpoint: PathBuf,
        seek: Option<std::io::SeekFrom>,
    },
    Exporting {
        task: tokio::task::JoinHandle<std::io::Result<(std::fs::File, u64)>>,
    },
    /// Writing the checkpoint out failed: every later call fails the same way.
    Failed(std::io::ErrorKind, String),
}

impl SnapshotFile {
    /// Opens the snapshot at `path` for reading.
    pub async fn open(path: &Path) -> std::io::Result<SnapshotFile> {
        Ok(SnapshotFile {
            state: State::Ready(tokio::fs::File::open(path).await?),
            path: path.to_path_buf(),
            _pin: None,
        })
    }

    /// The snapshot in `checkpoint`, written out to `path` when first read.
    fn lazy(checkpoint: PathBuf, path: PathBuf, pin: SnapshotPin) -> SnapshotFile {
        SnapshotFile {
            state: State::Lazy {
                checkpoint,
                seek: None,
            },
            path,
            _pin: Some(pin),
        }
    }

    /// Creates an empty file at `path` to receive a snapshot into.
    pub async fn create(path: &Path) -> std::io::Result<SnapshotFile> {
        Ok(SnapshotFile {
            state: State::Ready(
                tokio::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .await?,
            ),
            path: path.to_path_buf(),
            _pin: None,
        })
    }

    /// Where the data is (or will be, for a checkpoint not read yet).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes what was written and makes it durable.
    /// A checkpoint is written out (and synced) first.
    pub(crate) async fn sync(&mut self) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        if !matches!(self.state, State::Ready(_)) {
            std::future::poll_fn(|cx| self.poll_ready(cx)).await?;
            return Ok(());
        }
        match &mut self.state {
            State::Ready(f) => {
                f.flush().await?;
                f.sync_all().await
            }
            _ => Err(not_writable()),
        }
    }

    /// Drives a lazy snapshot to a ready file, positioned where a seek asked
    /// before that put it.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        loop {
            let next = match &mut self.state {
                State::Ready(_) => return Poll::Ready(Ok(())),
                State::Failed(kind, msg) => {
                    return Poll::Ready(Err(std::io::Error::new(*kind, msg.clone())));
                }
                State::Lazy { checkpoint, seek } => {
                    let (ckpt, out, seek) = (checkpoint.clone(), self.path.clone(), *seek);
                    State::Exporting {
                        task: tokio::task::spawn_blocking(move || {
                            use std::io::Seek;
                            let mut file = export_checkpoint(&ckpt, &out)?;
                            let pos = file.seek(seek.unwrap_or(std::io::SeekFrom::Start(0)))?;
                            Ok((file, pos))
                        }),
                    }
                }
                State::Exporting { task } => match Pin::new(task).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(Ok((file, _)))) => State::Ready(tokio::fs::File::from_std(file)),
                    Poll::Ready(Ok(Err(e))) => State::Failed(e.kind(), e.to_string()),
                    Poll::Ready(Err(e)) => State::Failed(std::io::ErrorKind::Other, e.to_string()),
                },
            };
            self.state = next;
        }
    }

    /// The file, once [`Self::poll_ready`] said it is ready.
    fn ready_file(&mut self) -> std::io::Result<&mut tokio::fs::File> {
        match &mut self.state {
            State::Ready(f) => Ok(f),
            _ => Err(std::io::Error::other("the snapshot file is not ready")),
        }
    }
}

fn not_writable() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "a snapshot being built from a checkpoint is read-only",
    )
}

impl AsyncRead for SnapshotFile {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.poll_ready(cx) {
            Poll::Ready(Ok(())) => match self.ready_file() {
                Ok(f) => Pin::new(f).poll_read(cx, buf),
                Err(e) => Poll::Ready(Err(e)),
            },
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for SnapshotFile {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.state {
            State::Ready(f) => Pin::new(f).poll_write(cx, buf),
            _ => Poll::Ready(Err(not_writable())),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.state {
            State::Ready(f) => Pin::new(f).poll_flush(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.state {
            State::Ready(f) => Pin::new(f).poll_shutdown(cx),
            _ => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncSeek for SnapshotFile {
    fn start_seek(mut self: Pin<&mut Self>, position: std::io::SeekFrom) -> std::io::Result<()> {
        match &mut self.state {
            State::Ready(f) => Pin::new(f).start_seek(position),
            State::Lazy { seek, .. } => {
                *seek = Some(position);
                Ok(())
            }
            _ => Err(std::io::Error::other(
                "seek while the snapshot is being written out",
            )),
        }
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        let lazy = !matches!(self.state, State::Ready(_));
        match self.poll_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        let f = match self.ready_file() {
            Ok(f) => f,
            Err(e) => return Poll::Ready(Err(e)),
        };
        if lazy {
            // The seek asked before the export was applied to the file it made:
            // ask the file where it is.
            Pin::new(&mut *f).start_seek(std::io::SeekFrom::Current(0))?;
        }
        Pin::new(f).poll_complete(cx)
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
    /// The snapshot's file or checkpoint.
    pub fn path(&self, store: &Store) -> PathBuf {
        store.snapshot_dir().join(&self.file)
    }

    fn is_checkpoint(&self) -> bool {
        self.file.ends_with(".ckpt")
    }

    /// Its data, to read: the file, or the checkpoint written out when first
    /// read. The snapshot stays on disk until the data is dropped, even if a
    /// newer one replaces it meanwhile; call this under the lock that serializes
    /// replacing the stored snapshot, so it cannot be deleted in between.
    pub fn data(&self, store: &Store) -> SnapshotData {
        let pin = store.pins.pin(store, &self.file);
        if self.is_checkpoint() {
            SnapshotData::Checkpoint {
                checkpoint: self.path(store),
                file: store.snapshot_dir().join(export_name(&self.file)),
                pin,
            }
        } else {
            SnapshotData::File(self.path(store), pin)
        }
    }

    /// Deletes its file, or its checkpoint and the file written from it; once
    /// its last reader is done if it is being read.
    pub fn remove(&self, store: &Store) {
        if store.pins.defer_removal(&self.file) {
            return;
        }
        remove_files(&store.snapshot_dir(), &self.file);
    }
}

fn remove_files(dir: &Path, file: &str) {
    let path = dir.join(file);
    if file.ends_with(".ckpt") {
        let _ = std::fs::remove_dir_all(&path);
        let _ = std::fs::remove_file(dir.join(export_name(file)));
    } else {
        let _ = std::fs::remove_file(&path);
    }
}

/// The stored snapshots being read, by name, and whether each was replaced
/// meanwhile (then the last reader deletes it).
///
/// Why: openraft reads a snapshot to send it to a follower while the leader
/// goes on building newer ones; if a replaced snapshot were deleted at once,
/// the send would fail, and openraft treats a snapshot it cannot read as a
/// storage failure that stops the member's Raft.
#[derive(Debug, Default)]
pub(crate) struct SnapshotPins {
    pinned: std::sync::Mutex<std::collections::HashMap<String, PinCount>>,
}

#[derive(Debug, Default)]
struct PinCount {
    readers: usize,
    replaced: bool,
}

impl SnapshotPins {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, PinCount>> {
        self.pinned.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pin(self: &std::sync::Arc<Self>, store: &Store, file: &str) -> SnapshotPin {
        self.lock().entry(file.to_string()).or_default().readers += 1;
        SnapshotPin {
            pins: self.clone(),
            dir: store.snapshot_dir(),
            file: file.to_string(),
        }
    }

    /// Marks `file` for deletion by its last reader; false if nobody reads it.
    fn defer_removal(&self, file: &str) -> bool {
        match self.lock().get_mut(file) {
            Some(c) => {
                c.replaced = true;
                true
            }
            None => false,
        }
    }
}

/// One reader's hold on a stored snapshot.
#[derive(Debug)]
pub(crate) struct SnapshotPin {
    pins: std::sync::Arc<SnapshotPins>,
    dir: PathBuf,
    file: String,
}

impl Drop for SnapshotPin {
    fn drop(&mut self) {
        let remove = {
            let mut pinned = self.pins.lock();
            let Some(c) = pinned.get_mut(&self.file) else {
                return;
            };
            c.readers -= 1;
            if c.readers > 0 {
                return;
            }
            pinned.remove(&self.file).is_some_and(|c| c.replaced)
        };
        if remove {
            remove_files(&self.dir, &self.file);
        }
    }
}

/// The file a checkpoint is written out to, beside it.
fn export_name(checkpoint: &str) -> String {
    format!("{checkpoint}.snap")
}

/// Where a stored snapshot's data is, held on disk while this lives.
pub(crate) enum SnapshotData {
    File(PathBuf, SnapshotPin),
    Checkpoint {
        checkpoint: PathBuf,
        file: PathBuf,
        pin: SnapshotPin,
    },
}

impl SnapshotData {
    /// Opened for reading (a checkpoint is written out when first read).
    pub async fn open(self) -> std::io::Result<SnapshotFile> {
        match self {
            SnapshotData::File(p, pin) => {
                let mut f = SnapshotFile::open(&p).await?;
                f._pin = Some(pin);
                Ok(f)
            }
            SnapshotData::Checkpoint {
                checkpoint,
                file,
                pin,
            } => {
                if tokio::fs::metadata(&checkpoint).await.is_err() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("checkpoint {} is missing", checkpoint.display()),
                    ));
                }
                Ok(SnapshotFile::lazy(checkpoint, file, pin))
            }
        }
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

/// Builds a snapshot of the state machine as a RocksDB checkpoint, with the
/// meta read from the checkpoint itself (so they agree). Blocks: call it off the
/// async runtime.
pub(crate) fn build(store: &Store) -> Result<StoredSnapshot, SnapshotError> {
    let dir = store.snapshot_dir();
    std::fs::create_dir_all(&dir)?;
    let name = fresh_name("ckpt");
    let path = dir.join(&name);
    if let Err(e) = store.checkpoint(&path) {
        let _ = std::fs::remove_dir_all(&path);
        return Err(crate::KvError::from(e).into());
    }
    sync_dir(&dir)?;
    let ckpt =
        crate::db::open_read_only(&path).map_err(|e| crate::KvError::Storage(e.to_string()))?;
    let (applied, membership) =
        crate::state_machine::read_raft_meta(&ckpt, &ReadOptions::default())?;
    let revision =
        crate::mvcc::read_i64(&ckpt, &ReadOptions::default(), crate::mvcc::KEY_REVISION)?;
    let snapshot_id = match applied {
        Some(l) => format!("{}-{}-{}", l.leader_id, l.index, revision),
        None => format!("empty-{revision}"),
    };
    let meta = SnapshotMeta {
        last_log_id: applied,
        last_membership: membership,
        snapshot_id,
    };
    Ok(StoredSnapshot { meta, file: name })
}

/// The snapshot in `checkpoint` as a file at `out` (written now unless it is
/// there already), open at its start. Blocks.
fn export_checkpoint(checkpoint: &Path, out: &Path) -> std::io::Result<std::fs::File> {
    if let Ok(f) = std::fs::File::open(out) {
        return Ok(f);
    }
    let store = crate::db::open_read_only(checkpoint).map_err(std::io::Error::other)?;
    let snap = store.wait_view();
    let partial = out.with_extension(format!("{}.partial", std::process::id()));
    match write_file(&store, &snap, &partial) {
        Ok(summary) => tracing::info!(
            file = %out.display(),
            bytes = summary.bytes,
            pairs = summary.pairs,
            "wrote a snapshot out for a follower"
        ),
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(std::io::Error::other(e.to_string()));
        }
    }
    let file = std::fs::File::open(&partial)?;
    std::fs::rename(&partial, out)?;
    if let Some(dir) = out.parent() {
        sync_dir(dir)?;
    }
    Ok(file)
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
/// (already verified), in bounded write batches, none of them synced. Returns
/// the summary and the last batch, not written yet: the caller adds the meta
/// to it and writes it synced.
pub(crate) fn load(
    store: &Store,
    path: &Path,
) -> Result<(SnapshotSummary, WriteBatch), SnapshotError> {
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
    let file = std::fs::File::open(path)?;
    load_records(store, BufReader::with_capacity(1 << 20, file), |_| true)
}

/// Deletes the snapshot files in the snapshot folder other than `keep`, and,
/// with `partials` (only when nothing can be building or receiving one: at
/// open), the unfinished ones a crash left behind. A file being sent stays
/// readable until its sender closes it.
pub(crate) fn remove_others(store: &Store, keep: Option<&str>, partials: bool) {
    let Ok(entries) = std::fs::read_dir(store.snapshot_dir()) else {
        return;
    };
    let kept_export = keep.map(export_name);
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if keep == Some(name) || kept_export.as_deref() == Some(name) {
            continue;
        }
        let old = name.ends_with(".snap") || name.ends_with(".ckpt");
        if !(old || partials && name.ends_with(".partial")) {
            continue;
        }
        let removed = if entry.path().is_dir() {
            std::fs::remove_dir_all(entry.path())
        } else {
            std::fs::remove_file(entry.path())
        };
        if let Err(e) = removed {
            tracing::warn!(file = %entry.path().display(), error = %e, "cannot delete an old snapshot");
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
