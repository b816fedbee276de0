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
//! Whoever can write the directory can hand every router a map, so nothing in a map
//! is trusted to be small: a document is refused past [`MAX_MAP_BYTES`] before it is
//! parsed, the parser stops any list or table past its limit, and validation checks
//! every count and length against its limit ([`MAX_BUCKETS`], [`MAX_CELLS`],
//! [`MAX_ENDPOINTS`], [`MAX_TENANT_OVERRIDES`], ...) before doing work in proportion
//! to it. Validation's work and memory grow with the number of ranges, never with
//! `buckets`. Versions stop at [`MAX_VERSION`], and [`CellMap::next_version`] is the
//! one place a successor's version is computed, so it can never wrap.
//!
//! Depends on no other cellplane crate.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// Default number of buckets: fixed for the life of a deployment.
pub const DEFAULT_BUCKETS: u32 = 4096;

/// The most buckets a map may have: 16 times the default, still 64 buckets for each
/// of [`MAX_CELLS`] cells. It bounds the number of ranges, and so the work of
/// validating a map and of looking a bucket up. Any count up to it works (a bucket
/// is a hash modulo `buckets`): it need not be a power of two.
pub const MAX_BUCKETS: u32 = 65_536;

/// The most cells a map may name.
pub const MAX_CELLS: usize = 1024;

/// The most client endpoints a cell may list: one per member, and a Raft group
/// beyond a handful of members only votes slower.
pub const MAX_ENDPOINTS: usize = 16;

/// The longest endpoint, in bytes: room for a scheme (`https://`), the longest DNS
/// name (253 bytes) and `:65535`.
pub const MAX_ENDPOINT_LEN: usize = 267;

/// The longest cell name, in bytes. A name is also limited to ASCII letters, digits,
/// `-` and `_`, the rule cell definitions follow.
pub const MAX_CELL_NAME_LEN: usize = 64;

/// The most tenants a map may pin to a cell. Overrides are for exceptions; a
/// deployment that needs more should move buckets instead. (With long tenant names
/// [`MAX_MAP_BYTES`] binds first: 100,000 overrides fit only with names of about 20
/// bytes.)
pub const MAX_TENANT_OVERRIDES: usize = 100_000;

/// The longest tenant name an override may pin, in bytes. Tenants with longer names
/// still route by their bucket; they cannot be pinned.
pub const MAX_TENANT_LEN: usize = 64;

/// The highest map version: 2^53 - 1, the largest integer a JSON reader that holds
/// numbers as doubles (JavaScript, jq) reads back exactly, so every tool in the path
/// sees the version the map carries. It is out of reach of honest use (a new map every
/// millisecond would take 285,000 years), so a map at it was written to break things.
pub const MAX_VERSION: u64 = (1 << 53) - 1;

/// The largest map document [`CellMap::from_json`] and [`CellMap::from_toml`]
/// accept, in bytes: a map of 4096 buckets over a few cells is a few KiB, so this
/// leaves room for many overrides while bounding what parsing costs.
pub const MAX_MAP_BYTES: usize = 4 << 20;

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
    #[serde(deserialize_with = "de_endpoints")]
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
    #[serde(deserialize_with = "de_cells")]
    pub cells: Vec<CellEntry>,
    /// The bucket table, as ranges that together cover every bucket once.
    #[serde(deserialize_with = "de_ranges")]
    pub ranges: Vec<BucketRange>,
    /// Tenants placed explicitly, ahead of their bucket.
    #[serde(default, deserialize_with = "de_tenants")]
    pub tenants: BTreeMap<String, String>,
}

fn default_buckets() -> u32 {
    DEFAULT_BUCKETS
}

// The lists and the table of a map stop growing at their limit while being parsed:
// a document of many tiny entries (`"",` is three bytes, a `String` is 24) would
// otherwise cost many times its own size before `validate` could refuse it.

fn de_endpoints<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    d.deserialize_seq(BoundedSeq::new("endpoints", MAX_ENDPOINTS))
}

fn de_cells<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<CellEntry>, D::Error> {
    d.deserialize_seq(BoundedSeq::new("cells", MAX_CELLS))
}

fn de_ranges<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<BucketRange>, D::Error> {
    // A valid map has at most one range per bucket.
    d.deserialize_seq(BoundedSeq::new("ranges", MAX_BUCKETS as usize))
}

