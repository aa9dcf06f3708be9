//! One error type for the whole crate. Each variant carries a message a person can act on and a
//! stable machine-readable code; the service maps codes to HTTP status codes in one place.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bytes are not a decodable image (truncated, corrupt, or not an image at all).
    #[error("{0}")]
    InvalidImage(String),
    /// The bytes are an image in a format this service does not read.
    #[error("{0}")]
    UnsupportedImage(String),
    /// A well-formed image the model cannot take (too elongated, too large after resizing, ...).
    #[error("{0}")]
    ImageNotAccepted(String),
    /// A request option has a bad value (top_k out of range, unknown positions keyword, ...).
    #[error("{0}")]
    InvalidOption(String),
    /// Well-formed but impossible, e.g. a position past the end of the sequence.
    #[error("{0}")]
    Unprocessable(String),
    /// Something over a configured limit (prompt tokens, image pixels, body size).
    #[error("{0}")]
    TooLarge(String),
    /// A model snapshot that cannot be loaded: missing file, bad config, missing weight.
    #[error("model snapshot {dir}: {message}")]
    Snapshot { dir: PathBuf, message: String },
    /// The snapshot's architecture is not one this crate implements.
    #[error("{0}")]
    UnsupportedArchitecture(String),
    /// A tensor operation failed: a bug or resource exhaustion, never the client's fault.
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// A short stable code for clients (`{"error": {"code": ...}}`).
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidImage(_) => "invalid_image",
            Error::UnsupportedImage(_) => "unsupported_image_format",
            Error::ImageNotAccepted(_) => "image_not_accepted",
            Error::InvalidOption(_) => "invalid_option",
            Error::Unprocessable(_) => "unprocessable",
            Error::TooLarge(_) => "too_large",
            Error::Snapshot { .. } => "model_snapshot",
            Error::UnsupportedArchitecture(_) => "unsupported_architecture",
            Error::Tensor(_) => "internal",
            Error::Internal(_) => "internal",
        }
    }

    pub fn snapshot(dir: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Snapshot {
            dir: dir.into(),
            message: message.into(),
        }
    }
}
