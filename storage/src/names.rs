//! Object names: what is accepted, and the temporary names of uploads in progress.
//!
//! Stores without an atomic upload (WebDAV, SFTP) write to a temporary name in the same
//! directory and rename it into place; `list` hides those names, so a reader never sees
//! a partial object.

use marmot_core::Result;

use crate::store_error;

/// The prefix of the last segment of an upload in progress.
pub(crate) const UPLOAD_MARKER: &str = ".marmot-upload-";

/// Checks that `name` is a relative, `/`-separated path without empty, `.` or `..`
/// segments, control characters or `\`, and not a temporary upload name.
pub(crate) fn check_name(name: &str) -> Result<()> {
    let bad = |why: &str| Err(store_error(format!("invalid object name {name:?}: {why}"), false));
    if name.is_empty() {
        return bad("empty");
    }
    if name.chars().any(|c| c.is_control() || c == '\\') {
        return bad("control characters and '\\' are not allowed");
    }
    for segment in name.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return bad("segments must be non-empty and not '.' or '..'");
        }
        if segment.starts_with(UPLOAD_MARKER) {
            return bad("names starting with .marmot-upload- are reserved");
        }
    }
    Ok(())
}

/// The temporary name an upload of `name` is written to: same directory, hidden, unique.
pub(crate) fn upload_name(name: &str) -> String {
    let unique: u64 = rand::random();
    match name.rsplit_once('/') {
        Some((dir, file)) => format!("{dir}/{UPLOAD_MARKER}{unique:016x}-{file}"),
        None => format!("{UPLOAD_MARKER}{unique:016x}-{name}"),
    }
}

/// Whether `name` (a full object name) is a temporary upload name.
pub(crate) fn is_upload_name(name: &str) -> bool {
    name.rsplit('/').next().is_some_and(|last| last.starts_with(UPLOAD_MARKER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_prefix_paths_are_accepted_and_odd_ones_rejected() {
        assert!(check_name("snapshots/node-1/0001.zst").is_ok());
        assert!(check_name("a.zst").is_ok());
        for bad in ["", "/abs", "a//b", "a/", "../x", "a/./b", "a\\b", "a\nb"] {
            assert!(check_name(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn upload_names_are_hidden_siblings() {
        let u = upload_name("snapshots/node-1/0001.zst");
        assert!(u.starts_with("snapshots/node-1/.marmot-upload-"), "{u}");
        assert!(is_upload_name(&u));
        assert!(check_name(&u).is_err());
        assert!(!is_upload_name("snapshots/node-1/0001.zst"));
    }
}
