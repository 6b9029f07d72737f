//! `--forward` and `--connect-wait`: parsing, and starting the forwards before the main
//! listener so a bad forward stops the server at startup.

use std::time::Duration;

use rd_server::forward::{Forward, ForwardHandle, ForwardSpec};
use rd_server::Server;

use crate::cli;

/// Parses `--connect-wait`: `250ms`, `2s`, or `0`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {text:?}: want e.g. 100ms, 2s or 0");
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, ""),
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "" if n == 0 => Ok(Duration::ZERO),
        _ => Err(bad()),
    }
}

/// Binds every forward's listener, then starts them; prints `forwarding ADDR to
/// CLIENT:PROTO/ADDRESS` on stdout for each (the bound address, so `:0` is usable).
pub async fn start(
    server: &Server,
    specs: &[ForwardSpec],
) -> Result<Vec<ForwardHandle>, Box<dyn std::error::Error>> {
    let mut listeners = Vec::with_capacity(specs.len());
    for spec in specs {
        let listener = cli::bind(&spec.listen)
            .await
            .map_err(|e| format!("--forward {spec}: {e}"))?;
        listeners.push((spec.clone(), listener));
    }
    let mut handles = Vec::with_capacity(listeners.len());
    for (spec, listener) in listeners {
        let addr = listener.local_addr()?;
        println!(
            "forwarding {addr} to {}:{}/{}",
            spec.client_key,
            spec.target.proto(),
            spec.target.address()
        );
        tracing::info!(%addr, forward = %spec, "forward listening");
        handles.push(Forward::new(server.clone(), spec).spawn(listener));
    }
    Ok(handles)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "5", "1m", "ms", "-1s", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
