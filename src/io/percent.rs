//! `%XX` decoding for the two places that take percent-encoded text: the
//! `socket=` path of an `nbd+unix://` URI and a rule name in a control API
//! path. One strict decoder, so the two cannot drift apart again: a `%` must
//! be followed by exactly two hex digits (`%+1`, which a number parser would
//! take, is refused).

/// Decodes `%XX` escapes; `None` when a `%` is not followed by two hex
/// digits. Each caller words its own error.
pub fn decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = bytes.get(i + 1).copied().and_then(hex_digit)?;
            let lo = bytes.get(i + 2).copied().and_then(hex_digit)?;
            out.push((hi << 4) | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_escapes_and_refuses_bad_ones() {
        assert_eq!(decode("a%20b").as_deref(), Some(&b"a b"[..]));
        assert_eq!(decode("%2Fx%2f").as_deref(), Some(&b"/x/"[..]));
        assert_eq!(decode("%FF").as_deref(), Some(&[0xff][..]));
        assert_eq!(decode("").as_deref(), Some(&b""[..]));
        for bad in ["%", "a%2", "%zz", "%+1", "%-1", "% 1", "%1"] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
    }
}
