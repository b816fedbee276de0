//! Library side of the `cellplane` command: the local environment (`up`) and
//! signal handling. The binary only parses options and calls in here.

#![forbid(unsafe_code)]

pub mod signals;
pub mod up;
