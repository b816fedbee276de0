//! What was measured: an HDR histogram of latencies per operation per cell, and a
//! per-second series per cell (successes, errors by gRPC code, a histogram of that
//! second's latencies). Recorders merge, so runs can be recorded in parts (clients,
//! rounds) and added up exactly.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Latencies are recorded in microseconds, 1 µs to 1 hour (longer ones saturate).
pub const HIGHEST_US: u64 = 3_600_000_000;
/// Totals keep 3 significant digits; per-second histograms 2 (1 % is plenty for a
/// plot, and keeps a second's histogram at a few KiB).
const TOTAL_SIGFIG: u8 = 3;
const SECOND_SIGFIG: u8 = 2;

pub fn histogram(sigfig: u8) -> Histogram<u64> {
    // The bounds and precision are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1, HIGHEST_US, sigfig).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, HIGHEST_US)
}

/// The name of a gRPC code, as reported (`Ok`, `Unavailable`, `DeadlineExceeded`, …).
pub fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "Ok",
        other => cellplane_proto::code_label(other),
    }
}

fn bump(map: &mut BTreeMap<String, u64>, key: &str, n: u64) {
    match map.get_mut(key) {
        Some(c) => *c += n,
        None => {
            map.insert(key.to_string(), n);
        }
    }
}

/// One operation on one cell.
#[derive(Clone, Debug)]
pub struct OpCell {
    pub op: String,
    pub cell: String,
    /// Latencies of successful requests, µs.
    pub hist: Histogram<u64>,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    /// The first error message seen per code (what went wrong, in the server's
    /// words).
    pub error_samples: BTreeMap<String, String>,
    /// Compare-and-swap txns whose compare failed (a success at the API level).
    pub conflicts: u64,
}

