//! A deliberately small extension → `Content-Type` table; enough for a test server.

use std::path::Path;

/// The type sent when the extension is unknown: browsers will offer a download.
pub const DEFAULT: &str = "application/octet-stream";

/// Guesses a `Content-Type` from the file extension (case-insensitively).
pub fn content_type(path: &Path) -> &'static str {
    let Some(ext) = path.extension().and_then(|e| e.to_str()) else {
        return DEFAULT;
    };
    match ext.to_ascii_lowercase().as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "txt" => "text/plain; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" => "application/json",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "svg" => "image/svg+xml",
        _ => DEFAULT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_and_unknown_extensions() {
        assert_eq!(
            content_type(Path::new("a/index.HTML")),
            "text/html; charset=utf-8"
        );
        assert_eq!(
            content_type(Path::new("notes.txt")),
            "text/plain; charset=utf-8"
        );
        assert_eq!(content_type(Path::new("x.jpeg")), "image/jpeg");
        assert_eq!(content_type(Path::new("bigfile")), DEFAULT);
        assert_eq!(content_type(Path::new("archive.tar.gz")), DEFAULT);
    }
}
