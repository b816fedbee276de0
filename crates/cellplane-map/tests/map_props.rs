//! The cell map against hostile input. Whoever can write the directory can hand
//! every router a map, so for any map and any document:
//!
//! - validating and parsing never panic;
//! - a map that is accepted covers every bucket exactly once, and routes any tenant;
//! - the coverage errors are the ones the old table-based check reported;
//! - validating or parsing never allocates more than a fixed bound, whatever the map
//!   claims (the test binary counts every allocation with the `cap` allocator and
//!   caps what the code under test may take).

use std::alloc::System;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

use cap::Cap;
use cellplane_map::{
    BucketRange, CellEntry, CellMap, CellState, MAX_BUCKETS, MAX_CELL_NAME_LEN, MAX_CELLS,
    MAX_ENDPOINT_LEN, MAX_ENDPOINTS, MAX_MAP_BYTES, MAX_TENANT_LEN, MAX_TENANT_OVERRIDES,
    MAX_VERSION, MapError, lease_tag,
};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;

/// Counts every allocation of this test binary, so that a test can cap what the code
/// under test may allocate.
#[global_allocator]
static ALLOC: Cap<System> = Cap::new(System, usize::MAX);

/// The allocation cap is process-wide, so the tests in this file run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    // A failed test poisons the lock; the others still run.
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// The bounds below were set from measurements (with cap's `stats` feature, release
// build): validating the largest map within every limit peaks under 5 MiB; parsing a
// JSON document of MAX_MAP_BYTES under 16 MiB, hostile or not; parsing TOML up to
// about 80 times the document (330 MB for 4 MiB of `0,`), because toml 1.2 lexes the
// whole document into 24-byte tokens and builds a tree of it before the map's limits
// apply. TOML comes only from files an operator writes (the static map, `map
// apply`); maps from the directory and the last-known-good copy are JSON.

/// The most that validating one map may allocate beyond what was allocated before.
/// The old check took `buckets` × 16 bytes: 64 GiB for `buckets = u32::MAX`.
const VALIDATE_BOUND: usize = 16 << 20;

/// The most that parsing and validating one JSON document of at most
/// [`MAX_MAP_BYTES`] may allocate beyond the document: 8 times the largest document.
const JSON_PARSE_BOUND: usize = 8 * MAX_MAP_BYTES;

/// The same for TOML: 96 times the largest document (see above).
const TOML_PARSE_BOUND: usize = 96 * MAX_MAP_BYTES;

/// Lifts the allocation cap when dropped, also when the capped code panicked.
struct Uncap;

impl Drop for Uncap {
    fn drop(&mut self) {
        let _ = ALLOC.set_limit(usize::MAX);
    }
}

/// Runs `f` with at most `bound` bytes allocatable beyond what is allocated now. An
/// allocation past the bound fails, and Rust aborts the process on a failed
/// allocation ("memory allocation of N bytes failed"), so the test run fails, loudly.
/// Callers hold [`serial`], as every test here does while it runs; only proptest
/// generating another test's next input (a few KiB) may allocate meanwhile, well
/// within the bounds' margins.
fn capped<R>(bound: usize, f: impl FnOnce() -> R) -> R {
    ALLOC
        .set_limit(ALLOC.allocated() + bound)
        .expect("the cap is above what is allocated");
    let _uncap = Uncap;
    f()
}

// ---------------------------------------------------------------------------------
// Random maps.

// Each field is mostly valid and sometimes hostile, so that a good share of the
// maps is accepted (and checked for soundness) and the rest probes every refusal.

fn version() -> impl Strategy<Value = u64> {
    prop_oneof![
        24 => 1..1000u64,
        1 => Just(0),
        1 => Just(MAX_VERSION - 1),
        1 => Just(MAX_VERSION),
        1 => Just(MAX_VERSION + 1),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ]
}

fn buckets() -> impl Strategy<Value = u32> {
    prop_oneof![
        16 => 1..64u32,
        4 => Just(4096),
        1 => Just(1),
        1 => Just(MAX_BUCKETS),
        1 => Just(0),
        1 => Just(MAX_BUCKETS + 1),
        1 => Just(u32::MAX),
        1 => any::<u32>(),
    ]
}

fn cell_name() -> impl Strategy<Value = String> {
    prop_oneof![
        40 => "[a-z]{1,3}",
        1 => Just(String::new()),
        1 => "[a-z0-9_. /-]{0,70}",
        1 => Just("n".repeat(MAX_CELL_NAME_LEN + 1)),
    ]
}

