//! Parsing of a single-range `Range: bytes=...` request header (RFC 9110 §14).
//!
//! Deliberate simplifications, all permitted by the RFC:
//! * a header asking for several ranges is answered with the whole file (200)
//!   instead of a `multipart/byteranges` body;
//! * a syntactically invalid header, or one in another unit, is ignored (200).

/// An inclusive byte range already clamped to the file length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte to send.
    pub start: u64,
    /// Last byte to send (inclusive, as in `Content-Range`).
    pub end: u64,
}

impl ByteRange {
    /// Number of bytes in the range (never zero).
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }
}

/// What to send in reply to a request's `Range` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable range: send the whole file with 200.
    Full,
    /// Send just this part with 206.
    Partial(ByteRange),
    /// The range lies outside the file: 416.
    Unsatisfiable,
}

/// Interprets a `Range` header value against a file of `len` bytes.
pub fn parse(header: Option<&str>, len: u64) -> RangeRequest {
    let Some(header) = header else {
        return RangeRequest::Full;
    };
    let header = header.trim();
    let Some(unit) = header.get(..6) else {
        return RangeRequest::Full;
    };
    if !unit.eq_ignore_ascii_case("bytes=") {
        return RangeRequest::Full;
    }
    // Empty list elements are legal ("bytes=0-1,"), so they do not count as ranges.
    let mut specs = header[6..]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty());
    match (specs.next(), specs.next()) {
        (Some(spec), None) => parse_spec(spec, len).unwrap_or(RangeRequest::Full),
        _ => RangeRequest::Full,
    }
}

/// `None` means malformed.
fn parse_spec(spec: &str, len: u64) -> Option<RangeRequest> {
    let (first, last) = spec.split_once('-')?;
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        let suffix = number(last)?;
        if suffix == 0 || len == 0 {
            return Some(RangeRequest::Unsatisfiable);
        }
        let start = len - suffix.min(len);
        return Some(RangeRequest::Partial(ByteRange {
            start,
            end: len - 1,
        }));
    }
    let start = number(first)?;
    let end = if last.is_empty() {
        u64::MAX
    } else {
        number(last)?
    };
    if end < start {
        return None;
    }
    if start >= len {
        return Some(RangeRequest::Unsatisfiable);
    }
    Some(RangeRequest::Partial(ByteRange {
        start,
        end: end.min(len - 1),
    }))
}

/// Digits only; values beyond `u64` saturate, since they can only mean "to the end"
/// (or "past the end" for a start).
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.bytes().fold(0u64, |acc, b| {
        acc.saturating_mul(10).saturating_add(u64::from(b - b'0'))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partial(start: u64, end: u64) -> RangeRequest {
        RangeRequest::Partial(ByteRange { start, end })
    }

    #[test]
    fn no_header_means_full() {
        assert_eq!(parse(None, 10), RangeRequest::Full);
    }

    #[test]
    fn closed_ranges_are_clamped() {
        assert_eq!(parse(Some("bytes=2-5"), 10), partial(2, 5));
        assert_eq!(parse(Some("bytes=0-0"), 10), partial(0, 0));
        assert_eq!(parse(Some("bytes=5-100"), 10), partial(5, 9));
        assert_eq!(
            parse(Some("bytes=5-99999999999999999999999"), 10),
            partial(5, 9)
        );
        assert_eq!(parse(Some("BYTES= 2 - 5 ,"), 10), partial(2, 5));
    }

    #[test]
    fn open_and_suffix_ranges() {
        assert_eq!(parse(Some("bytes=3-"), 10), partial(3, 9));
        assert_eq!(parse(Some("bytes=-4"), 10), partial(6, 9));
        assert_eq!(parse(Some("bytes=-40"), 10), partial(0, 9));
        assert_eq!(parse(Some("bytes=-1"), 1), partial(0, 0));
    }

    #[test]
    fn out_of_bounds_is_unsatisfiable() {
        assert_eq!(parse(Some("bytes=10-"), 10), RangeRequest::Unsatisfiable);
        assert_eq!(parse(Some("bytes=10-20"), 10), RangeRequest::Unsatisfiable);
        assert_eq!(parse(Some("bytes=-0"), 10), RangeRequest::Unsatisfiable);
        assert_eq!(parse(Some("bytes=0-"), 0), RangeRequest::Unsatisfiable);
        assert_eq!(parse(Some("bytes=-5"), 0), RangeRequest::Unsatisfiable);
        assert_eq!(
            parse(Some("bytes=99999999999999999999999-"), 10),
            RangeRequest::Unsatisfiable
        );
    }

    #[test]
    fn malformed_or_multiple_ranges_fall_back_to_full() {
        for header in [
            "bytes=",
            "bytes=-",
            "bytes=5",
            "bytes=5-2",
            "bytes=a-b",
            "bytes=+1-2",
            "bytes=--1",
            "items=0-1",
            "bytes",
            "bytes=0-1,3-4",
        ] {
            assert_eq!(parse(Some(header), 10), RangeRequest::Full, "{header}");
        }
    }

    #[test]
    fn range_length_is_inclusive() {
        assert_eq!(ByteRange { start: 2, end: 5 }.len(), 4);
        assert_eq!(ByteRange { start: 0, end: 0 }.len(), 1);
    }
}
