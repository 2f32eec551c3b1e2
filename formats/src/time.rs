//! Timestamps and dates as text: epoch milliseconds (UTC) ⇄ `yyyy-MM-dd HH:mm:ss.SSS`, days
//! since 1970-01-01 ⇄ `yyyy-MM-dd`.
//!
//! Calendar arithmetic follows Howard Hinnant's `days_from_civil` / `civil_from_days`
//! (proleptic Gregorian calendar).

use std::fmt::Write as _;

use crate::options::TimestampStandard;

const MS_PER_DAY: i64 = 86_400_000;

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Appends the timestamp in the given standard: SQL `2024-05-01 12:00:00.000`, ISO-8601
/// `2024-05-01T12:00:00.000Z`.
pub(crate) fn format(epoch_ms: i64, standard: TimestampStandard, out: &mut String) {
    let days = epoch_ms.div_euclid(MS_PER_DAY);
    let ms_of_day = epoch_ms.rem_euclid(MS_PER_DAY);
    let (y, m, d) = civil_from_days(days);
    let (hh, rest) = (ms_of_day / 3_600_000, ms_of_day % 3_600_000);
    let (mm, rest) = (rest / 60_000, rest % 60_000);
    let (ss, ms) = (rest / 1000, rest % 1000);
    let sep = match standard {
        TimestampStandard::Sql => ' ',
        TimestampStandard::Iso8601 => 'T',
    };
    // Writing to a String cannot fail.
    let _ = write!(out, "{y:04}-{m:02}-{d:02}{sep}{hh:02}:{mm:02}:{ss:02}.{ms:03}");
    if standard == TimestampStandard::Iso8601 {
        out.push('Z');
    }
}

/// Appends a date (days since 1970-01-01) as `yyyy-MM-dd` (ISO-8601's calendar date, as Flink
/// writes a DATE; a year past 9999 has more digits, one before 1 a minus sign).
pub(crate) fn format_date(days: i32, out: &mut String) {
    let (y, m, d) = civil_from_days(i64::from(days));
    // Writing to a String cannot fail.
    let _ = write!(out, "{y:04}-{m:02}-{d:02}");
}

