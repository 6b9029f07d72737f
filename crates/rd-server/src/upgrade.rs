//! Validating a websocket upgrade request (RFC 6455 section 4.2.1), in gorilla's order.

use http::request::Parts;
use http::{header, Method, StatusCode};

/// Why a request is not a websocket upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadUpgrade {
    pub(crate) status: StatusCode,
    pub(crate) reason: &'static str,
}

fn has_token(parts: &Parts, name: header::HeaderName, token: &str) -> bool {
    parts
        .headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Returns the `Sec-WebSocket-Accept` value for a valid upgrade request.
pub(crate) fn accept_key(parts: &Parts) -> Result<String, BadUpgrade> {
    let bad = |status, reason| Err(BadUpgrade { status, reason });
    if !has_token(parts, header::CONNECTION, "upgrade") {
        return bad(
            StatusCode::BAD_REQUEST,
            "websocket: the client is not using the websocket protocol: 'upgrade' token not found in 'Connection' header",
        );
    }
    if !has_token(parts, header::UPGRADE, "websocket") {
        return bad(
            StatusCode::UPGRADE_REQUIRED,
            "websocket: the client is not using the websocket protocol: 'websocket' token not found in 'Upgrade' header",
        );
    }
    if parts.method != Method::GET {
        return bad(
            StatusCode::METHOD_NOT_ALLOWED,
            "websocket: the client is not using the websocket protocol: request method is not GET",
        );
    }
    if parts
        .headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return bad(
            StatusCode::BAD_REQUEST,
            "websocket: unsupported version: 13 not found in 'Sec-Websocket-Version' header",
        );
    }
    let Some(key) = parts
        .headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|k| valid_key(k.as_bytes()))
    else {
        return bad(StatusCode::BAD_REQUEST, "websocket: not a websocket handshake: 'Sec-WebSocket-Key' header must be Base64 encoded value of 16-byte in length");
    };
    Ok(tungstenite::handshake::derive_accept_key(key.as_bytes()))
}

/// A 16-byte nonce in base64 is 24 characters ending in `==`.
fn valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri("/connect");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("valid request").into_parts().0
    }

    const GOOD: [(&str, &str); 4] = [
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "1z1yQIVmVC0jLv/0IZkOtg=="),
    ];

    #[test]
    fn accepts_the_go_client_and_matches_its_accept_key() {
        // The captured Go handshake: key 1z1yQIVmVC0jLv/0IZkOtg== -> v5DtyZF5ZqPyhUIG2FCLes/vNas=
        assert_eq!(
            accept_key(&parts("GET", &GOOD)).as_deref(),
            Ok("v5DtyZF5ZqPyhUIG2FCLes/vNas=")
        );
    }

    #[test]
    fn rejects_like_gorilla() {
        let status =
            |method, h: &[(&str, &str)]| accept_key(&parts(method, h)).map_err(|e| e.status);
        assert_eq!(status("GET", &GOOD[1..]), Err(StatusCode::BAD_REQUEST));
        assert_eq!(
            status("GET", &[GOOD[0], GOOD[2], GOOD[3]]),
            Err(StatusCode::UPGRADE_REQUIRED)
        );
        assert_eq!(status("POST", &GOOD), Err(StatusCode::METHOD_NOT_ALLOWED));
        assert_eq!(
            status(
                "GET",
                &[GOOD[0], GOOD[1], ("sec-websocket-version", "8"), GOOD[3]]
            ),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            status(
                "GET",
                &[GOOD[0], GOOD[1], GOOD[2], ("sec-websocket-key", "short")]
            ),
            Err(StatusCode::BAD_REQUEST)
        );
    }
}