fn de_tenants<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    d.deserialize_map(BoundedTable {
        field: "tenants",
        max: MAX_TENANT_OVERRIDES,
    })
}

/// Visits a list, refusing it past `max` entries.
struct BoundedSeq<T> {
    field: &'static str,
    max: usize,
    entry: PhantomData<T>,
}

impl<T> BoundedSeq<T> {
    fn new(field: &'static str, max: usize) -> Self {
        BoundedSeq {
            field,
            max,
            entry: PhantomData,
        }
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for BoundedSeq<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a list of at most {} {}", self.max, self.field)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.max));
        while let Some(entry) = seq.next_element()? {
            if out.len() == self.max {
                return Err(de::Error::custom(format!(
                    "field `{}`: more than {} entries",
                    self.field, self.max
                )));
            }
            out.push(entry);
        }
        Ok(out)
    }
}

/// Visits a table of strings, refusing it past `max` entries.
struct BoundedTable {
    field: &'static str,
    max: usize,
}

impl<'de> Visitor<'de> for BoundedTable {
    type Value = BTreeMap<String, String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a table of at most {} {}", self.max, self.field)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = BTreeMap::new();
        while let Some((k, v)) = map.next_entry::<String, String>()? {
            if out.len() == self.max {
                return Err(de::Error::custom(format!(
                    "field `{}`: more than {} entries",
                    self.field, self.max
                )));
            }
            out.insert(k, v);
        }
        Ok(out)
    }
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
    #[error("the map is {bytes} bytes, more than the {limit} a map may have")]
    TooLarge { bytes: usize, limit: usize },
    #[error("the map's version is at its maximum ({max}); no newer map can be published")]
    VersionExhausted { max: u64 },
}

/// The metadata of a cell's refusal of a tenant it does not own (gRPC
/// FAILED_PRECONDITION): the cell the map it learned sends the tenant to.
pub const MOVED_TO_METADATA: &str = "cellplane-moved-to";

/// With [`MOVED_TO_METADATA`]: the version of the map that says so.
pub const MAP_VERSION_METADATA: &str = "cellplane-map-version";

/// With [`MOVED_TO_METADATA`]: the tenant refused (for a call that names only a
/// lease ID, the lease's tenant).
pub const MOVED_TENANT_METADATA: &str = "cellplane-moved-tenant";

/// The metadata on a KV request to a cell that makes it the tenant mover's
/// write of that tenant (see the cell's ownership module). Routers never
/// forward it.
pub const MOVE_TENANT_METADATA: &str = "cellplane-move-tenant";

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

/// Refuses a document larger than [`MAX_MAP_BYTES`], before parsing it.
fn check_size(bytes: usize) -> Result<(), MapError> {
    if bytes > MAX_MAP_BYTES {
        return Err(MapError::TooLarge {
            bytes,
            limit: MAX_MAP_BYTES,
        });
    }
    Ok(())
}

impl CellMap {
    /// Parses and validates a TOML map of at most [`MAX_MAP_BYTES`]. The TOML parser
    /// builds a tree of the whole document before the map's limits apply, which can
    /// cost some 80 times the document's size: TOML is for files an operator writes,
    /// and maps from the directory are JSON.
    pub fn from_toml(text: &str) -> Result<CellMap, MapError> {
        check_size(text.len())?;
        let map: CellMap = toml::from_str(text).map_err(|e| MapError::Parse(e.to_string()))?;
        map.validate()?;
        Ok(map)
    }

