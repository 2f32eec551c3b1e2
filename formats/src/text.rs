//! Text forms shared by the json and csv codecs: numbers, BYTES as base64, error renderings.
//! Everything appends to a caller's buffer, so a warm codec does not allocate.

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;

use crate::batch::{ColRef, Slot, Staged};
use crate::error::FieldError;
use crate::options::PayloadField;
use crate::schema::DataType;

/// Standard base64 (RFC 4648); written with padding, read with or without it (and, as Keel
/// always read it, ignoring the unused bits of the last symbol).
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(true),
);

/// `text` without up to two trailing `=` (padding is optional, and a stray one was always
/// accepted).
fn unpadded(text: &str) -> &str {
    let t = text.strip_suffix('=').unwrap_or(text);
    t.strip_suffix('=').unwrap_or(t)
}

pub(crate) fn push_base64(bytes: &[u8], out: &mut String) {
    BASE64.encode_string(bytes, out);
}

/// Decodes base64 `text` into the staged bytes; `None` (and nothing staged) when it is not
/// base64.
pub(crate) fn stage_base64(text: &str, staged: &mut Staged) -> Option<Slot> {
    let start = staged.bytes.len();
    match BASE64.decode_vec(unpadded(text), &mut staged.bytes) {
        Ok(()) => Some(Slot::Bytes(start..staged.bytes.len())),
        Err(_) => {
            staged.bytes.truncate(start);
            None
        }
    }
}

/// Decodes base64 into a new vector (MAP entries read from JSON).
pub(crate) fn base64_decode(text: &str) -> Option<Vec<u8>> {
    BASE64.decode(unpadded(text)).ok()
}

pub(crate) fn push_int(n: i64, out: &mut String) {
    let mut buf = itoa::Buffer::new();
    out.push_str(buf.format(n));
}

/// The shortest text that reads back as the same finite `f64` (`1.0`, `0.1`, `1e300`);
/// `NaN`, `Infinity` and `-Infinity` otherwise.
pub(crate) fn push_double(d: f64, out: &mut String) {
    use std::fmt::Write as _;
    if d.is_finite() {
        // Writing to a String cannot fail.
        let _ = write!(out, "{d:?}");
    } else {
        out.push_str(non_finite(d));
    }
}

pub(crate) fn non_finite(d: f64) -> &'static str {
    if d.is_nan() {
        "NaN"
    } else if d > 0.0 {
        "Infinity"
    } else {
        "-Infinity"
    }
}

/// An INT value must fit 32 bits.
pub(crate) fn check_int(ty: DataType, n: i64) -> Result<(), String> {
    if ty == DataType::Int && i32::try_from(n).is_err() {
        return Err(format!("{n} is out of range for INT"));
    }
    Ok(())
}

/// A short rendering of text for error messages (quoted, cut at 64 bytes).
pub(crate) fn shown(text: &str) -> String {
    format!("{:?}", cut(text))
}

/// `text` cut at 61 bytes plus `...` when longer than 64 bytes.
pub(crate) fn cut(text: &str) -> String {
    let mut s = text.to_string();
    if s.len() > 64 {
        let mut at = 61;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
        s.push_str("...");
    }
    s
}

pub(crate) fn type_error(f: &PayloadField, col: &ColRef<'_>) -> FieldError {
    FieldError::new(&f.name, format!("a {} value in a {} column", col.kind(), f.data_type))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4648's test vectors both ways; padding optional when reading; text outside the
    /// alphabet refused with nothing staged.
    #[test]
    fn base64_matches_rfc4648_and_reads_without_padding() {
        let vectors: [(&[u8], &str); 7] = [
            (b"", ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
        ];
        for (bytes, text) in vectors {
            let mut out = String::new();
            push_base64(bytes, &mut out);
            assert_eq!(out, text);
            assert_eq!(base64_decode(text).as_deref(), Some(bytes));
            assert_eq!(base64_decode(text.trim_end_matches('=')).as_deref(), Some(bytes));
        }
        let mut staged = Staged::new(1);
        assert_eq!(stage_base64("Zm9v", &mut staged), Some(Slot::Bytes(0..3)));
        assert_eq!(stage_base64("Zm9v!", &mut staged), None);
        assert_eq!(staged.bytes, b"foo");
        // As before the base64 crate: the unused bits of the last symbol are ignored, and a
        // stray padding character is accepted.
        assert_eq!(base64_decode("Zh==").as_deref(), Some(&b"f"[..]));
        assert_eq!(base64_decode("Zm9v=").as_deref(), Some(&b"foo"[..]));
        assert_eq!(base64_decode("=").as_deref(), Some(&b""[..]));
        assert_eq!(base64_decode("Zm9v==="), None);
        let all: Vec<u8> = (0..=255).collect();
        let mut text = String::new();
        push_base64(&all, &mut text);
        assert_eq!(base64_decode(&text), Some(all));
    }

    /// Numbers print as before (integers plainly, doubles in their shortest round-trip form).
    #[test]
    fn numbers_print_in_their_shortest_form() {
        let mut s = String::new();
        push_int(i64::MIN, &mut s);
        s.push(' ');
        for d in [1.0, 0.1, 1e300, f64::NAN, f64::NEG_INFINITY] {
            push_double(d, &mut s);
            s.push(' ');
        }
        assert_eq!(s, "-9223372036854775808 1.0 0.1 1e300 NaN -Infinity ");
    }
}