fn endpoint() -> impl Strategy<Value = String> {
    prop_oneof![
        80 => "[a-z0-9.]{1,12}:[0-9]{1,5}",
        1 => Just(String::new()),
        1 => Just("h".repeat(MAX_ENDPOINT_LEN + 1)),
    ]
}

fn cell() -> impl Strategy<Value = CellEntry> {
    let endpoints = prop_oneof![
        40 => vec(endpoint(), 1..4),
        1 => Just(vec![]),
        1 => Just(vec!["h:1".to_string(); MAX_ENDPOINTS + 1]),
    ];
    (cell_name(), endpoints, any::<bool>()).prop_map(|(name, endpoints, active)| CellEntry {
        name,
        endpoints,
        state: if active {
            CellState::Active
        } else {
            CellState::Draining
        },
    })
}

/// A cell of the map (`Some`: an index into its cells), or one it does not name.
fn owner() -> impl Strategy<Value = Option<prop::sample::Index>> {
    prop_oneof![
        40 => any::<prop::sample::Index>().prop_map(Some),
        1 => Just(None),
    ]
}

fn owner_name(cells: &[CellEntry], owner: Option<prop::sample::Index>) -> String {
    match owner {
        Some(i) if !cells.is_empty() => cells[i.index(cells.len())].name.clone(),
        _ => "unknown".to_string(),
    }
}

/// How to build a map's ranges: a partition of the buckets at random cuts (so that
/// many maps are valid), shuffled, then perhaps damaged.
#[derive(Debug, Clone)]
struct RangePlan {
    cuts: Vec<u32>,
    /// The cell each range goes to.
    owners: Vec<Option<prop::sample::Index>>,
    /// Sort keys that shuffle the ranges.
    order: Vec<u32>,
    /// (range, change to `from`, change to `to`).
    damage: Vec<(usize, i64, i64)>,
    /// Ranges of any bounds, added as they are.
    raw: Vec<(u32, u32, Option<prop::sample::Index>)>,
}

fn range_plan() -> impl Strategy<Value = RangePlan> {
    (
        vec(any::<u32>(), 0..12),
        vec(owner(), 13),
        vec(any::<u32>(), 13),
        prop_oneof![
            2 => Just(vec![]),
            1 => vec((0..13usize, -2i64..=2, -2i64..=2), 1..3),
        ],
        prop_oneof![
            8 => Just(vec![]),
            1 => vec((any::<u32>(), any::<u32>(), owner()), 1..3),
        ],
    )
        .prop_map(|(cuts, owners, order, damage, raw)| RangePlan {
            cuts,
            owners,
            order,
            damage,
            raw,
        })
}

fn nudge(x: u32, by: i64) -> u32 {
    (i64::from(x) + by).clamp(0, i64::from(u32::MAX)) as u32
}

fn build_ranges(buckets: u32, cells: &[CellEntry], plan: &RangePlan) -> Vec<BucketRange> {
    let mut ranges = Vec::new();
    if buckets > 0 {
        let mut starts: Vec<u32> = plan.cuts.iter().map(|c| c % buckets).collect();
        starts.push(0);
        starts.sort_unstable();
        starts.dedup();
        for (k, from) in starts.iter().enumerate() {
            let to = starts.get(k + 1).map_or(buckets - 1, |next| next - 1);
            let cell = owner_name(cells, plan.owners[k]);
            ranges.push((plan.order[k], *from, to, cell));
        }
    }
    ranges.sort_by_key(|r| r.0);
    let mut ranges: Vec<BucketRange> = ranges
        .into_iter()
        .map(|(_, from, to, cell)| BucketRange { from, to, cell })
        .collect();
    for (i, df, dt) in &plan.damage {
        if let Some(r) = ranges.get_mut(*i) {
            r.from = nudge(r.from, *df);
            r.to = nudge(r.to, *dt);
        }
    }
    for (from, to, cell) in &plan.raw {
        ranges.push(BucketRange {
            from: *from,
            to: *to,
            cell: owner_name(cells, *cell),
        });
    }
    ranges
}

fn cell_map() -> impl Strategy<Value = CellMap> {
    let cells = prop_oneof![
        15 => vec(cell(), 1..6),
        1 => Just(vec![]),
    ];
    let tenant = prop_oneof![
        20 => "[a-z]{0,8}",
        1 => Just("t".repeat(MAX_TENANT_LEN + 1)),
    ];
    (
        version(),
        buckets(),
        cells,
        range_plan(),
        btree_map(tenant, owner(), 0..4),
    )
        .prop_map(|(version, buckets, cells, plan, tenants)| {
            let ranges = build_ranges(buckets, &cells, &plan);
            let tenants = tenants
                .into_iter()
                .map(|(t, owner)| (t, owner_name(&cells, owner)))
                .collect();
            CellMap {
                version,
                buckets,
                cells,
                ranges,
                tenants,
            }
        })
}

