//! Seeded fault schedules: what to break, for how long, and when to heal.
//!
//! The schedule depends on the seed alone, so a failing run names its seed and
//! the same faults come back in the same order. Which member "the leader" is
//! gets decided when a fault starts, and the interleaving of client requests is
//! the machine's; a replay repeats the faults, not the exact timing.
//!
//! The generator is SplitMix64, written here so a seed means the same schedule
//! whatever version of any random number crate the workspace moves to.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// SplitMix64 (Steele, Lea, Flood 2014): small, fast, and every seed is good.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0); the modulo bias is irrelevant at test sizes.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `lo..=hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi.saturating_sub(lo) + 1))
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// An independent generator for a sub-task (a client), derived from this one.
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }
}

/// Which member a fault hits, resolved when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The member the others follow now.
    Leader,
    /// Any member that does not lead now.
    Follower,
    /// The member with this id.
    Member(u64),
}

/// How a partition treats traffic across it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cut {
    /// Connections are accepted and then say nothing: requests time out.
    Blackhole,
    /// Connections are closed at once: requests fail fast.
    Refuse,
}

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// SIGKILL one member; healing restarts it on the same data.
    Kill(Target),
    /// SIGKILL every member at once; healing restarts them all.
    KillAll,
    /// SIGSTOP one member; healing sends SIGCONT.
    Pause(Target),
    /// Cut one member off from every other member, both ways; clients can
    /// still reach it.
    Isolate(Target, Cut),
    /// Cut only the traffic into one member: it can send but hears nothing.
    IsolateInbound(Target, Cut),
    /// Delay every byte between one member and the others.
    Slow(Target, u64),
}

/// A fault, held for `hold`, then healed, then `rest` of calm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub fault: Fault,
    pub hold_ms: u64,
    pub rest_ms: u64,
}

/// `rounds` faults for a cell of `members` members, from `seed`.
pub fn schedule(seed: u64, rounds: usize, members: u64) -> Vec<Step> {
    let mut rng = Rng::new(seed);
    (0..rounds)
        .map(|_| {
            let target = match rng.below(10) {
                0..=4 => Target::Leader,
                5..=7 => Target::Follower,
                _ => Target::Member(1 + rng.below(members.max(1))),
            };
            let cut = if rng.chance(50) {
                Cut::Blackhole
            } else {
                Cut::Refuse
            };
            let fault = match rng.below(100) {
                0..=24 => Fault::Kill(target),
                25..=29 => Fault::KillAll,
                30..=49 => Fault::Pause(target),
                50..=79 => Fault::Isolate(target, cut),
                80..=89 => Fault::IsolateInbound(target, cut),
                _ => Fault::Slow(target, 20 + rng.below(180)),
            };
            Step {
                fault,
                hold_ms: rng.millis(1_000, 3_000).as_millis() as u64,
                rest_ms: rng.millis(500, 1_500).as_millis() as u64,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_schedule() {
        assert_eq!(schedule(42, 50, 3), schedule(42, 50, 3));
        assert_ne!(schedule(42, 50, 3), schedule(43, 50, 3));
    }

    #[test]
    fn splitmix_reference_values() {
        // The first outputs for seed 1234567 of the reference implementation.
        let mut r = Rng::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
    }

    #[test]
    fn schedules_cover_every_fault_kind() {
        let s = schedule(7, 400, 3);
        let has = |f: fn(&Fault) -> bool| s.iter().any(|st| f(&st.fault));
        assert!(has(|f| matches!(f, Fault::Kill(_))));
        assert!(has(|f| matches!(f, Fault::KillAll)));
        assert!(has(|f| matches!(f, Fault::Pause(_))));
        assert!(has(|f| matches!(f, Fault::Isolate(_, Cut::Blackhole))));
        assert!(has(|f| matches!(f, Fault::Isolate(_, Cut::Refuse))));
        assert!(has(|f| matches!(f, Fault::IsolateInbound(..))));
        assert!(has(|f| matches!(f, Fault::Slow(..))));
        assert!(s.iter().all(|st| (1_000..=3_000).contains(&st.hold_ms)));
        // Member ids start at 1.
        assert!(!s.iter().any(|st| matches!(
            st.fault,
            Fault::Kill(Target::Member(0)) | Fault::Pause(Target::Member(0))
        )));
    }
}
