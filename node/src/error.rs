//! The node plugin's one error type; the CSI layer maps it to gRPC codes in one place
//! ([`crate::csi::status`]).

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    /// Staged or published differently.
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Aborted(String),
    /// The size asked for is not there (yet).
    #[error("{0}")]
    OutOfRange(String),
    /// The engine cannot be reached (yet).
    #[error("{0}")]
    Unavailable(String),
    /// A tool or system call failed; the message carries its output.
    #[error("{0}")]
    Internal(String),
}