/// The validation the map had before it was bounded, verbatim but for taking the
/// map as an argument: an ownership table of `buckets` entries, so only run on small
/// maps.
fn table_validate(m: &CellMap) -> Result<(), MapError> {
    let invalid = |field: &str, message: &str| MapError::Invalid {
        field: field.to_string(),
        message: message.to_string(),
    };
    if m.version == 0 {
        return Err(invalid("version", "must be at least 1"));
    }
    if m.buckets == 0 {
        return Err(invalid("buckets", "must be at least 1"));
    }
    if m.cells.is_empty() {
        return Err(invalid("cells", "the map needs at least one cell"));
    }
    let mut names = BTreeMap::new();
    let mut tags = BTreeMap::new();
    for (i, c) in m.cells.iter().enumerate() {
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
    let mut owner: Vec<Option<usize>> = vec![None; m.buckets as usize];
    for (i, r) in m.ranges.iter().enumerate() {
        if !names.contains_key(r.cell.as_str()) {
            return Err(MapError::UnknownCell {
                field: format!("ranges[{i}].cell"),
                cell: r.cell.clone(),
            });
        }
        if r.from > r.to || r.to >= m.buckets {
            return Err(invalid(
                &format!("ranges[{i}]"),
                &format!(
                    "needs from <= to < buckets ({}), got {}..={}",
                    m.buckets, r.from, r.to
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
    Ok(())
}

/// Checks what an accepted map promises, with a table independent of the map's code.
fn assert_sound(m: &CellMap, probes: &[String]) {
    assert!((1..=MAX_BUCKETS).contains(&m.buckets));
    assert!((1..=MAX_VERSION).contains(&m.version));
    let mut held = vec![0u32; m.buckets as usize];
    for r in &m.ranges {
        for b in r.from..=r.to {
            held[b as usize] += 1;
        }
    }
    if let Some(b) = held.iter().position(|n| *n != 1) {
        panic!("accepted map holds bucket {b} {} times", held[b]);
    }
    for t in probes.iter().chain(m.tenants.keys()) {
        assert!(m.cell_for(t).is_some(), "tenant {t:?} routes nowhere");
    }
    assert_eq!(m.next_version().is_ok(), m.version < MAX_VERSION);
    assert_eq!(CellMap::from_json(&m.to_json()).as_ref(), Ok(m));
    assert_eq!(CellMap::from_toml(&m.to_toml()).as_ref(), Ok(m));
}

proptest! {
    // A failure prints the input that failed; no regression file is kept.
    #![proptest_config(ProptestConfig {
        cases: 384,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn validation_never_panics_and_accepts_only_sound_maps(
        m in cell_map(),
        other in cell_map(),
        probes in vec("[a-z0-9/]{0,12}", 4),
    ) {
        let _serial = serial();
        let verdict = m.validate();
        let _ = m.validate_successor(&other);
        let _ = other.validate_successor(&m);
        let _ = m.next_version();
        if verdict.is_ok() {
            assert_sound(&m, &probes);
            prop_assert_eq!(
                m.validate_successor(&other).is_ok(),
                m.version > other.version
            );
        }
        // Where the old check could run and reached the bucket table, it agrees.
        let reached_ranges = match &verdict {
            Ok(()) | Err(MapError::Unassigned { .. } | MapError::Overlap { .. }) => true,
            Err(MapError::UnknownCell { field, .. } | MapError::Invalid { field, .. }) => {
                field.starts_with("ranges[")
            }
            Err(_) => false,
        };
        if reached_ranges && m.buckets <= 4096 {
            prop_assert_eq!(&verdict, &table_validate(&m));
        }
    }

    #[test]
    fn random_bytes_never_panic_the_parsers(bytes in vec(any::<u8>(), 0..600)) {
        let _serial = serial();
        let _ = CellMap::from_json(&bytes);
        let _ = CellMap::from_toml(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn map_like_text_never_panics_the_parsers(
        text in "[{}\\[\\]\":,=0-9a-z \n._-]{0,400}",
    ) {
        let _serial = serial();
        let _ = CellMap::from_json(text.as_bytes());
        let _ = CellMap::from_toml(&text);
    }

    /// A valid document damaged in a few places: parsing never panics, and whatever
    /// it accepts is sound.
    #[test]
    fn damaged_documents_never_panic_the_parsers(
        m in cell_map(),
        edits in vec((any::<prop::sample::Index>(), 0..4usize, "[{}\\[\\]\":,=0-9 \n-]{0,3}"), 1..4),
        probes in vec("[a-z0-9]{0,8}", 2),
    ) {
        let _serial = serial();
        for json in [true, false] {
            let mut text = if json {
                String::from_utf8(m.to_json()).unwrap()
            } else {
                m.to_toml()
            };
            for (at, cut, insert) in &edits {
                let mut at = at.index(text.len() + 1);
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                let mut end = (at + cut).min(text.len());
                while !text.is_char_boundary(end) {
                    end += 1;
                }
                text.replace_range(at..end, insert);
            }
            let parsed = if json {
                CellMap::from_json(text.as_bytes())
            } else {
                CellMap::from_toml(&text)
            };
            if let Ok(p) = parsed {
                assert_sound(&p, &probes);
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Allocation bounds.

/// `n` cell names whose lease tags differ: a map naming two cells of one tag is
/// refused, and with 15-bit tags a thousand names picked blindly almost surely clash.
fn cell_names(n: usize) -> Vec<String> {
    let mut tags = BTreeSet::new();
    (0..)
        .map(|i| format!("cell-{i}"))
        .filter(|name| tags.insert(lease_tag(name)))
        .take(n)
        .collect()
}

fn cells(names: &[String], endpoints: usize, endpoint_len: usize) -> Vec<CellEntry> {
    names
        .iter()
        .map(|name| CellEntry {
            name: name.clone(),
            endpoints: vec!["h".repeat(endpoint_len); endpoints],
            state: CellState::Active,
        })
        .collect()
}

fn one_range_per_bucket(buckets: u32, names: &[String]) -> Vec<BucketRange> {
    // In reverse order, so that every range lands before all the ones placed.
    (0..buckets)
        .rev()
        .map(|b| BucketRange {
            from: b,
            to: b,
            cell: names[b as usize % names.len()].clone(),
        })
        .collect()
}

/// A map at every limit at once: the most work a valid map can ask of validation.
fn largest_map() -> CellMap {
    let names = cell_names(MAX_CELLS);
    CellMap {
        version: MAX_VERSION,
        buckets: MAX_BUCKETS,
        cells: cells(&names, MAX_ENDPOINTS, MAX_ENDPOINT_LEN),
        ranges: one_range_per_bucket(MAX_BUCKETS, &names),
        tenants: (0..MAX_TENANT_OVERRIDES)
            .map(|i| {
                (
                    format!("{i:0width$}", width = MAX_TENANT_LEN),
                    names[i % names.len()].clone(),
                )
            })
            .collect(),
    }
}

/// The check itself: under the cap, an allocation past the bound fails.
#[test]
fn the_cap_refuses_an_allocation_past_the_bound() {
    let _serial = serial();
    let over = capped(1 << 20, || Vec::<u8>::new().try_reserve(2 << 20).is_err());
    assert!(over, "an allocation past the bound succeeded");
    let within = capped(1 << 20, || Vec::<u8>::new().try_reserve(1 << 19).is_ok());
    assert!(within);
}

#[test]
fn validating_hostile_maps_allocates_within_the_bound() {
    let _serial = serial();
    let names = cell_names(3);
    let small = CellMap {
        version: 1,
        buckets: 4096,
        cells: cells(&names, 3, 12),
        ranges: CellMap::even_ranges(&names.iter().map(String::as_str).collect::<Vec<_>>(), 4096),
        tenants: BTreeMap::new(),
    };
    capped(VALIDATE_BOUND, || small.validate()).unwrap();

    // The map that crashed every router.
    let mut m = small.clone();
    m.buckets = u32::MAX;
    m.ranges = vec![BucketRange {
        from: 0,
        to: u32::MAX - 1,
        cell: names[0].clone(),
    }];
    let err = capped(VALIDATE_BOUND, || m.validate()).unwrap_err();
    assert!(err.to_string().starts_with("field `buckets`"), "{err}");

    // Just within the limit on buckets, with one huge range and with one range per
    // bucket; and far more ranges than buckets.
    m.buckets = MAX_BUCKETS;
    m.ranges = vec![BucketRange {
        from: 0,
        to: MAX_BUCKETS - 1,
        cell: names[0].clone(),
    }];
    capped(VALIDATE_BOUND, || m.validate()).unwrap();
    m.ranges = one_range_per_bucket(MAX_BUCKETS, &names);
    capped(VALIDATE_BOUND, || m.validate()).unwrap();
    m.ranges.extend(one_range_per_bucket(MAX_BUCKETS, &names));
    let err = capped(VALIDATE_BOUND, || m.validate()).unwrap_err();
    assert!(err.to_string().starts_with("field `ranges`"), "{err}");

    // Every limit reached at once: accepted, within the bound.
    let largest = largest_map();
    capped(VALIDATE_BOUND, || largest.validate()).unwrap();
    capped(VALIDATE_BOUND, || largest.validate_successor(&small)).unwrap();
    capped(VALIDATE_BOUND, || small.validate_successor(&largest)).unwrap_err();
    assert!(capped(VALIDATE_BOUND, || largest.next_version()).is_err());

    // Each limit passed by one, and by far.
    let mut m = largest.clone();
    m.cells = cells(&cell_names(MAX_CELLS + 1), 1, 8);
    let err = capped(VALIDATE_BOUND, || m.validate()).unwrap_err();
    assert!(err.to_string().starts_with("field `cells`"), "{err}");
    // Refused on their number, before their names (and lease tags) are looked at.
    let many: Vec<String> = (0..100 * MAX_CELLS).map(|i| format!("c{i}")).collect();
    m.cells = cells(&many, 1, 8);
    let err = capped(VALIDATE_BOUND, || m.validate()).unwrap_err();
    assert!(err.to_string().starts_with("field `cells`"), "{err}");

    let mut m = largest.clone();
    m.tenants.insert("one-too-many".into(), names[0].clone());
    let err = capped(VALIDATE_BOUND, || m.validate()).unwrap_err();
    assert!(err.to_string().starts_with("field `tenants`"), "{err}");

    let mut m = small.clone();
    m.cells[1].endpoints = vec!["h:1".into(); 100_000];
    let err = capped(VALIDATE_BOUND, || m.validate()).unwrap_err();
    assert!(
        err.to_string().starts_with("field `cells[1].endpoints`"),
        "{err}"
    );
    m.cells[1].endpoints = vec!["h".repeat(MAX_MAP_BYTES)];
    let err = capped(VALIDATE_BOUND, || m.validate()).unwrap_err();
    assert!(
        err.to_string().starts_with("field `cells[1].endpoints[0]`"),
        "{err}"
    );
    let mut m = small.clone();
    m.cells[1].name = "n".repeat(MAX_MAP_BYTES);
    let err = capped(VALIDATE_BOUND, || m.validate()).unwrap_err();
    assert!(
        err.to_string().starts_with("field `cells[1].name`"),
        "{err}"
    );
    assert!(err.to_string().len() < 200, "the name is not echoed");
}

/// `head`, then `entry` repeated (separated by `sep`) as often as fits in
/// [`MAX_MAP_BYTES`], then `tail`.
fn fill(head: &str, entry: &str, sep: &str, tail: &str) -> String {
    let room = MAX_MAP_BYTES - head.len() - tail.len();
    let n = (room + sep.len()) / (entry.len() + sep.len());
    let mut s = String::with_capacity(MAX_MAP_BYTES);
    s.push_str(head);
    for i in 0..n {
        if i > 0 {
            s.push_str(sep);
        }
        s.push_str(entry);
    }
    s.push_str(tail);
    s
}

/// A document that pins as many distinct tenants as fit.
fn many_tenants(json: bool) -> String {
    let mut s = String::from(if json {
        r#"{"version":1,"cells":[],"ranges":[],"tenants":{"#
    } else {
        "version = 1\ncells = []\nranges = []\n[tenants]\n"
    });
    for i in 0.. {
        let entry = if json {
            format!(r#""{i:x}":"a","#)
        } else {
            format!("{i:x} = \"a\"\n")
        };
        if s.len() + entry.len() + 2 > MAX_MAP_BYTES {
            break;
        }
        s.push_str(&entry);
    }
    if json {
        s.pop();
        s.push_str("}}");
    }
    s
}

/// Nesting as deep as fits.
fn deep(head: &str, tail: &str) -> String {
    let depth = (MAX_MAP_BYTES - head.len() - tail.len()) / 2;
    format!("{head}{}{}{tail}", "[".repeat(depth), "]".repeat(depth))
}

/// Builds one document.
type Build = fn() -> String;

/// Documents of at most [`MAX_MAP_BYTES`] built to cost the parser the most: many
/// tiny entries, one huge string, deep nesting. Each is built only when it is
/// parsed, so that no more than one is held at a time.
fn hostile_documents() -> Vec<(&'static str, Build)> {
    vec![
        ("json: many endpoints", || {
            fill(
                r#"{"version":1,"ranges":[],"cells":[{"name":"a","endpoints":["#,
                r#""""#,
                ",",
                "]}]}",
            )
        }),
        ("json: many cells", || {
            fill(
                r#"{"version":1,"ranges":[],"cells":["#,
                r#"{"name":"a","endpoints":["h:1"]}"#,
                ",",
                "]}",
            )
        }),
        ("json: many ranges", || {
            fill(
                r#"{"version":1,"cells":[{"name":"a","endpoints":["h:1"]}],"ranges":["#,
                r#"{"from":0,"to":0,"cell":"a"}"#,
                ",",
                "]}",
            )
        }),
        ("json: many tenants", || many_tenants(true)),
        ("json: many unknown values", || {
            fill(r#"{"version":1,"x":["#, "0", ",", "]}")
        }),
        ("json: one huge name", || {
            fill(
                r#"{"version":1,"ranges":[],"cells":[{"name":""#,
                "n",
                "",
                r#"","endpoints":["h:1"]}]}"#,
            )
        }),
        ("json: deep nesting", || {
            deep(r#"{"version":1,"cells":"#, "}")
        }),
        ("toml: many endpoints", || {
            fill(
                "version = 1\nranges = []\n[[cells]]\nname = \"a\"\nendpoints = [",
                "\"\"",
                ",",
                "]\n",
            )
        }),
        ("toml: many cells", || {
            fill(
                "version = 1\nranges = []\n",
                "[[cells]]\nname = \"a\"\nendpoints = [\"h:1\"]\n",
                "",
                "",
            )
        }),
        ("toml: many ranges", || {
            fill(
                "version = 1\n[[cells]]\nname = \"a\"\nendpoints = [\"h:1\"]\n",
                "[[ranges]]\nfrom = 0\nto = 0\ncell = \"a\"\n",
                "",
                "",
            )
        }),
        ("toml: many tenants", || many_tenants(false)),
        ("toml: many unknown values", || {
            fill("version = 1\nx = [", "0", ",", "]\n")
        }),
        ("toml: one huge name", || {
            fill(
                "version = 1\nranges = []\n[[cells]]\nname = \"",
                "n",
                "",
                "\"\nendpoints = [\"h:1\"]\n",
            )
        }),
        ("toml: deep nesting", || deep("version = 1\nx = ", "\n")),
    ]
}

#[test]
fn parsing_hostile_documents_allocates_within_the_bound() {
    let _serial = serial();
    for (what, build) in hostile_documents() {
        let doc = build();
        assert!(doc.len() <= MAX_MAP_BYTES, "{what}: {} bytes", doc.len());
        let parsed = if what.starts_with("json") {
            capped(JSON_PARSE_BOUND, || CellMap::from_json(doc.as_bytes()))
        } else {
            capped(TOML_PARSE_BOUND, || CellMap::from_toml(&doc))
        };
        assert!(parsed.is_err(), "{what}: accepted");
    }

    // A document past the limit is refused before it is parsed.
    let mut huge = CellMap::from_json(br#"{"version":1,"cells":[{"name":"a","endpoints":["h:1"]}],"ranges":[{"from":0,"to":4095,"cell":"a"}]}"#)
        .unwrap()
        .to_json();
    huge.resize(16 * MAX_MAP_BYTES, b' ');
    let err = capped(4096, || CellMap::from_json(&huge)).unwrap_err();
    assert_eq!(
        err,
        MapError::TooLarge {
            bytes: 16 * MAX_MAP_BYTES,
            limit: MAX_MAP_BYTES
        }
    );

    // The largest map that fits a document parses within the bound too.
    let mut m = largest_map();
    m.cells = cells(&cell_names(MAX_CELLS), 2, 20);
    m.tenants.clear();
    let json = m.to_json();
    let toml = m.to_toml();
    assert!(json.len() <= MAX_MAP_BYTES && toml.len() <= MAX_MAP_BYTES);
    assert_eq!(
        capped(JSON_PARSE_BOUND, || CellMap::from_json(&json)),
        Ok(m.clone())
    );
    assert_eq!(
        capped(TOML_PARSE_BOUND, || CellMap::from_toml(&toml)),
        Ok(m)
    );
}
