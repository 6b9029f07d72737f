//! The HTML directory index, in the same minimal shape as Go's `http.FileServer`.

use std::fmt::Write as _;
use std::path::Path;

/// One directory entry as shown in the listing.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    /// The file name (lossily converted if not UTF-8).
    pub name: String,
    /// Directories get a trailing `/` so relative links descend into them.
    pub is_dir: bool,
}

/// Reads `dir` and renders its listing, sorted by name.
pub async fn read(dir: &Path) -> std::io::Result<String> {
    let mut entries = Vec::new();
    let mut reader = tokio::fs::read_dir(dir).await?;
    while let Some(entry) = reader.next_entry().await? {
        // Follow symlinks so a linked directory is listed (and linked) as one.
        let is_dir = match entry.file_type().await {
            Ok(t) if t.is_symlink() => tokio::fs::metadata(entry.path())
                .await
                .is_ok_and(|m| m.is_dir()),
            Ok(t) => t.is_dir(),
            Err(_) => false,
        };
        let name = entry.file_name().to_string_lossy().into_owned();
        entries.push(Entry { name, is_dir });
    }
    entries.sort();
    Ok(render(&entries))
}

/// Renders entries as `<pre>` links, exactly one per line.
pub fn render(entries: &[Entry]) -> String {
    let mut html = String::from(
        "<!doctype html>\n<meta name=\"viewport\" content=\"width=device-width\">\n<pre>\n",
    );
    for entry in entries {
        let slash = if entry.is_dir { "/" } else { "" };
        let _ = writeln!(
            html,
            "<a href=\"{}{slash}\">{}{slash}</a>",
            html_escape(&href_escape(&entry.name)),
            html_escape(&entry.name),
        );
    }
    html.push_str("</pre>\n");
    html
}

/// Percent-encodes everything but unreserved characters, so a name such as `a:b`
/// or `#x` is a relative path reference and not a scheme or fragment.
pub fn href_escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&#34;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_dirs_are_linked() {
        let html = render(&[
            Entry {
                name: "a.txt".into(),
                is_dir: false,
            },
            Entry {
                name: "sub".into(),
                is_dir: true,
            },
        ]);
        assert!(html.contains("<a href=\"a.txt\">a.txt</a>\n"));
        assert!(html.contains("<a href=\"sub/\">sub/</a>\n"));
    }

    #[test]
    fn hostile_names_are_escaped() {
        let html = render(&[Entry {
            name: "<b>&\"x y:z#".into(),
            is_dir: false,
        }]);
        assert!(
            html.contains("<a href=\"%3Cb%3E%26%22x%20y%3Az%23\">&lt;b&gt;&amp;&#34;x y:z#</a>")
        );
    }
}
