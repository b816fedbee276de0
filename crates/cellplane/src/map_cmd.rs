//! `cellplane map show | apply <file> | assign <tenant> <cell> | drain <cell> |
//! push | seed`: change the cell map in the directory. Every change is validated (as a
//! successor of the stored map) before it is written, and written with a
//! compare-and-swap on the stored map's revision. Routers pick it up within their
//! poll interval.
//!
//! Then the map is pushed to every cell it names ([`push_to_cells`]): a cell that
//! has learned a map refuses the tenants it sends elsewhere, so a router on an
//! older map cannot write into the wrong cell. `map push` pushes the directory's
//! map again (after a cell was unreachable, or to seed a new environment's cells).
//!
//! `map seed` is what `cellplane up` does on start, for a deployed environment (a
//! Kubernetes Job, a Compose one-shot service): the static map of `--cells` goes
//! into the directory only if it holds no map, then the directory's map is pushed
//! to every cell. A rerun changes nothing the operators changed since, so it is
//! safe to run on every deploy.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use cellplane_map::CellMap;
use cellplane_router::directory::{Directory, DirectoryError, MapWriteError};
use tonic::transport::ClientTlsConfig;

#[derive(clap::Args, Debug)]
pub struct MapArgs {
    /// Directory endpoints (host:port, comma-separated). Default: the members of the
    /// directory cell named in <cells>/routers.toml.
    #[arg(long, value_delimiter = ',', global = true)]
    pub directory: Vec<String>,
    /// The folder of cell definitions (before or after the subcommand:
    /// `map seed --cells deploy/compose/cells`).
    #[arg(long, default_value = "cells", global = true)]
    pub cells: PathBuf,
    /// With TLS on, writing the map needs an operator's certificate.
    #[command(flatten)]
    pub tls: crate::client::TlsArgs,
    #[command(subcommand)]
    pub op: MapOp,
}

#[derive(clap::Subcommand, Debug)]
pub enum MapOp {
    /// Print the map in the directory (TOML).
    Show,
    /// Replace the map with a file's (TOML or .json); its version must be newer.
    Apply { file: PathBuf },
    /// Pin a tenant to a cell.
    Assign { tenant: String, cell: String },
    /// Move a cell's buckets to the other active cells and mark it draining. This
    /// moves routing, not data: keys already written stay in the drained cell.
    Drain { cell: String },
    /// Push the directory's map to every cell it names again (each cell then
    /// serves only the tenants the map sends it).
    Push,
    /// Write the static map of --cells into the directory if it holds none, then
    /// push the directory's map to every cell (what `cellplane up` does on
    /// start). A map already there is kept, so a rerun is safe.
    Seed {
        /// Retry for this long while the directory or a cell does not answer yet
        /// (a Job or a one-shot container starts beside the cells it seeds);
        /// 0: try once.
        #[arg(long, default_value = "0s", value_parser = crate::client::parse_duration)]
        wait: Duration,
    },
}

pub fn directory_endpoints(cells: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let routers = cellplane_router::RoutersDef::load(&cells.join("routers.toml"))?;
    let def = cellplane_cell::CellDef::load(&cells.join(format!("{}.toml", routers.directory)))?;
    Ok(def.members.iter().map(|m| m.client.to_string()).collect())
}

pub async fn run(args: MapArgs) -> anyhow::Result<()> {
    let endpoints = if args.directory.is_empty() {
        directory_endpoints(&args.cells)?
    } else {
        args.directory.clone()
    };
    let tls = args.tls.client_config()?;
    let dir = Directory::new(&endpoints, Duration::from_secs(3), tls.as_ref())
        .map_err(anyhow::Error::msg)?;
    if let MapOp::Seed { wait } = args.op {
        let env = crate::up::load_env(&args.cells)?;
        return seed(&dir, &env.static_map, tls.as_ref(), wait).await;
    }
    let stored = match dir.read().await {
        Ok(m) => Some(m),
        Err(DirectoryError::Empty) => None,
        Err(e) => bail!("{e} (endpoints: {})", endpoints.join(",")),
    };
    let pushed = match args.op {
        MapOp::Show => {
            let (map, rev) = stored.context("the directory holds no map yet")?;
            crate::outln!(
                "# cell map version {} (directory revision {rev})",
                map.version
            );
            crate::out!("{}", map.to_toml());
            // Moves in flight, as comments: the output stays a map file.
            let mover = cellplane_mover::Mover::new(
                &endpoints,
                tls.clone(),
                cellplane_mover::MoveSettings::default(),
                |_| {},
            )?;
            for m in mover.list().await? {
                crate::outln!(
                    "# moving: tenant {} from {} to {} ({}, for map version {})",
                    m.tenant,
                    m.from,
                    m.to,
                    m.state,
                    m.version
                );
            }
            return Ok(());
        }
        MapOp::Apply { file } => {
            let next = cellplane_router::map_source::read_map_file(&file)?;
            write(&dir, stored, &next).await?;
            next
        }
        MapOp::Assign { tenant, cell } => {
            let (map, rev) =
                stored.context("the directory holds no map yet: `map apply` one first")?;
            let mut next = map.clone();
            next.version = map.next_version()?;
            next.tenants.insert(tenant.clone(), cell.clone());
            write(&dir, Some((map, rev)), &next).await?;
            crate::outln!("tenant {tenant} now routes to cell {cell}");
            next
        }
        MapOp::Drain { cell } => {
            let (map, rev) = stored.context("the directory holds no map yet")?;
            let next = map.drained(&cell)?;
            write(&dir, Some((map, rev)), &next).await?;
            crate::outln!(
                "cell {cell} is draining: its buckets now route to the other active cells \
                 (routing only; its data stays where it is)"
            );
            next
        }
        MapOp::Push => {
            stored
                .context("the directory holds no map yet: `map apply` one first")?
                .0
        }
        MapOp::Seed { .. } => unreachable!("handled before the directory is read"),
    };
    push_to_cells(&pushed, tls.as_ref()).await
}

