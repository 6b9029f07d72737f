//! `--admin-auth FILE`: credentials the `/client` route asks for. One per line:
//! `bearer TOKEN` or `basic USER:PASSWORD`; `#` starts a comment line.

use std::path::Path;

use base64::Engine as _;

/// Accepted credentials. The secrets are never printed (no `Debug` of them).
pub struct AdminAuth {
    bearer: Vec<Vec<u8>>,
    /// `user:password`, as a Basic header carries it once decoded.
    basic: Vec<Vec<u8>>,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAuth")
            .field("bearer", &self.bearer.len())
            .field("basic", &self.basic.len())
            .finish()
    }
}

impl AdminAuth {
    /// Reads the file; errors name the file and line, never a secret.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|line| {
            format!(
                "{} line {line}: want \"bearer TOKEN\" or \"basic USER:PASSWORD\"",
                path.display()
            )
        })
    }

    fn parse(text: &str) -> Result<Self, usize> {
        let mut auth = Self {
            bearer: Vec::new(),
            basic: Vec::new(),
        };
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once(char::is_whitespace) {
                Some(("bearer", token)) if !token.trim().is_empty() => {
                    auth.bearer.push(token.trim().as_bytes().to_vec());
                }
                Some(("basic", pair)) if pair.trim().contains(':') => {
                    auth.basic.push(pair.trim().as_bytes().to_vec());
                }
                _ => return Err(i + 1),
            }
        }
        if auth.bearer.is_empty() && auth.basic.is_empty() {
            return Err(0);
        }
        Ok(auth)
    }

    /// Who the credentials of an `Authorization` header value are, for log lines (never
    /// the secret): `basic USER`, or `bearer #N` (the Nth bearer line of the file).
    pub fn who(&self, authorization: Option<&[u8]>) -> Option<String> {
        let value = authorization.and_then(|v| std::str::from_utf8(v).ok())?;
        let (scheme, credentials) = value.trim().split_once(' ')?;
        let credentials = credentials.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            let n = which(&self.bearer, credentials.as_bytes())?;
            Some(format!("bearer #{}", n + 1))
        } else if scheme.eq_ignore_ascii_case("basic") {
            let pair = base64::engine::general_purpose::STANDARD
                .decode(credentials)
                .ok()?;
            which(&self.basic, &pair)?;
            let user = pair.split(|&b| b == b':').next().unwrap_or_default();
            Some(format!("basic {}", String::from_utf8_lossy(user)))
        } else {
            None
        }
    }
}

impl AdminAuth {
    /// Whether a CONNECT's proxy password admits the caller to agent `client_key`: any
    /// bearer token as the password (the user name picks the agent), or a `basic` line for
    /// exactly `client_key:password`.
    pub fn allows_proxy(&self, client_key: &str, password: &str) -> bool {
        let pair = format!("{client_key}:{password}");
        any_equal(&self.bearer, password.as_bytes()) | any_equal(&self.basic, pair.as_bytes())
    }
}

/// Compares against every accepted secret, each in time independent of where they differ.
fn any_equal(accepted: &[Vec<u8>], offered: &[u8]) -> bool {
    which(accepted, offered).is_some()
}

/// The index of the accepted secret `offered` equals; every one is compared, each in time
/// independent of where they differ.
fn which(accepted: &[Vec<u8>], offered: &[u8]) -> Option<usize> {
    accepted.iter().enumerate().fold(None, |found, (i, a)| {
        let equal = constant_time_eq(a, offered);
        found.or(equal.then_some(i))
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_passwords() {
        let auth = AdminAuth::parse("bearer t0ken\nbasic foo:pa55\n").expect("valid");
        assert!(auth.allows_proxy("anyagent", "t0ken"));
        assert!(auth.allows_proxy("foo", "pa55"));
        assert!(!auth.allows_proxy("bar", "pa55"));
        assert!(!auth.allows_proxy("foo", "wrong"));
    }

    #[test]
    fn bearer_and_basic_credentials() {
        let auth = AdminAuth::parse("# ops\nbearer t0ken\nbasic ops:pa55\n").expect("valid");
        assert!(auth.who(Some(b"Bearer t0ken")).is_some());
        let basic = base64::engine::general_purpose::STANDARD.encode("ops:pa55");
        assert!(auth
            .who(Some(format!("Basic {basic}").as_bytes()))
            .is_some());
        for bad in [
            None,
            Some(&b"Bearer wrong"[..]),
            Some(&b"Bearer"[..]),
            Some(&b"Basic !!!"[..]),
            Some(&b"Digest t0ken"[..]),
        ] {
            assert!(auth.who(bad).is_none(), "{bad:?}");
        }
        assert!(!format!("{auth:?}").contains("t0ken"));
        assert_eq!(
            auth.who(Some(b"Bearer t0ken")).as_deref(),
            Some("bearer #1")
        );
        assert_eq!(
            auth.who(Some(format!("Basic {basic}").as_bytes()))
                .as_deref(),
            Some("basic ops")
        );
        assert_eq!(auth.who(Some(b"Bearer nope")), None);
        assert_eq!(AdminAuth::parse("bearer\n").err(), Some(1));
        assert_eq!(AdminAuth::parse("# nothing\n").err(), Some(0));
    }
}
