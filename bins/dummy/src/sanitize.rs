//! Turns a request path into components that can only name things inside the
//! served directory.
//!
//! The check runs on the *decoded* path, so `%2e%2e` and `%2f` tricks are seen for
//! what they are. Like Go's `http.FileServer`, a `..` segment is refused outright
//! (400) rather than cleaned away: a well-behaved client never sends one.

use std::path::{Path, PathBuf};

/// Why a request path was refused; every variant becomes a 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// The path is not origin-form (`*`, absolute URI leftovers, ...).
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// The decoded path is not UTF-8.
    NotUtf8,
    /// A `..` segment, a backslash or a NUL byte.
    Forbidden,
}

/// A request path reduced to plain file-name components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafePath {
    /// Decoded segments, none empty, `.`, `..`, or containing `/`, `\` or NUL.
    pub segments: Vec<String>,
}

impl SafePath {
    /// The on-disk location below `root`.
    pub fn under(&self, root: &Path) -> PathBuf {
        let mut path = root.to_path_buf();
        path.extend(&self.segments);
        path
    }
}

/// Decodes and validates the path part of a request URI.
pub fn sanitize(raw: &str) -> Result<SafePath, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let decoded = String::from_utf8(percent_decode(raw)?).map_err(|_| PathError::NotUtf8)?;
    // Backslash is a separator on Windows, and NUL truncates paths in C APIs; neither
    // has a legitimate use in a file name we would serve.
    if decoded.contains(['\\', '\0']) {
        return Err(PathError::Forbidden);
    }
    let mut segments = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => return Err(PathError::Forbidden),
            name => segments.push(name.to_owned()),
        }
    }
    Ok(SafePath { segments })
}

fn percent_decode(raw: &str) -> Result<Vec<u8>, PathError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = bytes.get(i + 1).and_then(|b| hex_value(*b));
            let lo = bytes.get(i + 2).and_then(|b| hex_value(*b));
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(PathError::BadEscape);
            };
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments(raw: &str) -> Vec<String> {
        sanitize(raw).expect("path should be accepted").segments
    }

    #[test]
    fn plain_paths_split_into_segments() {
        assert!(segments("/").is_empty());
        assert_eq!(segments("/a/b.txt"), ["a", "b.txt"]);
        assert_eq!(segments("/a//./b/"), ["a", "b"]);
    }

    #[test]
    fn percent_escapes_are_decoded() {
        assert_eq!(segments("/with%20space/%C3%A9"), ["with space", "é"]);
        assert_eq!(segments("/a%2Fb"), ["a", "b"]);
        assert_eq!(segments("/..."), ["..."]);
        assert_eq!(segments("/a..b"), ["a..b"]);
    }

    #[test]
    fn traversal_is_refused_in_every_spelling() {
        for raw in [
            "/../etc/passwd",
            "/a/../../b",
            "/..",
            "/%2e%2e/x",
            "/%2E%2E/x",
            "/.%2e/x",
            "/a%2F..%2F..%2Fb",
            "/a\\..\\b",
            "/a%5c..%5cb",
            "/a%00b",
        ] {
            assert_eq!(sanitize(raw), Err(PathError::Forbidden), "{raw}");
        }
    }

    #[test]
    fn malformed_paths_are_refused() {
        assert_eq!(sanitize("*"), Err(PathError::NotAbsolute));
        assert_eq!(sanitize("/%zz"), Err(PathError::BadEscape));
        assert_eq!(sanitize("/%4"), Err(PathError::BadEscape));
        assert_eq!(sanitize("/%ff"), Err(PathError::NotUtf8));
    }

    #[test]
    fn joined_path_stays_under_root() {
        let root = Path::new("/srv/www");
        let path = sanitize("/a/%2e/b").expect("accepted").under(root);
        assert_eq!(path, Path::new("/srv/www/a/b"));
        assert!(path.starts_with(root));
    }
}