/// Why one seeding attempt failed: worth another try (something does not answer
/// yet) or not (the directory refuses us or holds a map that is refused).
enum SeedError {
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

/// `map seed`: [`seed_directory`] then [`push_to_cells`], retried until `wait`
/// has passed while something does not answer.
async fn seed(
    dir: &Directory,
    static_map: &CellMap,
    tls: Option<&ClientTlsConfig>,
    wait: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let attempt = async {
            let map = seed_directory(dir, static_map).await?;
            push_to_cells(&map, tls).await.map_err(SeedError::Retry)
        };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(SeedError::Fatal(e)) => return Err(e),
            Err(SeedError::Retry(e)) if tokio::time::Instant::now() < deadline => {
                // A Job's log then says what it is waiting for.
                eprintln!("map seed: {e:#}; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(SeedError::Retry(e)) => return Err(e),
        }
    }
}

/// Writes `static_map` into the directory when it holds no map yet; returns the
/// map the directory holds afterwards. A map already there is kept whatever its
/// version: operators may have changed it since the environment was seeded.
async fn seed_directory(dir: &Directory, static_map: &CellMap) -> Result<CellMap, SeedError> {
    static_map
        .validate()
        .map_err(|e| SeedError::Fatal(anyhow!("the static map: {e}")))?;
    // A second round only after losing the race to another seeder (a second
    // `up`, a Job run twice at once): its read finds the winner's map.
    for _ in 0..2 {
        match dir.read().await {
            Ok((map, _)) => {
                crate::outln!("the directory holds map version {}: kept", map.version);
                return Ok(map);
            }
            Err(DirectoryError::Empty) => {}
            Err(e @ DirectoryError::Invalid { .. }) => return Err(SeedError::Fatal(e.into())),
            Err(e) => return Err(SeedError::Retry(anyhow!("cannot read the directory: {e}"))),
        }
        match dir.write(static_map, 0).await {
            Ok(()) => {
                crate::outln!(
                    "seeded the directory with the static map (version {})",
                    static_map.version
                );
                return Ok(static_map.clone());
            }
            Err(MapWriteError::Changed) => continue,
            Err(e @ MapWriteError::Unreachable(_)) => return Err(SeedError::Retry(e.into())),
            Err(e @ MapWriteError::Refused(_)) => {
                return Err(SeedError::Fatal(anyhow!(
                    "{e} (writing the map needs an operator's certificate: --cacert, --cert, \
                     --key)"
                )));
            }
        }
    }
    Err(SeedError::Retry(anyhow!(
        "the directory's map changed twice while seeding"
    )))
}

/// What `cellplane up` does before it starts the routers: seeds the directory
/// with `static_map` unless it holds a map (once: `up` has just seen the
/// directory ready) and returns the directory's map.
pub async fn seed_once(dir: &Directory, static_map: &CellMap) -> anyhow::Result<CellMap> {
    match seed_directory(dir, static_map).await {
        Ok(map) => Ok(map),
        Err(SeedError::Retry(e) | SeedError::Fatal(e)) => Err(e),
    }
}

/// Pushes `map` to every cell it names, so each serves only the tenants the map
/// sends it. Fails naming every cell that did not learn it.
pub async fn push_to_cells(map: &CellMap, tls: Option<&ClientTlsConfig>) -> anyhow::Result<()> {
    for (cell, version) in cellplane_mover::push_map(map, tls).await? {
        crate::outln!("cell {cell}: serves by map version {version}");
    }
    Ok(())
}

async fn write(
    dir: &Directory,
    stored: Option<(CellMap, i64)>,
    next: &CellMap,
) -> anyhow::Result<()> {
    let expected = match &stored {
        Some((current, rev)) => {
            next.validate_successor(current)?;
            *rev
        }
        None => {
            next.validate()?;
            0
        }
    };
    dir.write(next, expected).await?;
    crate::outln!("map version {} written to the directory", next.version);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_moves_every_bucket_off_the_cell() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../cells/routing.toml"
        ))
        .unwrap();
        let map = CellMap::from_toml(&text).unwrap();
        let next = map.drained("beta").unwrap();
        assert_eq!(next.version, map.version + 1);
        assert!(next.ranges.iter().all(|r| r.cell != "beta"));
        assert!(next.drained("beta").is_err(), "already draining");
        let next2 = next.drained("alpha").unwrap();
        assert!(next2.ranges.iter().all(|r| r.cell == "gamma"));
        assert!(
            next2.drained("gamma").is_err(),
            "the last active cell cannot drain"
        );
    }

    #[test]
    fn no_change_is_computed_past_the_highest_version() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../cells/routing.toml"
        ))
        .unwrap();
        let mut map = CellMap::from_toml(&text).unwrap();
        map.version = cellplane_map::MAX_VERSION;
        let err = map.drained("beta").unwrap_err();
        assert!(
            err.to_string()
                .contains("the map's version is at its maximum"),
            "{err}"
        );
    }
}
