//! The cell map: the versioned document that says which cell serves which tenant.
//!
//! A tenant's bucket is `xxHash64(tenant, seed 0) mod buckets` ([`bucket_of`]); the
//! map assigns every bucket to a cell, and may override single tenants. The hash
//! and seed are fixed forever: changing them would move every tenant at once, so
//! golden values in the tests pin them.
//!
//! On disk the map is TOML (`cells/routing.toml`); on the wire (the directory) it is
//! JSON. [`CellMap::validate`] refuses a map with an unassigned or twice-assigned
//! bucket, an unknown cell, or a bad field, naming which.
//!
//! Depends on no other cellplane crate.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Default number of buckets: fixed for the life of a deployment.
pub const DEFAULT_BUCKETS: u32 = 4096;

/// A cell's routing state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CellState {
    /// Serves its tenants.
    Active,
    /// Being emptied: keeps serving the tenants still mapped to it, receives no new
    /// buckets.
    Draining,
}

/// A cell as the router sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellEntry {
    pub name: String,
    /// Client endpoints (`host:port`) of the cell's members.
    pub endpoints: Vec<String>,
    #[serde(default = "active")]
    pub state: CellState,
}

fn active() -> CellState {
    CellState::Active
}

/// Buckets `from..=to` belong to `cell`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketRange {
    pub from: u32,
    pub to: u32,
    pub cell: String,
}

/// The cell map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellMap {
    /// Increases with every change; a router never goes back to an older map.
    pub version: u64,
    #[serde(default = "default_buckets")]
    pub buckets: u32,
    pub cells: Vec<CellEntry>,
    /// The bucket table, as ranges that together cover every bucket once.
    pub ranges: Vec<BucketRange>,
    /// Tenants placed explicitly, ahead of their bucket.
    #[serde(default)]
    pub tenants: BTreeMap<String, String>,
}

fn default_buckets() -> u32 {
    DEFAULT_BUCKETS
}

/// Why a map was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("cannot parse the map: {0}")]
    Parse(String),
    #[error("field `{field}`: {message}")]
    Invalid { field: String, message: String },
    #[error("bucket {bucket} is not assigned to any cell")]
    Unassigned { bucket: u32 },
    #[error("bucket {bucket} is assigned twice (ranges[{first}] and ranges[{second}])")]
    Overlap {
        bucket: u32,
        first: usize,
        second: usize,
    },
    #[error("{field} names unknown cell `{cell}`")]
    UnknownCell { field: String, cell: String },
    #[error("version {offered} is not newer than the version in force ({current})")]
    NotNewer { offered: u64, current: u64 },
}

/// Bits of a lease ID that name the cell holding the lease: a lease lives in one
/// cell, and a router must send KeepAlive, TimeToLive and Revoke (which carry only
/// the ID) to that cell. IDs a cell chooses are `tag << LEASE_TAG_SHIFT | random`.
pub const LEASE_TAG_SHIFT: u32 = 48;

/// The 15-bit tag of `cell` carried in the lease IDs it chooses (bit 63 stays
/// clear: lease IDs are positive).
pub fn lease_tag(cell: &str) -> u64 {
    xxhash_rust::xxh64::xxh64(cell.as_bytes(), 1) & 0x7fff
}

/// The tag a lease ID carries (see [`lease_tag`]).
pub fn lease_tag_of(id: i64) -> u64 {
    (id as u64 >> LEASE_TAG_SHIFT) & 0x7fff
}

/// The bucket of `tenant`: xxHash64 with seed 0 over the tenant's UTF-8 bytes,
/// modulo `buckets`.
pub fn bucket_of(tenant: &str, buckets: u32) -> u32 {
    (xxhash_rust::xxh64::xxh64(tenant.as_bytes(), 0) % u64::from(buckets)) as u32
}