/// Parses a date written `yyyy-MM-dd` (surrounding whitespace ignored; nothing else, as
/// Flink's ISO_LOCAL_DATE) into days since 1970-01-01.
pub(crate) fn parse_date(text: &str) -> Option<i32> {
    let mut c = Cursor { bytes: text.trim().as_bytes(), pos: 0 };
    let days = date_part(&mut c)?;
    if !c.done() {
        return None;
    }
    i32::try_from(days).ok()
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn digits(&mut self, n: usize) -> Option<i64> {
        let chunk = self.bytes.get(self.pos..self.pos + n)?;
        let mut v = 0i64;
        for b in chunk {
            if !b.is_ascii_digit() {
                return None;
            }
            v = v * 10 + i64::from(b - b'0');
        }
        self.pos += n;
        Some(v)
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn done(&self) -> bool {
        self.pos == self.bytes.len()
    }
}

/// Parses `yyyy-MM-dd[( |T)HH:mm[:ss[.f{1,9}]]][Z|±HH[:mm]]` into epoch milliseconds (UTC
/// unless an offset is given; digits past milliseconds are truncated).
pub(crate) fn parse(text: &str) -> Option<i64> {
    let mut c = Cursor { bytes: text.trim().as_bytes(), pos: 0 };
    let days = date_part(&mut c)?;
    let mut ms_of_day = 0;
    if !c.done() {
        if !(c.eat(b' ') || c.eat(b'T') || c.eat(b't')) {
            return None;
        }
        let hh = c.digits(2)?;
        if !c.eat(b':') {
            return None;
        }
        let mm = c.digits(2)?;
        let mut ss = 0;
        let mut frac_ms = 0;
        if c.eat(b':') {
            ss = c.digits(2)?;
            if c.eat(b'.') || c.eat(b',') {
                let start = c.pos;
                while c.peek().is_some_and(|b| b.is_ascii_digit()) {
                    c.pos += 1;
                }
                let frac = &c.bytes[start..c.pos];
                if frac.is_empty() || frac.len() > 9 {
                    return None;
                }
                for i in 0..3 {
                    frac_ms = frac_ms * 10 + frac.get(i).map_or(0, |b| i64::from(b - b'0'));
                }
            }
        }
        if hh > 23 || mm > 59 || ss > 59 {
            return None;
        }
        ms_of_day = ((hh * 60 + mm) * 60 + ss) * 1000 + frac_ms;
        // Zone.
        match c.peek() {
            None => {}
            Some(b'Z') | Some(b'z') => c.pos += 1,
            Some(sign @ (b'+' | b'-')) => {
                c.pos += 1;
                let oh = c.digits(2)?;
                let om = if c.eat(b':') { c.digits(2)? } else { c.digits(2).unwrap_or(0) };
                if oh > 23 || om > 59 {
                    return None;
                }
                let offset = (oh * 60 + om) * 60_000;
                ms_of_day -= if sign == b'+' { offset } else { -offset };
            }
            Some(_) => return None,
        }
    }
    if !c.done() {
        return None;
    }
    days.checked_mul(MS_PER_DAY)?.checked_add(ms_of_day)
}

/// Reads `yyyy-MM-dd` at the cursor: the days since 1970-01-01 of a real calendar date.
fn date_part(c: &mut Cursor<'_>) -> Option<i64> {
    let y = c.digits(4)?;
    if !c.eat(b'-') {
        return None;
    }
    let m = c.digits(2)?;
    if !c.eat(b'-') {
        return None;
    }
    let d = c.digits(2)?;
    if !(1..=12).contains(&m) || d < 1 || d > days_in_month(y, m) {
        return None;
    }
    Some(days_from_civil(y, m, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sql(ms: i64) -> String {
        let mut s = String::new();
        format(ms, TimestampStandard::Sql, &mut s);
        s
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(sql(0), "1970-01-01 00:00:00.000");
        assert_eq!(sql(1_609_331_594_123), "2020-12-30 12:33:14.123");
        assert_eq!(sql(-1), "1969-12-31 23:59:59.999");
        assert_eq!(sql(951_782_400_000), "2000-02-29 00:00:00.000");
        let mut iso = String::new();
        format(1_609_331_594_123, TimestampStandard::Iso8601, &mut iso);
        assert_eq!(iso, "2020-12-30T12:33:14.123Z");
    }

    #[test]
    fn parses_sql_iso_offsets_and_dates() {
        assert_eq!(parse("2020-12-30 12:33:14.123"), Some(1_609_331_594_123));
        assert_eq!(parse("2020-12-30T12:33:14.123Z"), Some(1_609_331_594_123));
        assert_eq!(parse("2020-12-30T13:33:14.123+01:00"), Some(1_609_331_594_123));
        assert_eq!(parse("2020-12-30T11:33:14.123-0100"), Some(1_609_331_594_123));
        assert_eq!(parse("2020-12-30 12:33:14.123456789"), Some(1_609_331_594_123));
        assert_eq!(parse("2020-12-30 12:33:14.1"), Some(1_609_331_594_100));
        assert_eq!(parse("2020-12-30 12:33"), Some(1_609_331_580_000));
        assert_eq!(parse("1970-01-01"), Some(0));
        assert_eq!(parse("1969-12-31 23:59:59.999"), Some(-1));
    }

    #[test]
    fn rejects_malformed_and_impossible_dates() {
        for bad in [
            "",
            "2020",
            "2020-13-01",
            "2021-02-29",
            "2020-12-30 24:00",
            "2020-12-30 12:60",
            "2020-12-30 12:33:14.",
            "2020-12-30 12:33:14.1234567890",
            "2020-12-30x12:33",
            "2020-12-30 12:33:14 UTC",
            "20201230",
            "２０２０-01-01",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    /// Dates: known days both ways, the leap-day rules, and strictly `yyyy-MM-dd`.
    #[test]
    fn dates_format_and_parse_as_yyyy_mm_dd() {
        let date = |days: i32| {
            let mut s = String::new();
            format_date(days, &mut s);
            s
        };
        for (days, text) in [
            (0, "1970-01-01"),
            (-1, "1969-12-31"),
            (11_016, "2000-02-29"),
            (19_844, "2024-05-01"),
            (-719_528, "0000-01-01"),
            (2_932_896, "9999-12-31"),
        ] {
            assert_eq!(date(days), text);
            assert_eq!(parse_date(text), Some(days), "{text}");
        }
        assert_eq!(parse_date(" 2024-05-01\t"), Some(19_844));
        for bad in [
            "",
            "2024-5-1",
            "2024-05-01 00:00",
            "2024-05-01T00:00:00Z",
            "20240501",
            "1900-02-29",
            "2024-04-31",
        ] {
            assert_eq!(parse_date(bad), None, "{bad:?}");
        }
        let mut days = -719_528; // 0000-01-01
        while days <= 2_932_896 {
            assert_eq!(parse_date(&date(days)), Some(days), "{days}");
            days += 997;
        }
    }

    #[test]
    fn format_then_parse_is_the_identity_over_a_wide_range() {
        let mut ms = -62_135_596_800_000i64; // 0001-01-01
        while ms < 253_402_300_799_999 {
            assert_eq!(parse(&sql(ms)), Some(ms), "{ms}");
            ms += 77_777_777_777;
        }
    }
}
