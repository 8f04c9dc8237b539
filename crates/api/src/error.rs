use hamgam_proto::{ErrorBody, ErrorCode};
use hamgam_sync::{DomainError, SyncError};

/// A request's failure as the client will see it: a code and a sentence.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError { code, message: message.into() }
    }

    pub(crate) fn internal(message: impl Into<String>) -> ApiError {
        let message = message.into();
        tracing::error!(%message, "internal error");
        ApiError::new(ErrorCode::INTERNAL, "the node hit an internal error; try again")
    }

    pub(crate) fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::UNAVAILABLE, message)
    }

    pub(crate) fn config(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::INTERNAL, message)
    }

    pub(crate) fn body(&self) -> ErrorBody {
        ErrorBody::new(self.code, self.message.clone())
    }
}

impl From<DomainError> for ApiError {
    fn from(error: DomainError) -> ApiError {
        let code = match &error {
            DomainError::InvalidUsername(_) => ErrorCode::INVALID_USERNAME,
            DomainError::WeakPassword(_) => ErrorCode::WEAK_PASSWORD,
            DomainError::InvalidArgument(_) => ErrorCode::INVALID_ARGUMENT,
            DomainError::TextTooLong { .. } => ErrorCode::TEXT_TOO_LONG,
            DomainError::TextEmpty => ErrorCode::TEXT_EMPTY,
            DomainError::UsernameTaken => ErrorCode::USERNAME_TAKEN,
            DomainError::UserNotFound
            | DomainError::DeviceNotFound
            | DomainError::ChatNotFound
            | DomainError::MessageNotFound
            | DomainError::PathNotFound(_)
            | DomainError::SnapshotNotFound(_)
            | DomainError::NotFound(_) => ErrorCode::NOT_FOUND,
            DomainError::QuotaExceeded { .. } => ErrorCode::QUOTA_EXCEEDED,
            DomainError::ChecksExpired => ErrorCode::CHUNKS_MISSING,
            DomainError::NotMember => ErrorCode::NOT_MEMBER,
            DomainError::PermissionDenied(_) => ErrorCode::PERMISSION_DENIED,
            DomainError::AlreadyMember | DomainError::Conflict(_) => ErrorCode::CONFLICT,
            DomainError::LimitReached(_) => ErrorCode::LIMIT_REACHED,
            DomainError::Internal(_) => return ApiError::internal(error.to_string()),
        };
        ApiError::new(code, error.to_string())
    }
}

impl From<SyncError> for ApiError {
    fn from(error: SyncError) -> ApiError {
        match error {
            SyncError::Domain(domain) => domain.into(),
            SyncError::Propose(propose) => {
                ApiError::unavailable(format!("the write could not be taken now ({propose}); retry"))
            }
            SyncError::Storage(hamgam_storage::StorageError::Unreachable(reason)) => {
                ApiError::unavailable(format!("{reason}; retry"))
            }
            SyncError::Timeout => {
                ApiError::new(ErrorCode::TIMEOUT, "the write did not commit in time; retry with the same client id")
            }
            other => ApiError::internal(other.to_string()),
        }
    }
}
