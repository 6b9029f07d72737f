//! Go `encoding/binary` signed varints: zig-zag, then LEB128 with the low group first.

use bytes::{Buf, BufMut};

/// Longest varint Go's `binary.ReadVarint` accepts (`binary.MaxVarintLen64`).
pub const MAX_VARINT_LEN: usize = 10;

/// Why a varint could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarintError {
    /// The input ended inside the varint.
    Truncated,
    /// More than ten bytes, or a tenth byte that does not fit in 64 bits.
    Overflow,
}

/// Appends `v` in Go's minimal `binary.PutVarint` form.
pub fn put_varint(buf: &mut impl BufMut, v: i64) {
    let mut u = zigzag(v);
    while u >= 0x80 {
        buf.put_u8((u & 0x7f) as u8 | 0x80);
        u >>= 7;
    }
    buf.put_u8(u as u8);
}

/// Number of bytes [`put_varint`] writes for `v`.
pub fn varint_len(v: i64) -> usize {
    let bits = 64 - zigzag(v).leading_zeros() as usize;
    bits.max(1).div_ceil(7)
}

/// Reads one varint, accepting non-minimal encodings of up to ten bytes as Go does.
pub fn get_varint(buf: &mut impl Buf) -> Result<i64, VarintError> {
    let mut x: u64 = 0;
    for i in 0..MAX_VARINT_LEN {
        if !buf.has_remaining() {
            return Err(VarintError::Truncated);
        }
        let b = buf.get_u8();
        if b < 0x80 {
            if i == MAX_VARINT_LEN - 1 && b > 1 {
                return Err(VarintError::Overflow);
            }
            return Ok(unzigzag(x | u64::from(b) << (7 * i)));
        }
        x |= u64::from(b & 0x7f) << (7 * i);
    }
    Err(VarintError::Overflow)
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(u: u64) -> i64 {
    ((u >> 1) as i64) ^ -((u & 1) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: i64) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, v);
        out
    }

    #[test]
    fn matches_go_table() {
        // docs/protocol.md's varint examples, checked against Go's encoding/binary.
        let table: &[(i64, &[u8])] = &[
            (0, &[0x00]),
            (1, &[0x02]),
            (2, &[0x04]),
            (-1, &[0x01]),
            (63, &[0x7e]),
            (64, &[0x80, 0x01]),
            (15000, &[0xb0, 0xea, 0x01]),
            (
                1234567890123456789,
                &[0xaa, 0x84, 0xcc, 0xde, 0x8f, 0xbd, 0x88, 0xa2, 0x22],
            ),
            (
                (1 << 62) + 1,
                &[0x82, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01],
            ),
        ];
        for &(v, bytes) in table {
            assert_eq!(enc(v), bytes, "encoding {v}");
            assert_eq!(varint_len(v), bytes.len(), "length of {v}");
            assert_eq!(get_varint(&mut &bytes[..]), Ok(v), "decoding {v}");
        }
    }

    #[test]
    fn extremes_round_trip() {
        for v in [i64::MIN, i64::MAX, i64::MIN + 1, -64, -65] {
            assert_eq!(get_varint(&mut &enc(v)[..]), Ok(v));
            assert_eq!(varint_len(v), enc(v).len());
        }
    }

    #[test]
    fn non_minimal_is_accepted() {
        // 1 written with a redundant continuation group.
        assert_eq!(get_varint(&mut &[0x82, 0x00][..]), Ok(1));
        let ten = [0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00];
        assert_eq!(get_varint(&mut &ten[..]), Ok(0));
    }

    #[test]
    fn overlong_and_truncated_are_rejected() {
        let eleven = [0x80u8; 10]
            .iter()
            .copied()
            .chain([0x00])
            .collect::<Vec<_>>();
        assert_eq!(get_varint(&mut &eleven[..]), Err(VarintError::Overflow));
        let tenth_too_big = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert_eq!(
            get_varint(&mut &tenth_too_big[..]),
            Err(VarintError::Overflow)
        );
        assert_eq!(get_varint(&mut &[0x80][..]), Err(VarintError::Truncated));
        assert_eq!(get_varint(&mut &[][..]), Err(VarintError::Truncated));
    }
}
