//! Answers one request from the served directory, following Go's
//! `http.FileServer` where it matters to clients: index.html, directory listings,
//! slash redirects, single byte ranges, 400 on `..`.
//!
//! Symlinks are followed, as Go's `http.Dir` does, even when they point outside the
//! directory: creating one is the operator's decision. What a *client* can never do
//! is name a path outside the directory (see [`crate::sanitize`]).

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::header::{
    ACCEPT_RANGES, ALLOW, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, IF_RANGE, LAST_MODIFIED,
    LOCATION, RANGE,
};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};

use crate::file_body::FileBody;
use crate::range::{self, RangeRequest};
use crate::sanitize::sanitize;
use crate::{http_date, listing, mime};

/// The body type of every response.
pub type ResponseBody = BoxBody<Bytes, io::Error>;

/// Serves the files below one root directory.
#[derive(Debug, Clone)]
pub struct FileServer {
    root: PathBuf,
}

impl FileServer {
    /// `root` should be absolute so log messages and errors are unambiguous.
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// Builds the complete response; never fails, errors become status codes.
    pub async fn respond<B>(&self, req: &Request<B>) -> Response<ResponseBody> {
        let head = match *req.method() {
            Method::GET => false,
            Method::HEAD => true,
            _ => {
                let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "405 method not allowed\n");
                resp.headers_mut()
                    .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
                return resp;
            }
        };
        let raw = req.uri().path();
        let Ok(path) = sanitize(raw) else {
            return text(StatusCode::BAD_REQUEST, "invalid URL path\n");
        };
        let fs_path = path.under(&self.root);
        let meta = match tokio::fs::metadata(&fs_path).await {
            Ok(meta) => meta,
            Err(e) => return io_error(&e),
        };

        if meta.is_dir() {
            // Relative links in the listing (and in index.html) only resolve
            // correctly below a URL that ends in a slash.
            if !raw.ends_with('/') {
                return redirect(&canonical(&path.segments, true), req.uri().query());
            }
            let index = fs_path.join("index.html");
            if tokio::fs::metadata(&index).await.is_ok_and(|m| m.is_file()) {
                return send_file(&index, req, head).await;
            }
            return match listing::read(&fs_path).await {
                Ok(html) => {
                    let mut resp = full(StatusCode::OK, html.into());
                    resp.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/html; charset=utf-8"),
                    );
                    resp
                }
                Err(e) => io_error(&e),
            };
        }

        if raw.ends_with('/') {
            return redirect(&canonical(&path.segments, false), req.uri().query());
        }
        // Go sends index.html's URL to its directory so there is one URL per page.
        if raw.ends_with("/index.html") {
            let dir = &path.segments[..path.segments.len().saturating_sub(1)];
            return redirect(&canonical(dir, true), req.uri().query());
        }
        send_file(&fs_path, req, head).await
    }
}

/// The absolute URL path for `segments`, re-encoded. Built from the cleaned
/// segments rather than the raw path so `//host/x` cannot become an open redirect.
fn canonical(segments: &[String], dir: bool) -> String {
    let mut url = String::from("/");
    url.push_str(
        &segments
            .iter()
            .map(|s| listing::href_escape(s))
            .collect::<Vec<_>>()
            .join("/"),
    );
    if dir && !segments.is_empty() {
        url.push('/');
    }
    url
}

async fn send_file<B>(path: &Path, req: &Request<B>, head: bool) -> Response<ResponseBody> {
    let owned = path.to_path_buf();
    let opened = tokio::task::spawn_blocking(move || {
        let file = File::open(&owned)?;
        let meta = file.metadata()?;
        Ok::<_, io::Error>((file, meta))
    })
    .await;
    let (mut file, meta) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(e)) => return io_error(&e),
        Err(_) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "500 internal server error\n",
            )
        }
    };
    // FIFOs and devices would tie up a blocking thread forever, or never end.
    if !meta.is_file() {
        return not_found();
    }
    let len = meta.len();
    let last_modified = meta.modified().ok().map(http_date::format);

    let range_header = req.headers().get(RANGE).and_then(|v| v.to_str().ok());
    // If-Range with a date only matches on an exact validator match (RFC 9110
    // §13.1.5); anything else means the client's partial copy is stale.
    let if_range = req.headers().get(IF_RANGE).map(|v| v.as_bytes());
    let range_header = match (if_range, &last_modified) {
        (None, _) => range_header,
        (Some(want), Some(have)) if want == have.as_bytes() => range_header,
        (Some(_), _) => None,
    };
    let (status, start, count, content_range) = match range::parse(range_header, len) {
        RangeRequest::Full => (StatusCode::OK, 0, len, None),
        RangeRequest::Partial(r) => (
            StatusCode::PARTIAL_CONTENT,
            r.start,
            r.len(),
            Some(format!("bytes {}-{}/{len}", r.start, r.end)),
        ),
        RangeRequest::Unsatisfiable => {
            let mut resp = text(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "invalid range: failed to overlap\n",
            );
            resp.headers_mut()
                .insert(CONTENT_RANGE, ascii(format!("bytes */{len}")));
            return resp;
        }
    };
    if start > 0 {
        if let Err(e) = file.seek(SeekFrom::Start(start)) {
            return io_error(&e);
        }
    }

    let body = if head {
        empty()
    } else {
        FileBody::new(file, count).boxed()
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(mime::content_type(path)),
    );
    headers.insert(CONTENT_LENGTH, HeaderValue::from(count));
    headers.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some(date) = last_modified {
        headers.insert(LAST_MODIFIED, ascii(date));
    }
    if let Some(content_range) = content_range {
        headers.insert(CONTENT_RANGE, ascii(content_range));
    }
    resp
}

fn io_error(e: &io::Error) -> Response<ResponseBody> {
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => not_found(),
        io::ErrorKind::PermissionDenied => text(StatusCode::FORBIDDEN, "403 Forbidden\n"),
        _ => {
            tracing::warn!("file system error: {e}");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "500 Internal Server Error\n",
            )
        }
    }
}

fn not_found() -> Response<ResponseBody> {
    text(StatusCode::NOT_FOUND, "404 page not found\n")
}

fn redirect(location: &str, query: Option<&str>) -> Response<ResponseBody> {
    let location = match query {
        Some(query) => format!("{location}?{query}"),
        None => location.to_owned(),
    };
    let mut resp = full(StatusCode::MOVED_PERMANENTLY, Bytes::new());
    resp.headers_mut().insert(LOCATION, ascii(location));
    resp
}

/// A short plain-text response, marked `nosniff` like Go's `http.Error`.
fn text(status: StatusCode, message: &'static str) -> Response<ResponseBody> {
    let mut resp = full(status, Bytes::from_static(message.as_bytes()));
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

fn full(status: StatusCode, body: Bytes) -> Response<ResponseBody> {
    let len = body.len() as u64;
    let mut resp = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

fn empty() -> ResponseBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// For header values this module formats itself from digits, ASCII names and
/// already-validated URL parts.
fn ascii(value: String) -> HeaderValue {
    HeaderValue::try_from(value).expect("generated header values are visible ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_urls_are_rooted_and_encoded() {
        assert_eq!(canonical(&[], true), "/");
        assert_eq!(canonical(&["evil.com".into()], true), "/evil.com/");
        assert_eq!(canonical(&["a b".into(), "c".into()], false), "/a%20b/c");
    }
}
