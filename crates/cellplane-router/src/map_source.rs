//! Where the router's cell map comes from, in order: the live directory, the
//! last-known-good copy on the router's disk, the static map in `cells/`.
//!
//! The request path reads the map in force from a [`watch`] channel and never waits
//! on any source. A background task follows the directory and applies newer maps;
//! every accepted map is written to the last-known-good file atomically (temp file,
//! fsync, rename), so a router restarted while the directory is down still routes
//! with the newest map it saw.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cellplane_map::{CellMap, MapError};
use serde::Serialize;
use tokio::sync::watch;

/// Where the map in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MapSource {
    Directory,
    LastKnownGood,
    Static,
}

impl std::fmt::Display for MapSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MapSource::Directory => "directory",
            MapSource::LastKnownGood => "last-known-good",
            MapSource::Static => "static",
        })
    }
}

/// The map in force and its source.
#[derive(Debug, Clone)]
pub struct ActiveMap {
    pub map: Arc<CellMap>,
    pub source: MapSource,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Map {
        path: PathBuf,
        #[source]
        source: MapError,
    },
}

/// The name of the last-known-good file in the router's state directory.
pub const LKG_FILE: &str = "cellmap.last-known-good.json";

pub fn read_map_file(path: &Path) -> Result<CellMap, SourceError> {
    use std::io::Read;
    let io = |source| SourceError::Io {
        path: path.to_path_buf(),
        source,
    };
    // Read no more than a map may be (plus one byte, so an oversized file is
    // refused by the parser with the size limit, not read whole).
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(cellplane_map::MAX_MAP_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    let parsed = if path.extension().is_some_and(|e| e == "json") {
        CellMap::from_json(&bytes)
    } else {
        CellMap::from_toml(&String::from_utf8_lossy(&bytes))
    };
    parsed.map_err(|source| SourceError::Map {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `map` as the last-known-good copy: temp file, fsync, rename, fsync dir.
pub fn write_last_known_good(state_dir: &Path, map: &CellMap) -> Result<(), SourceError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SourceError::Io { path, source }
    };
    std::fs::create_dir_all(state_dir).map_err(io(state_dir))?;
    let tmp = state_dir.join(format!("{LKG_FILE}.tmp"));
    let dst = state_dir.join(LKG_FILE);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&map.to_json()).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, &dst).map_err(io(&dst))?;
    std::fs::File::open(state_dir)
        .and_then(|d| d.sync_all())
        .map_err(io(state_dir))?;
    Ok(())
}

