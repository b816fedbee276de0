//! Library side of the `cellplane` command: the local environment (`up`), the
//! operator commands (`status`, `map`), the client commands (`kv`, `lease`,
//! `svc`), the Compose and Kubernetes renderers (`deploy`) and signal handling.
//! The binary only parses options and calls in here.

#![forbid(unsafe_code)]

pub mod client;
pub mod deploy;
pub mod kv_cmd;
pub mod lease_cmd;
pub mod map_cmd;
pub mod signals;
pub mod status_cmd;
pub mod svc_cmd;
pub mod up;
