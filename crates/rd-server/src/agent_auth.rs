//! [`AgentTokens`]: an authorizer that wants a per-client token, read from a file that can be
//! reloaded while the server runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use http::request::Parts;
use rd_session::BoxFuture;

use crate::auth::{constant_time_eq, Authorization, Authorizer};

/// Header an agent sends its token in (the same name Go uses for the peer token; agents
/// send it with `X-Tunnel-ID`, peers with `X-API-Tunnel-ID`).
pub const AGENT_TOKEN_HEADER: &str = "X-API-Tunnel-Token";

/// Why a token file was refused. Never contains a token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenFileError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A line is not `client-id token`.
    #[error("{path} line {line}: want \"client-id token\"")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
    },
    /// A client id appears twice.
    #[error("{path} line {line}: client id {id:?} appears twice")]
    Duplicate {
        /// The file.
        path: PathBuf,
        /// The 1-based line number of the second appearance.
        line: usize,
        /// The client id.
        id: String,
    },
}

/// Parses `client-id token` lines; `#` starts a comment line, blank lines are skipped.
fn parse(path: &Path, text: &str) -> Result<HashMap<String, String>, TokenFileError> {
    let mut tokens = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(id), Some(token), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(TokenFileError::Malformed {
                path: path.to_owned(),
                line: i + 1,
            });
        };
        if tokens.insert(id.to_owned(), token.to_owned()).is_some() {
            return Err(TokenFileError::Duplicate {
                path: path.to_owned(),
                line: i + 1,
                id: id.to_owned(),
            });
        }
    }
    Ok(tokens)
}

/// Accepts an agent whose `X-Tunnel-ID` is listed in the token file and whose
/// `X-API-Tunnel-Token` matches that id's token (compared in constant time). Everything
/// else, including an id that is already connected presented with a wrong token, is
/// refused with 401. Cheap to clone; clones share the table, so a reload through one is
/// seen by all.
#[derive(Clone)]
pub struct AgentTokens {
    path: PathBuf,
    tokens: Arc<RwLock<HashMap<String, String>>>,
}

impl std::fmt::Debug for AgentTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The tokens themselves are never printed.
        f.debug_struct("AgentTokens")
            .field("path", &self.path)
            .field("agents", &self.len())
            .finish()
    }
}

impl AgentTokens {
    /// Reads the token file.
    pub fn load(path: impl Into<PathBuf>) -> Result<Self, TokenFileError> {
        let path = path.into();
        let tokens = Self::read(&path)?;
        Ok(Self {
            path,
            tokens: Arc::new(RwLock::new(tokens)),
        })
    }

    fn read(path: &Path) -> Result<HashMap<String, String>, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        parse(path, &text)
    }

    /// Reads the file again; on an error the table in use is kept. Returns the number of
    /// agents now known.
    pub fn reload(&self) -> Result<usize, TokenFileError> {
        let fresh = Self::read(&self.path)?;
        let n = fresh.len();
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(n)
    }

    /// The file the tokens come from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many agents the table knows.
    pub fn len(&self) -> usize {
        self.tokens.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether the table is empty (every agent is refused).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn check(&self, id: &str, token: &[u8]) -> bool {
        let tokens = self.tokens.read().unwrap_or_else(|p| p.into_inner());
        tokens
            .get(id)
            .is_some_and(|want| constant_time_eq(want.as_bytes(), token))
    }
}

impl Authorizer for AgentTokens {
    fn authorize(&self, request: &Parts) -> BoxFuture<Authorization> {
        let header = |name: &str| {
            request
                .headers
                .get(name)
                .map(|v| v.as_bytes())
                .filter(|v| !v.is_empty())
        };
        let verdict = match (
            header("x-tunnel-id").and_then(|v| std::str::from_utf8(v).ok()),
            header(AGENT_TOKEN_HEADER),
        ) {
            (Some(id), Some(token)) if self.check(id, token) => {
                Authorization::Client(id.to_owned())
            }
            _ => Authorization::Unauthorized,
        };
        Box::pin(async move { verdict })
    }

    fn method(&self) -> &'static str {
        "agent-token"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().uri("/connect");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    fn tokens(text: &str) -> AgentTokens {
        AgentTokens {
            path: PathBuf::from("tokens"),
            tokens: Arc::new(RwLock::new(
                parse(Path::new("tokens"), text).expect("valid"),
            )),
        }
    }

    #[tokio::test]
    async fn right_wrong_and_missing_tokens() {
        let t = tokens("# agents\nfoo s3cret\n\nbar other\n");
        let verdict = |h: &[(&str, &str)]| t.authorize(&parts(h));
        assert_eq!(
            verdict(&[("x-tunnel-id", "foo"), (AGENT_TOKEN_HEADER, "s3cret")]).await,
            Authorization::Client("foo".into())
        );
        for bad in [
            &[("x-tunnel-id", "foo"), (AGENT_TOKEN_HEADER, "other")][..],
            &[("x-tunnel-id", "foo")][..],
            &[("x-tunnel-id", "nobody"), (AGENT_TOKEN_HEADER, "s3cret")][..],
            &[(AGENT_TOKEN_HEADER, "s3cret")][..],
        ] {
            assert_eq!(verdict(bad).await, Authorization::Unauthorized, "{bad:?}");
        }
        assert!(!format!("{t:?}").contains("s3cret"));
    }

    #[test]
    fn malformed_files_name_the_line_not_the_token() {
        let err = parse(Path::new("f"), "foo a\nbar s3cret extra\n").expect_err("bad");
        assert_eq!(err.to_string(), "f line 2: want \"client-id token\"");
        let err = parse(Path::new("f"), "foo a\nfoo s3cret\n").expect_err("dup");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }
}