impl OpCell {
    fn new(op: &str, cell: &str) -> OpCell {
        OpCell {
            op: op.to_string(),
            cell: cell.to_string(),
            hist: histogram(TOTAL_SIGFIG),
            ok: 0,
            errors: BTreeMap::new(),
            error_samples: BTreeMap::new(),
            conflicts: 0,
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// One second of one cell.
#[derive(Clone, Debug, Default)]
pub struct Second {
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    /// Allocated on the second's first success.
    pub hist: Option<Histogram<u64>>,
}

impl Second {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    fn merge(&mut self, other: &Second) {
        self.ok += other.ok;
        for (k, v) in &other.errors {
            bump(&mut self.errors, k, *v);
        }
        if let Some(h) = &other.hist {
            let mine = self.hist.get_or_insert_with(|| histogram(SECOND_SIGFIG));
            // Same bounds on both sides: adding cannot fail.
            let _ = mine.add(h);
        }
    }
}

/// Aggregates over a span of seconds of one cell (see [`Recorder::window`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WindowStats {
    pub seconds: u64,
    pub ok: u64,
    pub errors: u64,
    pub p99_us: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Recorder {
    pub ops: Vec<OpCell>,
    /// Per cell, indexed by second of the measured run (by completion time).
    pub series: BTreeMap<String, Vec<Second>>,
}

/// A request's result, for [`Recorder::record`].
#[derive(Clone, Copy, Debug)]
pub enum Outcome<'a> {
    Ok { conflict: bool },
    Err(&'a str),
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder::default()
    }

    fn op_cell(&mut self, op: &str, cell: &str) -> &mut OpCell {
        // A handful of (op, cell) pairs: a scan beats hashing two strings.
        let i = match self.ops.iter().position(|o| o.op == op && o.cell == cell) {
            Some(i) => i,
            None => {
                self.ops.push(OpCell::new(op, cell));
                self.ops.len() - 1
            }
        };
        &mut self.ops[i]
    }

    fn second(&mut self, cell: &str, second: usize) -> &mut Second {
        if !self.series.contains_key(cell) {
            self.series.insert(cell.to_string(), Vec::new());
        }
        let s = self.series.get_mut(cell).expect("inserted above");
        if s.len() <= second {
            s.resize_with(second + 1, Second::default);
        }
        &mut s[second]
    }

    /// Records one request of `op` served by `cell` that completed during
    /// `second` of the measured run, with its latency.
    pub fn record(
        &mut self,
        op: &str,
        cell: &str,
        second: usize,
        latency: Duration,
        outcome: Outcome<'_>,
    ) {
        let us = micros(latency);
        let o = self.op_cell(op, cell);
        match outcome {
            Outcome::Ok { conflict } => {
                o.ok += 1;
                o.conflicts += u64::from(conflict);
                o.hist.saturating_record(us);
            }
            Outcome::Err(code) => bump(&mut o.errors, code, 1),
        }
        let s = self.second(cell, second);
        match outcome {
            Outcome::Ok { .. } => {
                s.ok += 1;
                s.hist
                    .get_or_insert_with(|| histogram(SECOND_SIGFIG))
                    .saturating_record(us);
            }
            Outcome::Err(code) => bump(&mut s.errors, code, 1),
        }
    }

    /// Keeps `message` as the sample of `code` errors of `op` on `cell`, unless
    /// one is kept already.
    pub fn note_error(&mut self, op: &str, cell: &str, code: &str, message: &str) {
        let o = self.op_cell(op, cell);
        if !o.error_samples.contains_key(code) {
            o.error_samples
                .insert(code.to_string(), message.chars().take(300).collect());
        }
    }

    /// Adds a histogram of successes of `op` on `cell` that have no per-second
    /// place (watch event deliveries).
    pub fn record_histogram(&mut self, op: &str, cell: &str, hist: &Histogram<u64>) {
        let o = self.op_cell(op, cell);
        o.ok += hist.len();
        let _ = o.hist.add(hist);
    }

    /// Adds everything `other` recorded.
    pub fn merge(&mut self, other: &Recorder) {
        for o in &other.ops {
            let mine = self.op_cell(&o.op, &o.cell);
            mine.ok += o.ok;
            mine.conflicts += o.conflicts;
            let _ = mine.hist.add(&o.hist);
            for (k, v) in &o.errors {
                bump(&mut mine.errors, k, *v);
            }
            for (k, v) in &o.error_samples {
                mine.error_samples
                    .entry(k.clone())
                    .or_insert_with(|| v.clone());
            }
        }
        for (cell, seconds) in &other.series {
            for (i, s) in seconds.iter().enumerate() {
                self.second(cell, i).merge(s);
            }
        }
    }

    /// Cells seen, in name order.
    pub fn cells(&self) -> Vec<String> {
        let mut c: Vec<String> = self.ops.iter().map(|o| o.cell.clone()).collect();
        c.sort();
        c.dedup();
        c
    }

    /// Operations seen, in first-seen order.
    pub fn op_names(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for o in &self.ops {
            if !v.contains(&o.op) {
                v.push(o.op.clone());
            }
        }
        v
    }

    /// Everything matching `filter`, merged into one.
    pub fn aggregate(&self, filter: impl Fn(&OpCell) -> bool) -> OpCell {
        let mut all = OpCell::new("*", "*");
        for o in self.ops.iter().filter(|o| filter(o)) {
            all.ok += o.ok;
            all.conflicts += o.conflicts;
            let _ = all.hist.add(&o.hist);
            for (k, v) in &o.errors {
                bump(&mut all.errors, k, *v);
            }
            for (k, v) in &o.error_samples {
                all.error_samples
                    .entry(k.clone())
                    .or_insert_with(|| v.clone());
            }
        }
        all
    }

    /// Seconds `from..to` of `cell` (clamped to what was recorded), merged.
    pub fn window(&self, cell: &str, from: usize, to: usize) -> WindowStats {
        let mut merged = Second::default();
        let seconds = self.series.get(cell).map(Vec::as_slice).unwrap_or(&[]);
        for s in seconds.iter().take(to).skip(from) {
            merged.merge(s);
        }
        WindowStats {
            seconds: to.saturating_sub(from) as u64,
            ok: merged.ok,
            errors: merged.error_count(),
            p99_us: merged
                .hist
                .as_ref()
                .map(|h| h.value_at_quantile(0.99))
                .unwrap_or(0),
        }
    }

    /// The series of every cell merged, for the progress line: (ok, errors, p99 µs)
    /// of `second`.
    pub fn second_overall(&self, second: usize) -> (u64, u64, u64) {
        let mut merged = Second::default();
        for seconds in self.series.values() {
            if let Some(s) = seconds.get(second) {
                merged.merge(s);
            }
        }
        let p99 = merged
            .hist
            .as_ref()
            .map(|h| h.value_at_quantile(0.99))
            .unwrap_or(0);
        (merged.ok, merged.error_count(), p99)
    }

    /// Total errors so far.
    pub fn errors(&self) -> u64 {
        self.ops.iter().map(OpCell::error_count).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn feed(r: &mut Recorder, samples: &[(&str, &str, usize, u64, Option<&str>)]) {
        for (op, cell, sec, lat, err) in samples {
            let outcome = match err {
                None => Outcome::Ok { conflict: false },
                Some(c) => Outcome::Err(c),
            };
            r.record(op, cell, *sec, ms(*lat), outcome);
        }
    }

    #[test]
    fn merge_equals_recording_everything_in_one() {
        let a_samples = [
            ("put", "alpha", 0, 5, None),
            ("put", "alpha", 1, 7, None),
            ("put", "beta", 1, 9, Some("Unavailable")),
            ("get", "beta", 2, 1, None),
        ];
        let b_samples = [
            ("put", "alpha", 0, 50, None),
            ("put", "beta", 1, 3, Some("Unavailable")),
            ("put", "beta", 1, 3, Some("DeadlineExceeded")),
            ("get", "gamma", 4, 2, None),
        ];
        let (mut a, mut b, mut one) = (Recorder::new(), Recorder::new(), Recorder::new());
        feed(&mut a, &a_samples);
        feed(&mut b, &b_samples);
        feed(&mut one, &a_samples);
        feed(&mut one, &b_samples);
        a.merge(&b);

        assert_eq!(a.cells(), ["alpha", "beta", "gamma"]);
        for o in &one.ops {
            let m = a
                .ops
                .iter()
                .find(|x| x.op == o.op && x.cell == o.cell)
                .unwrap();
            assert_eq!((m.ok, &m.errors), (o.ok, &o.errors), "{} {}", o.op, o.cell);
            assert_eq!(m.hist, o.hist);
        }
        assert_eq!(a.ops.len(), one.ops.len());
        for (cell, seconds) in &one.series {
            let merged = &a.series[cell];
            assert_eq!(merged.len(), seconds.len());
            for (x, y) in merged.iter().zip(seconds) {
                assert_eq!((x.ok, &x.errors, &x.hist), (y.ok, &y.errors, &y.hist));
            }
        }
        let alpha = a.aggregate(|o| o.cell == "alpha");
        assert_eq!(alpha.ok, 3);
        assert_eq!(
            alpha.hist.max(),
            one.aggregate(|o| o.cell == "alpha").hist.max()
        );
        assert!(alpha.hist.max() >= 49_000);
        let beta = a.aggregate(|o| o.cell == "beta");
        assert_eq!(beta.errors["Unavailable"], 2);
        assert_eq!(beta.errors["DeadlineExceeded"], 1);
    }

    #[test]
    fn windows_merge_their_seconds() {
        let mut r = Recorder::new();
        for s in 0..10 {
            for _ in 0..100 {
                r.record(
                    "put",
                    "alpha",
                    s,
                    ms(if s < 5 { 2 } else { 20 }),
                    Outcome::Ok { conflict: false },
                );
            }
        }
        r.record("put", "alpha", 7, ms(1), Outcome::Err("Unavailable"));
        let before = r.window("alpha", 0, 5);
        let during = r.window("alpha", 5, 10);
        assert_eq!((before.ok, before.errors), (500, 0));
        assert_eq!((during.ok, during.errors), (500, 1));
        assert!(
            before.p99_us < 2_100 && during.p99_us > 19_000,
            "{before:?} {during:?}"
        );
        // Past the end: empty, not a panic.
        assert_eq!(r.window("alpha", 20, 30).ok, 0);
        assert_eq!(r.window("nobody", 0, 3).ok, 0);
    }

    #[test]
    fn watch_histograms_count_as_successes() {
        let mut r = Recorder::new();
        let mut h = histogram(2);
        h.saturating_record(1_000);
        h.saturating_record(2_000);
        r.record_histogram("watch_event", "alpha", &h);
        assert_eq!(r.aggregate(|_| true).ok, 2);
        assert!(r.series.is_empty());
    }
}
