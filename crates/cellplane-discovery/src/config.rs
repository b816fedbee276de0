//! Settings of the discovery service a member hosts, and the defaults and limits
//! of what a registration may ask for.

use serde::{Deserialize, Serialize};

use crate::error::DiscoveryError;

/// Between two runs of an active check, when the registration does not say.
pub const DEFAULT_INTERVAL_MS: u64 = 10_000;
/// Deadline of one run of an active check, when the registration does not say.
pub const DEFAULT_TIMEOUT_MS: u64 = 2_000;
/// How long an instance may stay unhealthy before it is removed, when the
/// registration does not say: Consul's minimum for
/// `deregister_critical_service_after`. A TTL instance's lease lasts `ttl` plus
/// this, so a finite default is needed.
pub const DEFAULT_DEREGISTER_AFTER_SECONDS: i64 = 60;

/// Bounds of what a registration may ask for (see `validate`).
pub const MIN_INTERVAL_MS: u64 = 100;
pub const MAX_INTERVAL_MS: u64 = 3_600_000;
pub const MIN_TIMEOUT_MS: u64 = 10;
pub const MAX_TIMEOUT_MS: u64 = 300_000;
pub const MAX_TTL_SECONDS: i64 = 86_400;
pub const MAX_DEREGISTER_AFTER_SECONDS: i64 = 7 * 86_400;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Snapshots buffered per Watch stream. A client that lets the buffer fill is
    /// not reading: its stream is ended with the revision to resume from, and
    /// everything it held is freed.
    pub watch_buffer: usize,
    /// How often the checker asks how long each TTL instance's lease has left.
    pub ttl_poll_ms: u64,
    /// Deadline of one call to the member's own etcd API.
    pub call_timeout_ms: u64,
    /// Active checks running at once on the leader; more wait for a slot (so a
    /// burst of slow checks costs time, not unbounded sockets).
    pub max_concurrent_checks: usize,
    /// Wait before the checker re-reads the store after losing its watch.
    pub retry_backoff_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            watch_buffer: 64,
            ttl_poll_ms: 500,
            call_timeout_ms: 5_000,
            max_concurrent_checks: 64,
            retry_backoff_ms: 1_000,
        }
    }
}

impl Settings {
    /// Refuses a zero where a positive number is needed, naming the field.
    pub fn validate(&self) -> Result<(), DiscoveryError> {
        let positive = [
            ("discovery.watch_buffer", self.watch_buffer as u64),
            ("discovery.ttl_poll_ms", self.ttl_poll_ms),
            ("discovery.call_timeout_ms", self.call_timeout_ms),
            (
                "discovery.max_concurrent_checks",
                self.max_concurrent_checks as u64,
            ),
            ("discovery.retry_backoff_ms", self.retry_backoff_ms),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(DiscoveryError::invalid(field, "must be greater than 0"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_zeros_name_the_field() {
        Settings::default().validate().unwrap();
        let s = Settings {
            ttl_poll_ms: 0,
            ..Settings::default()
        };
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("discovery.ttl_poll_ms"), "{e}");
    }
}
