//! Library side of the `cellplane` command: the local environment (`up`), the
//! operator commands (`status`, `map`) and signal handling. The binary only parses options and calls in here.

#![forbid(unsafe_code)]

pub mod map_cmd;
pub mod signals;
pub mod status_cmd;
pub mod up;
