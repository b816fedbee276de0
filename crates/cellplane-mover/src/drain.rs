//! Draining a cell with its data: the cell is marked draining (its buckets go to
//! the other active cells) while every tenant that has keys in it stays pinned to
//! it, so nothing becomes unreachable; then each pinned tenant moves, a few at a
//! time, to the cell its bucket now goes to. Rerunning a drain resumes it: moves
//! interrupted earlier are resumed first, and tenants already moved are not
//! pinned again.

use cellplane_map::CellMap;
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
        let (map, _) = self.map().await?;
        let targets: Vec<(String, String)> = pinned
            .into_iter()
            .filter_map(|t| {
                let to = map.bucket_cell(&t).filter(|c| *c != cell)?.to_string();
                Some((t, to))
            })
            .collect();
        self.move_all(targets, concurrency, &mut report).await;
        Ok(report)
    }

    /// Moves each `(tenant, to)`, `concurrency` at a time, into `report`; then
    /// drops the overrides of those moved that their buckets imply.
    pub(crate) async fn move_all(
        &self,
        targets: Vec<(String, String)>,
        concurrency: usize,
        report: &mut DrainReport,
    ) {
        let mut moves = futures::stream::iter(targets)
            .map(|(t, to)| async move { (t.clone(), self.start(&t, &to).await) })
            .buffer_unordered(concurrency.max(1));
        while let Some((tenant, result)) = moves.next().await {
            match result {
                Ok(m) => report.moved.push(m),
                Err(e) => report.failed.push((tenant, e)),
            }
        }
        let moved: Vec<String> = report.moved.iter().map(|m| m.tenant.clone()).collect();
        self.unpin(&moved).await;
    }

    /// Marks `cell` draining with every tenant that has keys in it pinned to it;
    /// answers the tenants pinned to it.
    async fn pin_tenants(&self, cell: &str) -> Result<Vec<String>, MoveError> {
        let change = |map: &CellMap| {
            let draining = map
                .cells
                .iter()
                .any(|c| c.name == cell && c.state == cellplane_map::CellState::Draining);
            if draining {
                return Ok(None);
            }
            map.drained(cell).map(Some)
        };
        let pinned = self.pin_then_change(cell, change, |_| true).await?;
        self.say(&format!(
            "cell {cell} is draining, {} tenant(s) pinned to it",
            pinned.len()
        ));
        Ok(pinned)
    }

    /// Changes the map with `change` (`None`: already done) while every tenant
    /// that has keys in `cell`, is served there and is `selected` is pinned to
    /// it, so that none becomes unreachable before it moves; answers the
    /// selected tenants pinned to `cell`. Redone until no tenant appeared
    /// between the scan and the map change (such a tenant is refused meanwhile,
    /// never lost: it is pinned in the next round).
    pub(crate) async fn pin_then_change(
        &self,
        cell: &str,
        change: impl Fn(&CellMap) -> Result<Option<CellMap>, cellplane_map::MapError>,
        selected: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>, MoveError> {
        for _ in 0..PIN_ROUNDS {
            let (map, mrev) = self.map().await?;
            let found = self.conn(&map, cell)?.tenants(MAX_DRAIN_TENANTS).await?;
            let changed_map = change(&map).map_err(|e| MoveError::Refused(e.to_string()))?;
            let mut changed = changed_map.is_some();
            let mut next = changed_map.unwrap_or_else(|| map.clone());
            for t in found.iter().filter(|t| selected(t)) {
                let here = map.cell_for(t).is_some_and(|c| c.name == cell);
                if here && next.tenants.get(t).is_none_or(|c| c != cell) {
                    next.tenants.insert(t.clone(), cell.to_string());
                    changed = true;
                }
            }
            let pinned: Vec<String> = next
                .tenants
                .iter()
                .filter(|(t, c)| *c == cell && selected(t))
                .map(|(t, _)| t.clone())
                .collect();
            if !changed {
                return Ok(pinned);
            }
            if self.commit_map(&map, mrev, &mut next).await? {
                crate::push_map(&next, self.tls.as_ref()).await?;
                self.say(&format!(
                    "map version {}: {} tenant(s) pinned to cell {cell}",
                    next.version,
                    pinned.len()
                ));
            }
        }
        Err(MoveError::Refused(format!(
            "tenants kept appearing in cell {cell} while the map changed: run the command \
             again"
        )))
    }

    /// Drops the overrides of `tenants` that send them where their bucket does
    /// anyway (tenants a drain or bucket move pinned, now moved), so the map
    /// does not grow with every move. Best effort: a failure is reported, the
    /// overrides stay and route the same.
    pub(crate) async fn unpin(&self, tenants: &[String]) {
        let unpinned = async {
            for _ in 0..5 {
                let (map, mrev) = self.map().await?;
                let mut next = map.clone();
                next.tenants.retain(|t, c| {
                    !(tenants.contains(t) && map.bucket_cell(t) == Some(c.as_str()))
                });
                if next.tenants.len() == map.tenants.len() {
                    return Ok(());
                }
                if !self.commit_map(&map, mrev, &mut next).await? {
                    continue;
                }
                crate::push_map(&next, self.tls.as_ref()).await?;
                self.say(&format!(
                    "map version {}: {} override(s) the buckets now imply dropped",
                    next.version,
                    map.tenants.len() - next.tenants.len()
                ));
                return Ok(());
            }
            Err(MoveError::Directory("the map kept changing".into()))
        };
        if let Err(e) = unpinned.await {
            self.say(&format!(
                "warning: the moved tenants' overrides stay in the map (they route the same): {e}"
            ));
        }
    }
}