/// The map to boot with when the directory gave none: the last-known-good copy if
/// it is there and sound (a corrupt one is reported and skipped), else the static
/// map.
pub fn boot_map(state_dir: &Path, static_map: &Path) -> Result<ActiveMap, SourceError> {
    let lkg = state_dir.join(LKG_FILE);
    if lkg.exists() {
        match read_map_file(&lkg) {
            Ok(map) => {
                tracing::info!(version = map.version, path = %lkg.display(), "booting with the last-known-good map");
                return Ok(ActiveMap {
                    map: Arc::new(map),
                    source: MapSource::LastKnownGood,
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "last-known-good map is unusable: skipping it, using the static map")
            }
        }
    }
    let map = read_map_file(static_map)?;
    tracing::info!(version = map.version, path = %static_map.display(), "booting with the static map");
    Ok(ActiveMap {
        map: Arc::new(map),
        source: MapSource::Static,
    })
}

/// Holds the map in force. Cheap to clone; readers never block.
#[derive(Clone)]
pub struct MapHolder {
    tx: Arc<watch::Sender<ActiveMap>>,
    state_dir: PathBuf,
    /// Since when the directory has not answered; `None` while it does. The map's
    /// source says where the map came from, this says whether it is still live.
    directory_lost: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    /// Maps refused so far, and why the last one was.
    refused: Arc<std::sync::Mutex<(u64, String)>>,
}

impl MapHolder {
    pub fn new(initial: ActiveMap, state_dir: PathBuf) -> MapHolder {
        // A router that booted from its own copies has not reached the directory.
        let lost = (initial.source != MapSource::Directory).then(std::time::Instant::now);
        let (tx, _) = watch::channel(initial);
        MapHolder {
            tx: Arc::new(tx),
            state_dir,
            directory_lost: Arc::new(std::sync::Mutex::new(lost)),
            refused: Arc::default(),
        }
    }

    /// A map from the directory could not be used: logged, counted and kept for
    /// `status`; the map in force stays.
    pub fn refuse(&self, why: &str) {
        tracing::error!(reason = %why, "refused a cell map from the directory: routing continues with the map in force");
        let mut r = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        r.0 += 1;
        r.1 = why.chars().take(1024).collect();
    }

    /// How many maps were refused, and why the last one was.
    pub fn refusals(&self) -> (u64, String) {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The directory answered.
    pub fn directory_reached(&self) {
        *self.lost_lock() = None;
    }

    /// The directory did not answer; the time it was first missed is kept.
    pub fn directory_unreachable(&self) {
        self.lost_lock().get_or_insert_with(std::time::Instant::now);
    }

    /// How long the directory has been unreachable, if it is.
    pub fn directory_down_for(&self) -> Option<std::time::Duration> {
        self.lost_lock().map(|since| since.elapsed())
    }

    fn lost_lock(&self) -> std::sync::MutexGuard<'_, Option<std::time::Instant>> {
        self.directory_lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub fn current(&self) -> ActiveMap {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<ActiveMap> {
        self.tx.subscribe()
    }

    /// Offers a map from the directory. Applied only if valid and newer than the
    /// map in force; then persisted as last-known-good. Returns whether it was
    /// applied.
    pub fn offer(&self, map: CellMap) -> Result<bool, MapError> {
        let current = self.current();
        if map.version == current.map.version && *current.map == map {
            if current.source != MapSource::Directory {
                // The directory confirms the map we booted with: it is now live.
                self.tx.send_modify(|a| a.source = MapSource::Directory);
            }
            return Ok(false);
        }
        map.validate_successor(&current.map)?;
        if let Err(e) = write_last_known_good(&self.state_dir, &map) {
            // Routing with the new map matters more than the copy; say so loudly.
            tracing::error!(error = %e, "cannot write the last-known-good map");
        }
        tracing::info!(
            version = map.version,
            "applied a new cell map from the directory"
        );
        self.tx.send_replace(ActiveMap {
            map: Arc::new(map),
            source: MapSource::Directory,
        });
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_map::{CellEntry, CellState};

    fn map(version: u64) -> CellMap {
        CellMap {
            version,
            buckets: 16,
            cells: vec![CellEntry {
                name: "a".into(),
                endpoints: vec!["127.0.0.1:1".into()],
                state: CellState::Active,
            }],
            ranges: CellMap::even_ranges(&["a"], 16),
            tenants: Default::default(),
        }
    }

    #[test]
    fn sources_in_order_and_corrupt_lkg_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let static_path = dir.path().join("routing.toml");
        std::fs::write(&static_path, map(1).to_toml()).unwrap();
        let state = dir.path().join("state");

        let a = boot_map(&state, &static_path).unwrap();
        assert_eq!((a.source, a.map.version), (MapSource::Static, 1));

        write_last_known_good(&state, &map(5)).unwrap();
        let a = boot_map(&state, &static_path).unwrap();
        assert_eq!((a.source, a.map.version), (MapSource::LastKnownGood, 5));

        std::fs::write(state.join(LKG_FILE), b"{ not json").unwrap();
        let a = boot_map(&state, &static_path).unwrap();
        assert_eq!(a.source, MapSource::Static);
    }

    #[test]
    fn offers_apply_only_newer_valid_maps_and_persist_them() {
        let dir = tempfile::tempdir().unwrap();
        let holder = MapHolder::new(
            ActiveMap {
                map: Arc::new(map(3)),
                source: MapSource::Static,
            },
            dir.path().to_path_buf(),
        );
        assert!(matches!(
            holder.offer(map(2)),
            Err(MapError::NotNewer { .. })
        ));
        assert_eq!(holder.offer(map(4)), Ok(true));
        assert_eq!(holder.current().source, MapSource::Directory);
        let saved = read_map_file(&dir.path().join(LKG_FILE)).unwrap();
        assert_eq!(saved.version, 4);
        let mut bad = map(9);
        bad.ranges.clear();
        assert!(holder.offer(bad).is_err());
        assert_eq!(holder.current().map.version, 4);
    }
}
