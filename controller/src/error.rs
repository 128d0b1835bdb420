//! The controller's one error type; the CSI layer maps it to gRPC codes in one place
//! ([`crate::csi::status`]).

/// Why a controller operation failed. Messages name the volume, snapshot or node involved.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    /// The name is taken by something incompatible with the request.
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    OutOfRange(String),
    /// No placement has room for the volume.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Another operation on the same volume or snapshot is in progress.
    #[error("{0}")]
    Aborted(String),
    /// Not ready yet (recovering after a start): the caller retries.
    #[error("{0}")]
    Unavailable(String),
    /// The record store failed.
    #[error("volume store: {0}")]
    Store(String),
    /// Starting, stopping or talking to a replica or engine failed.
    #[error("volume {volume_id}: {reason}")]
    Orchestrator { volume_id: String, reason: String },
}

impl ControllerError {
    pub fn orchestrator(volume_id: &str, reason: impl std::fmt::Display) -> ControllerError {
        ControllerError::Orchestrator { volume_id: volume_id.to_owned(), reason: reason.to_string() }
    }
}

pub type Result<T, E = ControllerError> = std::result::Result<T, E>;