    /// Parses and validates a JSON map of at most [`MAX_MAP_BYTES`].
    pub fn from_json(bytes: &[u8]) -> Result<CellMap, MapError> {
        check_size(bytes.len())?;
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
    ///
    /// Every count and length is checked against its limit before anything is done
    /// in proportion to it, and the bucket table is checked range by range, so a
    /// hostile map costs at most a few MiB and milliseconds, whatever it claims.
    pub fn validate(&self) -> Result<(), MapError> {
        let invalid = |field: &str, message: &str| MapError::Invalid {
            field: field.to_string(),
            message: message.to_string(),
        };
        if self.version == 0 {
            return Err(invalid("version", "must be at least 1"));
        }
        if self.version > MAX_VERSION {
            return Err(invalid(
                "version",
                &format!("must be at most {MAX_VERSION}, got {}", self.version),
            ));
        }
        if self.buckets == 0 {
            return Err(invalid("buckets", "must be at least 1"));
        }
        if self.buckets > MAX_BUCKETS {
            return Err(invalid(
                "buckets",
                &format!("must be at most {MAX_BUCKETS}, got {}", self.buckets),
            ));
        }
        if self.cells.is_empty() {
            return Err(invalid("cells", "the map needs at least one cell"));
        }
        if self.cells.len() > MAX_CELLS {
            return Err(invalid(
                "cells",
                &format!(
                    "a map may name at most {MAX_CELLS} cells, got {}",
                    self.cells.len()
                ),
            ));
        }
        let mut names = BTreeMap::new();
        let mut tags = BTreeMap::new();
        for (i, c) in self.cells.iter().enumerate() {
            let field = format!("cells[{i}].name");
            if c.name.is_empty() {
                return Err(invalid(&field, "must not be empty"));
            }
            // The name is not echoed: it may be anything, of any length.
            if c.name.len() > MAX_CELL_NAME_LEN {
                return Err(invalid(
                    &field,
                    &format!(
                        "must be at most {MAX_CELL_NAME_LEN} bytes, got {}",
                        c.name.len()
                    ),
                ));
            }
            if !c
                .name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
            {
                return Err(invalid(&field, "may hold only letters, digits, '-' or '_'"));
            }
            if names.insert(c.name.as_str(), i).is_some() {
                return Err(invalid(
                    &field,
                    &format!("cell `{}` is listed twice", c.name),
                ));
            }
            if let Some(other) = tags.insert(lease_tag(&c.name), c.name.as_str()) {
                return Err(invalid(
                    &field,
                    &format!(
                        "cells `{other}` and `{}` share a lease tag, so a router could not tell \
                         their leases apart; rename one",
                        c.name
                    ),
                ));
            }
            if c.endpoints.is_empty() {
                return Err(invalid(
                    &format!("cells[{i}].endpoints"),
                    "a cell needs at least one endpoint",
                ));
            }
            if c.endpoints.len() > MAX_ENDPOINTS {
                return Err(invalid(
                    &format!("cells[{i}].endpoints"),
                    &format!(
                        "a cell may list at most {MAX_ENDPOINTS} endpoints, got {}",
                        c.endpoints.len()
                    ),
                ));
            }
            for (j, e) in c.endpoints.iter().enumerate() {
                if e.is_empty() {
                    return Err(invalid(
                        &format!("cells[{i}].endpoints[{j}]"),
                        "must not be empty",
                    ));
                }
                if e.len() > MAX_ENDPOINT_LEN {
                    return Err(invalid(
                        &format!("cells[{i}].endpoints[{j}]"),
                        &format!("must be at most {MAX_ENDPOINT_LEN} bytes, got {}", e.len()),
                    ));
                }
            }
        }
        // Every range holds at least one bucket, so a map with more ranges than
        // buckets cannot be valid; this also bounds the work below by MAX_BUCKETS.
        if self.ranges.len() > self.buckets as usize {
            return Err(invalid(
                "ranges",
                &format!(
                    "{} ranges for {} buckets: a range holds at least one bucket",
                    self.ranges.len(),
                    self.buckets
                ),
            ));
        }
        // The ranges placed so far, by first bucket: (last bucket, index). Until an
        // overlap is found they are disjoint, so the lowest bucket of a new range that
        // is already taken is either its first bucket (taken by the range starting at
        // or before it) or the first bucket of the first range starting inside it.
        // Checking coverage then walks the placed ranges in order: the work and the
        // memory grow with the number of ranges, not with `buckets`.
        let mut placed: BTreeMap<u32, (u32, usize)> = BTreeMap::new();
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
            let at_start = placed
                .range(..=r.from)
                .next_back()
                .filter(|(_, (to, _))| *to >= r.from)
                .map(|(_, (_, first))| (r.from, *first));
            let taken = at_start.or_else(|| {
                placed
                    .range(r.from..=r.to)
                    .next()
                    .map(|(from, (_, first))| (*from, *first))
            });
            if let Some((bucket, first)) = taken {
                return Err(MapError::Overlap {
                    bucket,
                    first,
                    second: i,
                });
            }
            placed.insert(r.from, (r.to, i));
        }
        // The first bucket not yet covered; u64 so that it may pass the last bucket.
        let mut next = 0u64;
        for (from, (to, _)) in &placed {
            if u64::from(*from) != next {
                return Err(MapError::Unassigned {
                    bucket: next as u32,
                });
            }
            next = u64::from(*to) + 1;
        }
        if next != u64::from(self.buckets) {
            return Err(MapError::Unassigned {
                bucket: next as u32,
            });
        }
        if self.tenants.len() > MAX_TENANT_OVERRIDES {
            return Err(invalid(
                "tenants",
                &format!(
                    "a map may pin at most {MAX_TENANT_OVERRIDES} tenants, got {}",
                    self.tenants.len()
                ),
            ));
        }
        for (tenant, cell) in &self.tenants {
            if tenant.len() > MAX_TENANT_LEN {
                let start: String = tenant.chars().take(16).collect();
                return Err(invalid(
                    "tenants",
                    &format!(
                        "a pinned tenant's name must be at most {MAX_TENANT_LEN} bytes, got {} \
                         (`{start}...`)",
                        tenant.len()
                    ),
                ));
            }
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

    /// The version a map replacing this one carries: the one place a successor's
    /// version is computed, so that it never wraps and never passes
    /// [`MAX_VERSION`] (which [`CellMap::validate`] would refuse).
    pub fn next_version(&self) -> Result<u64, MapError> {
        if self.version >= MAX_VERSION {
            return Err(MapError::VersionExhausted { max: MAX_VERSION });
        }
        Ok(self.version + 1)
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

    /// The successor map with `cell`'s buckets spread over the remaining active
    /// cells and `cell` marked draining. Tenants pinned to `cell` stay pinned (an
    /// operator's choice; `cellplane cell drain` moves them).
    pub fn drained(&self, cell: &str) -> Result<CellMap, MapError> {
        let refuse = |message: String| MapError::Invalid {
            field: "cells".into(),
            message,
        };
        let entry = self
            .cells
            .iter()
            .find(|c| c.name == cell)
            .ok_or_else(|| refuse(format!("no cell {cell} in the map")))?;
        if entry.state == CellState::Draining {
            return Err(refuse(format!("cell {cell} is already draining")));
        }
        let others: Vec<&str> = self
            .cells
            .iter()
            .filter(|c| c.name != cell && c.state == CellState::Active)
            .map(|c| c.name.as_str())
            .collect();
        if others.is_empty() {
            return Err(refuse(format!(
                "cell {cell} is the last active cell: nothing to drain it to"
            )));
        }
        let mut next = self.clone();
        next.version = self.next_version()?;
        let mut ranges = Vec::new();
        let mut turn = 0;
        for r in &self.ranges {
            if r.cell != cell {
                ranges.push(r.clone());
                continue;
            }
            // Split the range evenly over the other cells.
            let len = r.to - r.from + 1;
            let parts = (others.len() as u32).min(len);
            let mut from = r.from;
            for k in 0..parts {
                let share = len / parts + u32::from(k < len % parts);
                ranges.push(BucketRange {
                    from,
                    to: from + share - 1,
                    cell: others[(turn + k as usize) % others.len()].to_string(),
                });
                from += share;
            }
            turn += 1;
        }
        ranges.sort_by_key(|r| r.from);
        next.ranges = ranges;
        for c in &mut next.cells {
            if c.name == cell {
                c.state = CellState::Draining;
            }
        }
        next.validate()?;
        Ok(next)
    }

    /// The successor map with bucket `bucket` assigned to `cell` (an active
    /// cell of the map), its range split around it and neighbours of one cell
    /// merged. Tenant overrides are kept.
    pub fn with_bucket(&self, bucket: u32, cell: &str) -> Result<CellMap, MapError> {
        let refuse = |field: &str, message: String| MapError::Invalid {
            field: field.into(),
            message,
        };
        if bucket >= self.buckets {
            return Err(refuse(
                "ranges",
                format!(
                    "no bucket {bucket}: the map has buckets 0..={}",
                    self.buckets - 1
                ),
            ));
        }
        match self.cells.iter().find(|c| c.name == cell) {
            None => return Err(refuse("cells", format!("no cell {cell} in the map"))),
            Some(c) if c.state != CellState::Active => {
                return Err(refuse(
                    "cells",
                    format!("cell {cell} is draining: give buckets to an active cell"),
                ));
            }
            Some(_) => {}
        }
        let mut split = Vec::with_capacity(self.ranges.len() + 2);
        for r in &self.ranges {
            if bucket < r.from || bucket > r.to {
                split.push(r.clone());
                continue;
            }
            let part = |from, to, cell: &str| BucketRange {
                from,
                to,
                cell: cell.to_string(),
            };
            if r.from < bucket {
                split.push(part(r.from, bucket - 1, &r.cell));
            }
            split.push(part(bucket, bucket, cell));
            if bucket < r.to {
                split.push(part(bucket + 1, r.to, &r.cell));
            }
        }
        split.sort_by_key(|r| r.from);
        let mut ranges: Vec<BucketRange> = Vec::with_capacity(split.len());
        for r in split {
            match ranges.last_mut() {
                Some(last) if last.cell == r.cell && last.to + 1 == r.from => last.to = r.to,
                _ => ranges.push(r),
            }
        }
        let mut next = self.clone();
        next.version = self.next_version()?;
        next.ranges = ranges;
        next.validate()?;
        Ok(next)
    }

    /// The cell `tenant`'s bucket is assigned to, ignoring tenant overrides.
    pub fn bucket_cell(&self, tenant: &str) -> Option<&str> {
        let b = bucket_of(tenant, self.buckets);
        self.ranges
            .iter()
            .find(|r| r.from <= b && b <= r.to)
            .map(|r| r.cell.as_str())
    }

    /// Spreads every bucket evenly over `cells`, in order, as contiguous ranges.
    /// With no cells there is nothing to assign: no ranges.
    pub fn even_ranges(cells: &[&str], buckets: u32) -> Vec<BucketRange> {
        if cells.is_empty() {
            return Vec::new();
        }
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

    #[test]
    fn one_bucket_changes_cell_and_the_ranges_stay_minimal() {
        let m = map();
        let b = m.ranges[0].to; // the last bucket of a's range
        let next = m.with_bucket(b, "b").unwrap();
        assert_eq!(next.version, 2);
        assert_eq!(next.ranges.len(), 3, "{:?}", next.ranges);
        assert_eq!(next.ranges[0].to, b - 1);
        assert_eq!(
            (next.ranges[1].from, next.ranges[1].cell.as_str()),
            (b, "b")
        );
        // A bucket in the middle splits its range in three; giving it back merges.
        let mid = next.with_bucket(100, "c").unwrap();
        assert_eq!(mid.ranges.len(), 5);
        let back = mid.with_bucket(100, "a").unwrap();
        assert_eq!(back.ranges, next.ranges);
        for t in ["x", "acme", "t-7"] {
            let moved = bucket_of(t, 4096) == b;
            assert_eq!(
                next.bucket_cell(t) == Some("b"),
                moved || m.bucket_cell(t) == Some("b")
            );
        }
        assert!(m.with_bucket(4096, "b").is_err());
        assert!(m.with_bucket(1, "zeta").is_err());
        assert!(m.drained("c").unwrap().with_bucket(1, "c").is_err());
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
        assert!(
            CellMap::even_ranges(&[], 4096).is_empty(),
            "no cells, no panic"
        );
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

    /// The field an `Invalid` error names (panics on any other outcome).
    fn invalid_field(r: Result<(), MapError>) -> String {
        match r {
            Err(MapError::Invalid { field, .. }) => field,
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    #[test]
    fn huge_bucket_count_is_refused_before_any_work() {
        // The map that crashed every router: validating it used to allocate 64 GiB.
        let mut m = map();
        m.buckets = u32::MAX;
        m.ranges = vec![BucketRange {
            from: 0,
            to: u32::MAX - 1,
            cell: "a".into(),
        }];
        let start = std::time::Instant::now();
        let err = m.validate().unwrap_err();
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!(
            err.to_string(),
            "field `buckets`: must be at most 65536, got 4294967295"
        );
        let mut m = map();
        m.buckets = MAX_BUCKETS + 1;
        assert_eq!(invalid_field(m.validate()), "buckets");
        m.buckets = 0;
        assert_eq!(invalid_field(m.validate()), "buckets");
    }

    #[test]
    fn any_bucket_count_up_to_the_limit_works() {
        for buckets in [1, 7, 4095, 4097, MAX_BUCKETS - 1, MAX_BUCKETS] {
            let mut m = map();
            m.buckets = buckets;
            m.ranges = CellMap::even_ranges(&["a", "b", "c"], buckets);
            m.validate().unwrap();
            assert!(m.cell_for("acme").is_some());
        }
        // One range per bucket, in reverse order: the most ranges a map may have.
        let mut m = map();
        m.buckets = MAX_BUCKETS;
        m.ranges = (0..MAX_BUCKETS)
            .rev()
            .map(|b| BucketRange {
                from: b,
                to: b,
                cell: "b".into(),
            })
            .collect();
        m.validate().unwrap();
    }

    #[test]
    fn coverage_errors_name_the_lowest_bucket() {
        // Ranges out of order: the overlap is found at the lowest shared bucket of the
        // later range, the gap at the lowest unassigned bucket.
        let mut m = map();
        m.ranges = vec![
            BucketRange {
                from: 2000,
                to: 4095,
                cell: "a".into(),
            },
            BucketRange {
                from: 0,
                to: 2500,
                cell: "b".into(),
            },
        ];
        assert_eq!(
            m.validate(),
            Err(MapError::Overlap {
                bucket: 2000,
                first: 0,
                second: 1
            })
        );
        m.ranges[1].to = 1000;
        assert_eq!(m.validate(), Err(MapError::Unassigned { bucket: 1001 }));
        m.ranges[0].to = 4000;
        m.ranges[1].to = 1999;
        assert_eq!(m.validate(), Err(MapError::Unassigned { bucket: 4001 }));
        m.ranges.clear();
        assert_eq!(m.validate(), Err(MapError::Unassigned { bucket: 0 }));
        // More ranges than buckets cannot cover them once each.
        let mut m = map();
        m.buckets = 2;
        m.ranges = vec![
            BucketRange {
                from: 0,
                to: 0,
                cell: "a".into(),
            };
            3
        ];
        assert_eq!(invalid_field(m.validate()), "ranges");
    }

    #[test]
    fn version_is_bounded_and_next_version_never_wraps() {
        let mut m = map();
        m.version = MAX_VERSION + 1;
        let err = m.validate().unwrap_err();
        assert_eq!(invalid_field(Err(err.clone())), "version");
        assert!(err.to_string().contains("9007199254740991"), "{err}");
        m.version = u64::MAX;
        assert_eq!(invalid_field(m.validate()), "version");
        // A map at u64::MAX in force (it can no longer be accepted) does not make
        // checking a successor overflow.
        assert!(matches!(
            map().validate_successor(&m),
            Err(MapError::NotNewer { .. })
        ));
        assert_eq!(
            m.next_version(),
            Err(MapError::VersionExhausted { max: MAX_VERSION })
        );

        m.version = MAX_VERSION;
        m.validate().unwrap();
        let err = m.next_version().unwrap_err();
        assert_eq!(
            err.to_string(),
            "the map's version is at its maximum (9007199254740991); no newer map can be \
             published"
        );
        m.version = MAX_VERSION - 1;
        assert_eq!(m.next_version(), Ok(MAX_VERSION));
        assert_eq!(map().next_version(), Ok(2));
    }

    #[test]
    fn cells_are_bounded() {
        let mut m = map();
        m.cells = (0..=MAX_CELLS)
            .map(|i| CellEntry {
                name: format!("c{i}"),
                endpoints: vec!["h:1".into()],
                state: CellState::Active,
            })
            .collect();
        assert_eq!(invalid_field(m.validate()), "cells");

        for name in ["", "a.b", "a b", "ünï", "a/b"] {
            let mut m = map();
            m.cells[1].name = name.into();
            assert_eq!(invalid_field(m.validate()), "cells[1].name", "{name:?}");
        }
        let mut m = map();
        m.cells[1].name = "x".repeat(MAX_CELL_NAME_LEN + 1);
        let err = m.validate().unwrap_err();
        assert_eq!(invalid_field(Err(err.clone())), "cells[1].name");
        assert!(!err.to_string().contains("xxxx"), "the name is not echoed");
        let mut m = map();
        m.cells[1].name = "a".into();
        let err = m.validate().unwrap_err();
        assert!(err.to_string().contains("listed twice"), "{err}");
        // Names up to the limit, of every allowed character, pass.
        let mut m = map();
        let long = format!("Az09-_{}", "q".repeat(MAX_CELL_NAME_LEN - 6));
        m.cells[1].name = long.clone();
        for r in &mut m.ranges {
            if r.cell == "b" {
                r.cell = long.clone();
            }
        }
        m.validate().unwrap();

        let mut m = map();
        m.cells[2].endpoints = vec!["h:1".into(); MAX_ENDPOINTS + 1];
        assert_eq!(invalid_field(m.validate()), "cells[2].endpoints");
        m.cells[2].endpoints = vec![];
        assert_eq!(invalid_field(m.validate()), "cells[2].endpoints");
        m.cells[2].endpoints = vec!["h:1".into(), String::new()];
        assert_eq!(invalid_field(m.validate()), "cells[2].endpoints[1]");
        m.cells[2].endpoints = vec!["h".repeat(MAX_ENDPOINT_LEN + 1)];
        assert_eq!(invalid_field(m.validate()), "cells[2].endpoints[0]");
        m.cells[2].endpoints = vec!["h".repeat(MAX_ENDPOINT_LEN); MAX_ENDPOINTS];
        m.validate().unwrap();
    }

    #[test]
    fn tenant_overrides_are_bounded() {
        let mut m = map();
        m.tenants.insert("t".repeat(MAX_TENANT_LEN), "a".into());
        m.validate().unwrap();
        m.tenants.insert("t".repeat(MAX_TENANT_LEN + 1), "a".into());
        assert_eq!(invalid_field(m.validate()), "tenants");

        let mut m = map();
        m.tenants = (0..=MAX_TENANT_OVERRIDES)
            .map(|i| (format!("t{i}"), "a".to_string()))
            .collect();
        assert_eq!(invalid_field(m.validate()), "tenants");
        m.tenants.remove("t0");
        m.validate().unwrap();
    }

    #[test]
    fn parsing_is_bounded() {
        let json = map().to_json();
        let mut big = json.clone();
        big.resize(MAX_MAP_BYTES + 1, b' ');
        assert_eq!(
            CellMap::from_json(&big),
            Err(MapError::TooLarge {
                bytes: MAX_MAP_BYTES + 1,
                limit: MAX_MAP_BYTES
            })
        );
        // Trailing whitespace up to the limit is still a map.
        big.truncate(MAX_MAP_BYTES);
        CellMap::from_json(&big).unwrap();
        let mut toml = map().to_toml();
        toml.push_str(&" ".repeat(MAX_MAP_BYTES + 1 - toml.len()));
        assert!(matches!(
            CellMap::from_toml(&toml),
            Err(MapError::TooLarge { .. })
        ));

        // Lists stop growing at their limit while being parsed.
        let mut m = map();
        m.cells[0].endpoints = vec!["h:1".into(); MAX_ENDPOINTS + 1];
        for text in [String::from_utf8(m.to_json()).unwrap(), m.to_toml()] {
            let err = if text.starts_with('{') {
                CellMap::from_json(text.as_bytes())
            } else {
                CellMap::from_toml(&text)
            }
            .unwrap_err();
            assert!(matches!(err, MapError::Parse(_)), "{err}");
            assert!(
                err.to_string().contains("`endpoints`: more than 16"),
                "{err}"
            );
        }
        let mut m = map();
        m.tenants = (0..=MAX_TENANT_OVERRIDES)
            .map(|i| (i.to_string(), "a".to_string()))
            .collect();
        let err = CellMap::from_json(&m.to_json()).unwrap_err();
        assert!(
            err.to_string().contains("`tenants`: more than 100000"),
            "{err}"
        );
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let deep = 100_000;
        let json = format!(
            "{{\"version\":1,\"cells\":{}{}}}",
            "[".repeat(deep),
            "]".repeat(deep)
        );
        assert!(matches!(
            CellMap::from_json(json.as_bytes()),
            Err(MapError::Parse(_))
        ));
        let toml = format!(
            "version = 1\ncells = {}{}\n",
            "[".repeat(deep),
            "]".repeat(deep)
        );
        assert!(matches!(CellMap::from_toml(&toml), Err(MapError::Parse(_))));
        let toml = format!("x = {}{}\n", "{a = ".repeat(deep), "}".repeat(deep));
        assert!(matches!(CellMap::from_toml(&toml), Err(MapError::Parse(_))));
    }
}
