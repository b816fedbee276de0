//! Moving one hash bucket: the bucket's tenants that have keys in its cell are
//! pinned there while the map gives the bucket to the new cell (so tenants new
//! to the bucket start there), then each pinned tenant moves, a few at a time,
//! and their pins are dropped once the bucket implies them. Rerunning it
//! resumes: moves interrupted earlier are resumed first; with the bucket
//! already reassigned, `from` names the cell its pinned tenants still are in.

use cellplane_map::bucket_of;

use crate::drain::DrainReport;
use crate::{MoveError, Mover};

impl Mover {
    /// Moves bucket `bucket` to cell `to`, with its tenants' data, from `from`
    /// (default: the cell the map gives the bucket to now).
    pub async fn move_bucket(
        &self,
        bucket: u32,
        to: &str,
        from: Option<&str>,
        concurrency: usize,
    ) -> Result<DrainReport, MoveError> {
        let (map, _) = self.map().await?;
        let buckets = map.buckets;
        let ours = |t: &str| bucket_of(t, buckets) == bucket;
        let mut report = DrainReport::default();
        for r in self.list().await?.into_iter().filter(|r| ours(&r.tenant)) {
            match self.resume(&r.tenant).await {
                Ok(m) => report.moved.push(m),
                Err(e) => report.failed.push((r.tenant, e)),
            }
        }
        let now = map
            .ranges
            .iter()
            .find(|r| r.from <= bucket && bucket <= r.to)
            .map(|r| r.cell.clone())
            .ok_or_else(|| {
                MoveError::Refused(format!(
                    "no bucket {bucket}: the map has buckets 0..={}",
                    buckets.saturating_sub(1)
                ))
            })?;
        let from = from.map_or(now.clone(), str::to_string);
        if from == to {
            self.say(&format!(
                "bucket {bucket} is in cell {to} already; to finish an interrupted move, name \
                 the cell it came from (--from)"
            ));
            return Ok(report);
        }
        let change = |m: &cellplane_map::CellMap| {
            let at = m.ranges.iter().find(|r| r.from <= bucket && bucket <= r.to);
            if at.is_some_and(|r| r.cell == to) {
                return Ok(None);
            }
            m.with_bucket(bucket, to).map(Some)
        };
        let pinned = self.pin_then_change(&from, change, ours).await?;
        self.say(&format!(
            "bucket {bucket} goes to cell {to}; {} tenant(s) of it to move from {from}",
            pinned.len()
        ));
        let targets = pinned.into_iter().map(|t| (t, to.to_string())).collect();
        self.move_all(targets, concurrency, &mut report).await;
        Ok(report)
    }
}
