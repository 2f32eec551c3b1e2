//! Text forms shared by the json and csv codecs: numbers (DECIMAL through arrow-cast's parser),
//! BYTES as base64, error renderings.
//! Everything appends to a caller's buffer, so a warm codec does not allocate.

use arrow_array::types::{Decimal128Type, DecimalType as _};
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

/// Appends `unscaled / 10^scale` in plain notation with exactly `scale` digits after the point
/// (`12.50`, `-0.125`, `7`), as Flink writes a DECIMAL. No allocation beyond `out`'s growth.
pub(crate) fn push_decimal(unscaled: i128, scale: i8, out: &mut String) {
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(unscaled.unsigned_abs());
    if unscaled < 0 {
        out.push('-');
    }
    let frac = usize::from(scale.max(0).unsigned_abs());
    if frac == 0 {
        out.push_str(digits);
        // A negative scale (no Keel type has one) means trailing zeros.
        if unscaled != 0 {
            (0..scale.min(0).unsigned_abs()).for_each(|_| out.push('0'));
        }
    } else if digits.len() <= frac {
        out.push_str("0.");
        (digits.len()..frac).for_each(|_| out.push('0'));
        out.push_str(digits);
    } else {
        let (int, fraction) = digits.split_at(digits.len() - frac);
        out.push_str(int);
        out.push('.');
        out.push_str(fraction);
    }
}

/// Parses decimal text (`12.5`, `-0.125`, `+3`, `.5`, `1.5e2`; surrounding whitespace ignored)
/// into the unscaled value of a `DECIMAL(precision, scale)`, rounding digits past the scale
/// half up (away from zero), as Flink does. Errors say whether the text is no number or the
/// number does not fit the precision.
pub(crate) fn parse_decimal(text: &str, precision: u8, scale: i8) -> Result<i128, String> {
    arrow_cast::parse::parse_decimal::<Decimal128Type>(text, precision, scale).map_err(|e| {
        let ty = DataType::Decimal { precision, scale };
        // arrow-cast says "... does not fit in Decimal128(p, s)" for a number out of range.
        if e.to_string().contains("does not fit") {
            format!("{} is out of range for {ty}", shown(text.trim()))
        } else {
            format!("expected {ty}, found {}", shown(text))
        }
    })
}

/// `unscaled` at scale `from` rescaled to `to` (rounding half up when digits are dropped),
/// `None` when it does not fit `precision` digits.
pub(crate) fn rescale_decimal(unscaled: i128, from: i8, precision: u8, to: i8) -> Option<i128> {
    if from == to {
        return Decimal128Type::is_valid_decimal_precision(unscaled, precision).then_some(unscaled);
    }
    arrow_cast::rescale_decimal::<Decimal128Type, Decimal128Type>(
        unscaled,
        DataType::MAX_DECIMAL_PRECISION,
        from,
        precision,
        to,
    )
}

/// The value at `row` of a DECIMAL array at a `DECIMAL(precision, scale)` column's scale (the
/// array's own scale when they agree, as they do for batches of the column's schema).
pub(crate) fn decimal_at(
    array: &arrow_array::Decimal128Array,
    row: usize,
    precision: u8,
    scale: i8,
) -> Result<i128, String> {
    let v = array.value(row);
    if array.scale() == scale {
        return Ok(v);
    }
    rescale_decimal(v, array.scale(), precision, scale).ok_or_else(|| {
        let mut text = String::new();
        push_decimal(v, array.scale(), &mut text);
        format!("{text} is out of range for {}", DataType::Decimal { precision, scale })
    })
}

/// An INT value must fit 32 bits.
pub(crate) fn check_int(ty: &DataType, n: i64) -> Result<(), String> {
    if *ty == DataType::Int && i32::try_from(n).is_err() {
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

    /// DECIMAL text: exactly `scale` fraction digits, leading zeros, signs, and the extremes
    /// of 38 digits; reading rounds half up (away from zero) and refuses what does not fit.
    #[test]
    fn decimals_print_plainly_and_parse_rounding_half_up() -> Result<(), String> {
        let text = |v: i128, s: i8| {
            let mut out = String::new();
            push_decimal(v, s, &mut out);
            out
        };
        assert_eq!(text(1250, 2), "12.50");
        assert_eq!(text(-125, 3), "-0.125");
        assert_eq!(text(5, 3), "0.005");
        assert_eq!(text(0, 2), "0.00");
        assert_eq!(text(7, 0), "7");
        assert_eq!(text(-7, 0), "-7");
        let max = 10i128.pow(38) - 1;
        assert_eq!(text(max, 0), "9".repeat(38));
        assert_eq!(text(-max, 38), format!("-0.{}", "9".repeat(38)));
        assert_eq!(text(i128::MIN, 0), "-170141183460469231731687303715884105728");

        assert_eq!(parse_decimal("12.5", 10, 2)?, 1250);
        assert_eq!(parse_decimal(" -0.125 ", 10, 3)?, -125);
        assert_eq!(parse_decimal("1.005", 10, 2)?, 101);
        assert_eq!(parse_decimal("-1.005", 10, 2)?, -101);
        assert_eq!(parse_decimal("1.004", 10, 2)?, 100);
        assert_eq!(parse_decimal("2.5", 10, 0)?, 3);
        assert_eq!(parse_decimal("1e2", 10, 0)?, 100);
        assert_eq!(parse_decimal(".5", 10, 1)?, 5);
        assert_eq!(parse_decimal(&"9".repeat(38), 38, 0)?, max);
        let err = parse_decimal("1000", 5, 2).expect_err("4 integer digits in DECIMAL(5, 2)");
        assert_eq!(err, "\"1000\" is out of range for DECIMAL(5, 2)");
        let err = parse_decimal("999.995", 5, 2).expect_err("rounds up to 1000.00");
        assert!(err.contains("out of range"), "{err}");
        assert_eq!(parse_decimal("999.994", 5, 2)?, 99_999);
        let err = parse_decimal(&"9".repeat(39), 38, 0).expect_err("39 digits");
        assert!(err.contains("out of range for DECIMAL(38, 0)"), "{err}");
        for bad in ["", "abc", "1.2.3", "NaN", "Infinity", "1,5", "0x10", "--1"] {
            let err = parse_decimal(bad, 10, 2).expect_err(bad);
            assert!(err.starts_with("expected DECIMAL(10, 2), found"), "{bad}: {err}");
        }

        assert_eq!(rescale_decimal(1250, 2, 10, 4), Some(125_000));
        assert_eq!(rescale_decimal(125, 2, 10, 1), Some(13));
        assert_eq!(rescale_decimal(-125, 2, 10, 1), Some(-13));
        assert_eq!(rescale_decimal(99_999, 2, 5, 3), None);
        assert_eq!(rescale_decimal(100_000, 0, 5, 0), None);
        Ok(())
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
