//! Herald's error type, and its mapping to gRPC status codes at the edge.
//!
//! Internals (Redis error text, file paths) never reach callers: the
//! `Backend` variant logs its detail and tells the caller only what failed
//! and that it is worth retrying.

use tonic::{Code, Status};

/// `Clone`: one failed pipeline answers every batch item it carried.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The request is wrong and will stay wrong if retried.
    #[error("{0}")]
    InvalidArgument(String),
    /// A limit was hit (connections per user, node capacity).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The shared backend (Redis) cannot be reached right now; retry later.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// A backend answered with something Herald did not expect.
    #[error("backend error: {0}")]
    Backend(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match e {
            Error::InvalidArgument(m) => Status::invalid_argument(m),
            Error::ResourceExhausted(m) => Status::resource_exhausted(m),
            Error::Unavailable(m) => {
                tracing::warn!(error = %m, "backend unavailable");
                Status::new(
                    Code::Unavailable,
                    "the shared backend (Redis) is unavailable; retry shortly",
                )
            }
            Error::Backend(m) => {
                tracing::error!(error = %m, "backend error");
                Status::new(Code::Internal, "internal backend error; see the node's log")
            }
        }
    }
}
