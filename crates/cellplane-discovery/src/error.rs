//! Errors of the discovery service and the gRPC status each becomes.

use tonic::{Code, Status};

#[derive(Debug, Clone, thiserror::Error)]
pub enum DiscoveryError {
    /// The request is malformed: `field` says what, `reason` what to do.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// A value under the reserved prefix that is not an instance (written by
    /// something else than this service).
    #[error("corrupt instance at {key}: {reason}")]
    Corrupt { key: String, reason: String },
    /// The cell's etcd API refused or failed a call.
    #[error("{op}: {status}")]
    Etcd { op: &'static str, status: Status },
    /// The stream fell behind or lost its source: watch again from `resume`.
    #[error("{reason}; watch again with start_revision {resume}")]
    Resume { reason: String, resume: i64 },
    #[error("invalid setting: {0}")]
    Config(String),
}

impl DiscoveryError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> DiscoveryError {
        DiscoveryError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn etcd(op: &'static str) -> impl FnOnce(Status) -> DiscoveryError {
        move |status| DiscoveryError::Etcd { op, status }
    }
}

impl From<DiscoveryError> for Status {
    fn from(e: DiscoveryError) -> Status {
        match e {
            DiscoveryError::Invalid { .. } => Status::invalid_argument(e.to_string()),
            DiscoveryError::NotFound(_) => Status::not_found(e.to_string()),
            DiscoveryError::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
            DiscoveryError::Corrupt { .. } => Status::data_loss(e.to_string()),
            DiscoveryError::Resume { .. } => Status::unavailable(e.to_string()),
            DiscoveryError::Config(_) => Status::internal(e.to_string()),
            // The cell's own code (UNAVAILABLE with no leader, OUT_OF_RANGE for a
            // compacted revision...) is what the caller must act on: keep it.
            DiscoveryError::Etcd { op, ref status } => {
                let code = match status.code() {
                    // A deadline inside the cell is the cell being unavailable,
                    // not the caller's deadline.
                    Code::DeadlineExceeded | Code::Cancelled => Code::Unavailable,
                    c => c,
                };
                Status::new(code, format!("discovery: {op}: {}", status.message()))
            }
        }
    }
}
