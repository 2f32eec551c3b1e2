//! The key rules both backends share, so that a key that works on one works on the other.
//!
//! A key is a relative path of `/`-separated segments: not empty, no leading `/`, no empty
//! segment, no `.` or `..` segment, and no segment starting with `.` (the local backend keeps
//! its temporary files under such names).

use keel_proto::{KeelError, Result};

fn invalid(what: &str, key: &str, why: &str) -> KeelError {
    KeelError::InvalidArgument { reason: format!("HA {what} {key:?} {why}") }
}

/// Checks a metadata key.
pub(crate) fn validate_key(key: &str) -> Result<()> {
    validate("key", key)
}

/// Checks a `list` prefix: empty (everything), a key, or a key followed by one `/`.
pub(crate) fn validate_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty() {
        return Ok(());
    }
    let body = prefix.strip_suffix('/').unwrap_or(prefix);
    validate("prefix", body).map_err(|_| invalid("prefix", prefix, "is not a relative key path"))
}

fn validate(what: &str, key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(invalid(what, key, "is empty"));
    }
    if key.starts_with('/') {
        return Err(invalid(what, key, "is absolute; keys are relative paths"));
    }
    if key.contains('\0') || key.contains('\\') {
        return Err(invalid(what, key, "contains a NUL or backslash"));
    }
    for segment in key.split('/') {
        if segment.is_empty() {
            return Err(invalid(what, key, "has an empty path segment"));
        }
        if segment == ".." || segment == "." {
            return Err(invalid(what, key, "has a `.` or `..` segment"));
        }
        if segment.starts_with('.') {
            return Err(invalid(what, key, "has a segment starting with `.`"));
        }
    }
    Ok(())
}

/// Checks a cluster id: one non-empty path segment.
pub(crate) fn validate_cluster_id(cluster_id: &str) -> Result<()> {
    if cluster_id.is_empty() || cluster_id.contains('/') || cluster_id.starts_with('.') {
        return Err(KeelError::InvalidArgument {
            reason: format!(
                "cluster id {cluster_id:?} must be a non-empty name without `/` that does not start with `.`"
            ),
        });
    }
    Ok(())
}

pub(crate) use keel_proto::error_chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_relative_paths_without_dot_segments() {
        for ok in ["a", "a/b", "jobs/job-1", "counters/checkpoint-id"] {
            assert!(validate_key(ok).is_ok(), "{ok}");
        }
        for bad in ["", "/a", "a//b", "a/", "../a", "a/../b", "a/./b", ".hidden", "a/.tmp", "a\\b"] {
            assert!(
                matches!(validate_key(bad), Err(KeelError::InvalidArgument { .. })),
                "{bad:?} must be rejected"
            );
        }
    }

    #[test]
    fn prefixes_may_be_empty_or_end_with_a_slash() {
        for ok in ["", "jobs/", "jobs", "jo", "a/b/"] {
            assert!(validate_prefix(ok).is_ok(), "{ok}");
        }
        for bad in ["/", "/jobs", "a//", "../", ".x/"] {
            assert!(validate_prefix(bad).is_err(), "{bad:?} must be rejected");
        }
    }
}