impl CellMap {
    pub fn from_toml(text: &str) -> Result<CellMap, MapError> {
        let map: CellMap = toml::from_str(text).map_err(|e| MapError::Parse(e.to_string()))?;
        map.validate()?;
        Ok(map)
    }

    pub fn from_json(bytes: &[u8]) -> Result<CellMap, MapError> {
        let map: CellMap =
            serde_json::from_slice(bytes).map_err(|e| MapError::Parse(e.to_string()))?;
        map.validate()?;
        Ok(map)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Checks the map on its own.
    pub fn validate(&self) -> Result<(), MapError> {
        let invalid = |field: &str, message: &str| MapError::Invalid {
            field: field.to_string(),
            message: message.to_string(),
        };
        if self.version == 0 {
            return Err(invalid("version", "must be at least 1"));
        }
        if self.buckets == 0 {
            return Err(invalid("buckets", "must be at least 1"));
        }
        if self.cells.is_empty() {
            return Err(invalid("cells", "the map needs at least one cell"));
        }
        let mut names = BTreeMap::new();
        let mut tags = BTreeMap::new();
        for (i, c) in self.cells.iter().enumerate() {
            if let Some(other) = tags.insert(lease_tag(&c.name), c.name.as_str()) {
                return Err(invalid(
                    &format!("cells[{i}].name"),
                    &format!(
                        "cells `{other}` and `{}` share a lease tag, so a router could not tell \
                         their leases apart; rename one",
                        c.name
                    ),
                ));
            }
            if c.name.is_empty() {
                return Err(invalid(&format!("cells[{i}].name"), "must not be empty"));
            }
            if names.insert(c.name.as_str(), i).is_some() {
                return Err(invalid(
                    &format!("cells[{i}].name"),
                    &format!("cell `{}` is listed twice", c.name),
                ));
            }
            if c.endpoints.is_empty() {
                return Err(invalid(
                    &format!("cells[{i}].endpoints"),
                    "a cell needs at least one endpoint",
                ));
            }
        }
        let mut owner: Vec<Option<usize>> = vec![None; self.buckets as usize];
        for (i, r) in self.ranges.iter().enumerate() {
            if !names.contains_key(r.cell.as_str()) {
                return Err(MapError::UnknownCell {
                    field: format!("ranges[{i}].cell"),
                    cell: r.cell.clone(),
                });
            }
            if r.from > r.to || r.to >= self.buckets {
                return Err(invalid(
                    &format!("ranges[{i}]"),
                    &format!(
                        "needs from <= to < buckets ({}), got {}..={}",
                        self.buckets, r.from, r.to
                    ),
                ));
            }
            for b in r.from..=r.to {
                if let Some(first) = owner[b as usize] {
                    return Err(MapError::Overlap {
                        bucket: b,
                        first,
                        second: i,
                    });
                }
                owner[b as usize] = Some(i);
            }
        }
        if let Some(b) = owner.iter().position(Option::is_none) {
            return Err(MapError::Unassigned { bucket: b as u32 });
        }
        for (tenant, cell) in &self.tenants {
            if !names.contains_key(cell.as_str()) {
                return Err(MapError::UnknownCell {
                    field: format!("tenants.{tenant}"),
                    cell: cell.clone(),
                });
            }
        }
        Ok(())
    }

    /// Checks that this map may replace `current`.
    pub fn validate_successor(&self, current: &CellMap) -> Result<(), MapError> {
        self.validate()?;
        if self.version <= current.version {
            return Err(MapError::NotNewer {
                offered: self.version,
                current: current.version,
            });
        }
        Ok(())
    }

    /// The cell that serves `tenant`.
    pub fn cell_for(&self, tenant: &str) -> Option<&CellEntry> {
        let name = match self.tenants.get(tenant) {
            Some(c) => c.as_str(),
            None => {
                let b = bucket_of(tenant, self.buckets);
                self.ranges
                    .iter()
                    .find(|r| r.from <= b && b <= r.to)
                    .map(|r| r.cell.as_str())?
            }
        };
        self.cells.iter().find(|c| c.name == name)
    }

    /// Spreads every bucket evenly over `cells`, in order, as contiguous ranges.
    pub fn even_ranges(cells: &[&str], buckets: u32) -> Vec<BucketRange> {
        let n = cells.len() as u32;
        let mut out = Vec::new();
        let mut from = 0;
        for (i, c) in cells.iter().enumerate() {
            let share = buckets / n + u32::from((i as u32) < buckets % n);
            if share == 0 {
                continue;
            }
            out.push(BucketRange {
                from,
                to: from + share - 1,
                cell: c.to_string(),
            });
            from += share;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> CellMap {
        CellMap {
            version: 1,
            buckets: 4096,
            cells: ["a", "b", "c"]
                .iter()
                .map(|n| CellEntry {
                    name: n.to_string(),
                    endpoints: vec![format!("{n}:2379")],
                    state: CellState::Active,
                })
                .collect(),
            ranges: CellMap::even_ranges(&["a", "b", "c"], 4096),
            tenants: BTreeMap::new(),
        }
    }

    /// The tenant → bucket mapping must never change silently: these values pin
    /// xxHash64 with seed 0, modulo 4096. They were computed with an independent
    /// implementation (Python's `xxhash` package).
    #[test]
    fn bucket_hash_golden_values() {
        // xxHash64("", seed 0) is the published test vector.
        assert_eq!(xxhash_rust::xxh64::xxh64(b"", 0), 0xEF46_DB37_51D8_E999);
        let golden = [
            ("", 2457),
            ("acme", 3084),
            ("globex", 428),
            ("initech", 579),
            ("a", 3675),
            ("b", 3995),
            ("c", 2029),
        ];
        for (tenant, bucket) in golden {
            assert_eq!(bucket_of(tenant, 4096), bucket, "tenant {tenant:?}");
        }
    }

    #[test]
    fn even_ranges_cover_every_bucket_once() {
        let r = CellMap::even_ranges(&["a", "b", "c"], 4096);
        assert_eq!(r[0].from, 0);
        assert_eq!(r[2].to, 4095);
        assert_eq!(
            r.iter().map(|r| r.to - r.from + 1).collect::<Vec<_>>(),
            [1366, 1365, 1365]
        );
        map().validate().unwrap();
    }

    #[test]
    fn validation_names_what_is_wrong() {
        let mut m = map();
        m.ranges[1].from += 1;
        assert_eq!(m.validate(), Err(MapError::Unassigned { bucket: 1366 }));
        let mut m = map();
        m.ranges[1].from -= 1;
        assert_eq!(
            m.validate(),
            Err(MapError::Overlap {
                bucket: 1365,
                first: 0,
                second: 1
            })
        );
        let mut m = map();
        m.ranges[2].cell = "zz".into();
        assert_eq!(
            m.validate(),
            Err(MapError::UnknownCell {
                field: "ranges[2].cell".into(),
                cell: "zz".into()
            })
        );
        let mut m = map();
        m.tenants.insert("acme".into(), "nope".into());
        assert!(matches!(m.validate(), Err(MapError::UnknownCell { .. })));
        let m2 = map();
        assert_eq!(
            m2.validate_successor(&map()),
            Err(MapError::NotNewer {
                offered: 1,
                current: 1
            })
        );
    }

    #[test]
    fn overrides_win_over_buckets_and_round_trip() {
        let mut m = map();
        let natural = m.cell_for("acme").unwrap().name.clone();
        let other = if natural == "a" { "b" } else { "a" };
        m.tenants.insert("acme".into(), other.into());
        assert_eq!(m.cell_for("acme").unwrap().name, other);
        assert_eq!(CellMap::from_toml(&m.to_toml()).unwrap(), m);
        assert_eq!(CellMap::from_json(&m.to_json()).unwrap(), m);
    }
}
