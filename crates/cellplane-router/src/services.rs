//! The APIs the router serves. Each translates its calls into the routing core's
//! three steps (who is calling, admit, call the cell) and back; none resolves a
//! tenant or picks a cell on its own.

pub mod auth;
pub mod discovery;
pub mod kv;
pub mod lease;
pub mod watch;
