//! Go's `flag` package accepts long flags with one dash (`-listen :8123`); clap wants two.
//! The example programs' users paste Go command lines, so every rd binary rewrites
//! `-name` and `-name=value` to `--name` / `--name=value` before clap parses them.

use std::ffi::OsString;

/// Rewrites Go-style single-dash long flags to clap's double-dash form.
///
/// Single-letter flags (`-h`, `-V`) and values that follow a flag (`-peers a:b:ws://x`)
/// are left alone; a lone `-` and everything after `--` are passed through untouched.
pub fn normalize<I: IntoIterator<Item = OsString>>(args: I) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut passthrough = false;
    for (i, arg) in args.into_iter().enumerate() {
        if i == 0 || passthrough {
            out.push(arg);
            continue;
        }
        let rewritten = match arg.to_str() {
            Some("--") => {
                passthrough = true;
                None
            }
            Some(s) if is_go_long_flag(s) => Some(OsString::from(format!("-{s}"))),
            _ => None,
        };
        out.push(rewritten.unwrap_or(arg));
    }
    out
}

fn is_go_long_flag(s: &str) -> bool {
    let Some(rest) = s.strip_prefix('-') else {
        return false;
    };
    let name = rest.split('=').next().unwrap_or("");
    !rest.starts_with('-')
        && name.len() > 1
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(args: &[&str]) -> Vec<String> {
        normalize(args.iter().map(OsString::from))
            .into_iter()
            .map(|a| a.into_string().expect("utf-8 test args"))
            .collect()
    }

    #[test]
    fn single_dash_long_flags_become_double_dash() {
        assert_eq!(
            norm(&[
                "prog",
                "-listen",
                ":8123",
                "-id=first",
                "--token",
                "aaa",
                "-debug",
                "-h"
            ]),
            [
                "prog",
                "--listen",
                ":8123",
                "--id=first",
                "--token",
                "aaa",
                "--debug",
                "-h"
            ]
        );
    }

    #[test]
    fn values_and_passthrough_are_untouched() {
        assert_eq!(
            norm(&[
                "prog",
                "-peers",
                "second:aaa:ws://localhost:8124/connect",
                "-",
                "--",
                "-x1"
            ]),
            [
                "prog",
                "--peers",
                "second:aaa:ws://localhost:8124/connect",
                "-",
                "--",
                "-x1"
            ]
        );
    }
}
