//! Draining a cell with its data: the cell is marked draining (its buckets go to
//! the other active cells) while every tenant that has keys in it stays pinned to
//! it, so nothing becomes unreachable; then each pinned tenant moves, a few at a
//! time, to the cell its bucket now goes to. Rerunning a drain resumes it: moves
//! interrupted earlier are resumed first, and tenants already moved are not
//! pinned again.

use futures::StreamExt;

use crate::{MoveError, MoveReport, Mover};

/// The most tenants a drain finds in one cell (each becomes a map override).
pub const MAX_DRAIN_TENANTS: usize = cellplane_map::MAX_TENANT_OVERRIDES / 2;

/// How many times the pinning is redone when tenants appear meanwhile.
const PIN_ROUNDS: usize = 5;

/// What a drain did.
#[derive(Debug, Default)]
pub struct DrainReport {
    pub moved: Vec<MoveReport>,
    /// Moves that failed, with why (the drain goes on with the others).
    pub failed: Vec<(String, MoveError)>,
}

impl Mover {
    /// Drains `cell`, moving `concurrency` tenants at a time.
    pub async fn drain(&self, cell: &str, concurrency: usize) -> Result<DrainReport, MoveError> {
        let mut report = DrainReport::default();
        for r in self.list().await?.into_iter().filter(|r| r.from == cell) {
            match self.resume(&r.tenant).await {
                Ok(m) => report.moved.push(m),
                Err(e) => report.failed.push((r.tenant, e)),
            }
        }
        let pinned = self.pin_tenants(cell).await?;
        self.say(&format!(
            "cell {cell} is draining; {} tenant(s) to move",
            pinned.len()
        ));
        let (map, _) = self.map().await?;
        let targets: Vec<(String, String)> = pinned
            .into_iter()
            .filter_map(|t| {
                let to = map.bucket_cell(&t).filter(|c| *c != cell)?.to_string();
                Some((t, to))
            })
            .collect();
        let mut moves = futures::stream::iter(targets)
            .map(|(t, to)| async move { (t.clone(), self.start(&t, &to).await) })
            .buffer_unordered(concurrency.max(1));
        while let Some((tenant, result)) = moves.next().await {
            match result {
                Ok(m) => report.moved.push(m),
                Err(e) => report.failed.push((tenant, e)),
            }
        }
        Ok(report)
    }

    /// Marks `cell` draining with every tenant that has keys in it pinned to it;
    /// answers the tenants pinned to it. Redone until no tenant appeared between
    /// the scan and the map change (such a tenant is refused meanwhile, never
    /// lost: it is pinned in the next round).
    async fn pin_tenants(&self, cell: &str) -> Result<Vec<String>, MoveError> {
        for _ in 0..PIN_ROUNDS {
            let (map, mrev) = self.map().await?;
            let found = self.conn(&map, cell)?.tenants(MAX_DRAIN_TENANTS).await?;
            let draining = map
                .cells
                .iter()
                .any(|c| c.name == cell && c.state == cellplane_map::CellState::Draining);
            let mut next = if draining {
                map.clone()
            } else {
                map.drained(cell)
                    .map_err(|e| MoveError::Refused(e.to_string()))?
            };
            let mut changed = !draining;
            for t in &found {
                let here = map.cell_for(t).is_some_and(|c| c.name == cell);
                if here && next.tenants.get(t).is_none_or(|c| c != cell) {
                    next.tenants.insert(t.clone(), cell.to_string());
                    changed = true;
                }
            }
            let pinned: Vec<String> = next
                .tenants
                .iter()
                .filter(|(_, c)| *c == cell)
                .map(|(t, _)| t.clone())
                .collect();
            if !changed {
                return Ok(pinned);
            }
            next.version = map
                .next_version()
                .map_err(|e| MoveError::Refused(e.to_string()))?;
            next.validate_successor(&map)
                .map_err(|e| MoveError::Refused(e.to_string()))?;
            match self.directory.write(&next, mrev).await {
                Ok(()) => {
                    crate::push_map(&next, self.tls.as_ref()).await?;
                    self.say(&format!(
                        "map version {}: cell {cell} draining, {} tenant(s) pinned to it",
                        next.version,
                        pinned.len()
                    ));
                }
                Err(e) if e.contains("changed meanwhile") => {}
                Err(e) => return Err(MoveError::Directory(e)),
            }
        }
        Err(MoveError::Refused(format!(
            "tenants kept appearing in cell {cell} while it was marked draining: run the \
             drain again"
        )))
    }
}
