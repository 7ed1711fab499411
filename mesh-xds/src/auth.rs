//! The `authorization: Bearer <token>` credential istio-agent sends to istiod on every xDS
//! stream and CA call, read from the projected service-account token file.

use std::path::{Path, PathBuf};

use tonic::metadata::AsciiMetadataValue;

/// The token file exists but cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("reading token {}: {source}", path.display())]
pub struct TokenError {
    /// The token file.
    pub path: PathBuf,
    /// Why it cannot be used.
    #[source]
    pub source: std::io::Error,
}

/// Reads the token file afresh (kubelet rotates it) and returns the header value. A missing
/// file sends no credential, as a plaintext (:15010-style) connection needs none; a server
/// that requires one answers `Unauthenticated`, which the callers explain.
pub(crate) fn bearer(path: Option<&Path>) -> Result<Option<AsciiMetadataValue>, TokenError> {
    let Some(path) = path else { return Ok(None) };
    let token = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::debug!(path = %path.display(), "no token file; sending no credential");
            return Ok(None);
        }
        Err(source) => {
            return Err(TokenError {
                path: path.to_owned(),
                source,
            });
        }
    };
    AsciiMetadataValue::try_from(format!("Bearer {}", token.trim()))
        .map(Some)
        .map_err(|_| TokenError {
            path: path.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the token holds characters not allowed in a header",
            ),
        })
}
