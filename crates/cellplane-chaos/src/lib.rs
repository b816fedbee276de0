//! Fault injection and verification, for the fault tests and the load generator.
//!
//! - [`lincheck`]: a linearizability checker (Wing–Gong/Lowe search with
//!   Porcupine's memoization and per-key partitioning) over a KV model with put,
//!   get, compare-and-swap and delete; operations whose outcome is unknown
//!   (timeouts) may or may not have taken effect. [`lincheck::Recorder`] records a
//!   history from concurrent clients.
//! - [`proxy`]: a TCP proxy whose links can be passed, delayed, blackholed or
//!   refused at run time, per connecting process: the partitions of the tests.
//! - [`procnet`]: which local process opened a TCP connection (Linux `/proc`), so
//!   the proxy can tell members apart although they all connect from 127.0.0.1.
//! - [`nemesis`]: a seeded random number generator and fault schedule, so a
//!   failing run can be replayed from its seed.
//!
//! Depends on no other cellplane crate: it knows TCP and a KV model, not cells.

#![forbid(unsafe_code)]

pub mod lincheck;
pub mod nemesis;
pub mod procnet;
pub mod proxy;
