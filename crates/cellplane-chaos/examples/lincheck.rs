//! Checks a saved history offline, and finds where it stops being linearizable.
//!
//! ```text
//! cargo run --release -p cellplane-chaos --example lincheck -- <history.json> [<key>] [--bisect] [--steps N]
//! ```
//!
//! `<history.json>` is what a failing nemesis run saves (its `operations`), or a
//! plain array of operations. `--bisect` looks for the earliest instant T such
//! that the history cut at T (operations called before T; those still running at
//! T counted as unknown) is not linearizable, and prints the violation there: a
//! short window to read instead of the whole history.

use std::time::Instant;

use cellplane_chaos::lincheck::{self, CheckOptions, KvInput, KvOutput, Operation, Verdict};

fn cut(ops: &[Operation], t: u64) -> Vec<Operation> {
    ops.iter()
        .filter(|o| o.call_ns < t)
        .filter_map(|o| {
            let mut o = o.clone();
            if o.return_ns.is_none_or(|r| r > t) {
                if o.input == KvInput::Get {
                    return None;
                }
                o.output = KvOutput::Unknown;
                o.return_ns = None;
            }
            Some(o)
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args
        .first()
        .ok_or("usage: lincheck <history.json> [<key>] [--bisect] [--steps N]")?;
    let bisect = args.iter().any(|a| a == "--bisect");
    let steps = args
        .iter()
        .position(|a| a == "--steps")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(CheckOptions::default().max_steps_per_key);
    let key = args
        .iter()
        .skip(1)
        .find(|a| !a.starts_with("--") && a.parse::<u64>().is_err());
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
    let ops = doc.get("operations").cloned().unwrap_or(doc);
    let mut ops: Vec<Operation> = serde_json::from_value(ops)?;
    if let Some(k) = key {
        ops.retain(|o| &o.key == k);
    }
    let options = CheckOptions {
        max_steps_per_key: steps,
    };
    let started = Instant::now();
    let verdict = lincheck::check(&ops, &options)?;
    println!(
        "{} operations: {:?} in {:?}",
        ops.len(),
        short(&verdict),
        started.elapsed()
    );
    if let Verdict::NotLinearizable(v) = &verdict {
        println!("{v}");
    }
    if !bisect || matches!(verdict, Verdict::Linearizable { .. }) {
        return Ok(());
    }
    let mut times: Vec<u64> = ops.iter().map(|o| o.call_ns + 1).collect();
    times.sort_unstable();
    times.dedup();
    // times[lo] passes (or is the start), times[hi] does not.
    let (mut lo, mut hi) = (0usize, times.len() - 1);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        let v = lincheck::check(&cut(&ops, times[mid]), &options)?;
        println!(
            "cut at {:.6}s ({} ns): {:?}",
            times[mid] as f64 / 1e9,
            times[mid],
            short(&v)
        );
        if matches!(v, Verdict::Linearizable { .. }) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let window = cut(&ops, times[hi]);
    match lincheck::check(&window, &options)? {
        Verdict::NotLinearizable(v) => println!(
            "earliest failing cut at {:.6}s:\n{v}",
            times[hi] as f64 / 1e9
        ),
        v => println!(
            "earliest failing cut at {:.6}s: {v:?}",
            times[hi] as f64 / 1e9
        ),
    }
    Ok(())
}

fn short(v: &Verdict) -> String {
    match v {
        Verdict::Linearizable { keys, operations } => {
            format!("linearizable ({keys} keys, {operations} operations)")
        }
        Verdict::NotLinearizable(v) => format!("NOT linearizable on {}", v.key),
        Verdict::GaveUp { key, steps } => format!("gave up on {key} after {steps} steps"),
    }
}
