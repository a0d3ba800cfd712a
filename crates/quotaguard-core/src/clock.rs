//! Time: stored as UTC epoch milliseconds; days, months and hours are counted
//! in China Standard Time (UTC+08:00), where the platform counts them.
use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, TimeZone, Utc};

use crate::error::{invalid, Result};

pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 24 * HOUR_MS;
const CST_OFFSET_SECS: i32 = 8 * 3600;
/// China Standard Time's offset from UTC, in milliseconds.
pub const CST_OFFSET_MS: i64 = CST_OFFSET_SECS as i64 * 1000;

pub fn cst() -> FixedOffset {
    FixedOffset::east_opt(CST_OFFSET_SECS).expect("UTC+8 is a valid offset")
}

/// Milliseconds since the Unix epoch, from the system clock.
pub fn system_now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// The earliest time quotaguard stores: 2015-01-01T00:00:00Z.
pub const MIN_TIME_MS: i64 = 1_420_070_400_000;
/// The first time quotaguard no longer stores: 2100-01-01T00:00:00Z.
pub const MAX_TIME_MS: i64 = 4_102_444_800_000;
/// The span every reader can show: 0001-01-02T00:00:00Z..=9999-12-30T23:59:59.999Z, what a
/// Python `datetime` holds with a day to spare for any time zone's offset.
pub const SHOWN_MIN_MS: i64 = -62_135_510_400_000;
pub const SHOWN_MAX_MS: i64 = 253_402_214_399_999;

/// Why a time is out of range, when the likely reason is milliseconds given as seconds.
pub fn milliseconds_hint(ms: i64) -> &'static str {
    if (MIN_TIME_MS..MAX_TIME_MS).contains(&(ms / 1000)) {
        "; it looks like milliseconds: epoch times are in seconds (time.time(), not time.time() * 1000)"
    } else {
        "; epoch times are in seconds"
    }
}

/// An instant quotaguard stores (an activation, a call's time, a compaction point),
/// checked to fall in 2015..2100: a time outside it is a mistake (most often
/// milliseconds given as seconds), and would poison every reader of the ledger.
pub fn check_time(what: &str, ms: i64) -> Result<i64> {
    if (MIN_TIME_MS..MAX_TIME_MS).contains(&ms) {
        return Ok(ms);
    }
    let shown = match Utc.timestamp_millis_opt(ms).single() {
        Some(t) => format!("year {}", t.year()),
        None => format!("{} s from the epoch", ms / 1000),
    };
    Err(invalid(format!(
        "{what} ({shown}) is outside 2015..2100{}",
        milliseconds_hint(ms)
    )))
}

/// An instant as a UTC datetime, clamped to the years every reader can show (1..9999):
/// a row written by mistake far in the future still reads, it never breaks a view.
pub fn to_utc(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms.clamp(SHOWN_MIN_MS, SHOWN_MAX_MS))
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

pub fn to_cst(ms: i64) -> DateTime<FixedOffset> {
    to_utc(ms).with_timezone(&cst())
}

/// The CST calendar day of an instant.
pub fn cst_day(ms: i64) -> NaiveDate {
    to_cst(ms).date_naive()
}

/// The first millisecond of a CST calendar day.
pub fn cst_day_start(day: NaiveDate) -> i64 {
    cst()
        .from_local_datetime(&day.and_hms_opt(0, 0, 0).expect("midnight exists"))
        .single()
        .expect("a fixed offset has no gaps")
        .timestamp_millis()
}

/// The start of the hour an instant falls in (CST hours align with UTC hours).
pub fn hour_start(ms: i64) -> i64 {
    ms.div_euclid(HOUR_MS).saturating_mul(HOUR_MS)
}

/// `"2026-11"` -> the first and one-past-last CST days of that month.
pub fn parse_month(text: &str) -> Result<(NaiveDate, NaiveDate)> {
    let bad = || invalid(format!("month {text:?} is not of the form \"YYYY-MM\""));
    let (y, m) = text.trim().split_once('-').ok_or_else(bad)?;
    let year: i32 = y.parse().map_err(|_| bad())?;
    let month: u32 = m.parse().map_err(|_| bad())?;
    let first = NaiveDate::from_ymd_opt(year, month, 1).ok_or_else(bad)?;
    let next = if month == 12 {
        NaiveDate::from_ymd_opt(year + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(year, month + 1, 1)
    }
    .ok_or_else(bad)?;
    Ok((first, next))
}

/// `"2026-11-26"` -> that CST day.
pub fn parse_day(text: &str) -> Result<NaiveDate> {
    NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d")
        .map_err(|_| invalid(format!("day {text:?} is not of the form \"YYYY-MM-DD\"")))
}

pub fn month_of(day: NaiveDate) -> String {
    format!("{:04}-{:02}", day.year(), day.month())
}

/// An ISO-8601 instant with an explicit offset (or `Z`) -> epoch milliseconds.
/// A time without an offset is refused: whether it meant UTC or CST would be a guess.
pub fn parse_instant(text: &str) -> Result<i64> {
    let t = text.trim();
    if let Ok(dt) = DateTime::parse_from_rfc3339(t) {
        return Ok(dt.timestamp_millis());
    }
    for fmt in [
        "%Y-%m-%dT%H:%M%:z",
        "%Y-%m-%d %H:%M:%S%:z",
        "%Y-%m-%d %H:%M%:z",
    ] {
        if let Ok(dt) = DateTime::parse_from_str(t, fmt) {
            return Ok(dt.timestamp_millis());
        }
    }
    Err(invalid(format!(
        "time {text:?} is not an ISO-8601 instant with a UTC offset (for example \"2025-09-08T11:00:00+08:00\")"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cst_day_turns_at_utc_16() {
        let before = parse_instant("2026-11-26T15:59:59.999Z").unwrap();
        let after = parse_instant("2026-11-26T16:00:00Z").unwrap();
        assert_eq!(cst_day(before).to_string(), "2026-11-26");
        assert_eq!(cst_day(after).to_string(), "2026-11-27");
        assert_eq!(cst_day_start(cst_day(after)), after);
    }

    #[test]
    fn utc_midnight_is_not_a_cst_day_boundary() {
        let a = parse_instant("2026-11-26T23:59:00Z").unwrap();
        let b = parse_instant("2026-11-27T00:01:00Z").unwrap();
        assert_eq!(cst_day(a), cst_day(b));
    }

    #[test]
    fn months_parse_and_reject() {
        let (a, b) = parse_month("2026-12").unwrap();
        assert_eq!(
            (a.to_string(), b.to_string()),
            ("2026-12-01".into(), "2027-01-01".into())
        );
        for bad in ["2026", "2026-13", "x-01", ""] {
            let e = parse_month(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn stored_times_fall_in_2015_to_2100() {
        let now = parse_instant("2026-01-10T12:00:00+08:00").unwrap();
        assert_eq!(check_time("activated_at", now).unwrap(), now);
        assert_eq!(check_time("t", MIN_TIME_MS).unwrap(), MIN_TIME_MS);
        assert!(check_time("t", MAX_TIME_MS).is_err());
        assert!(check_time("t", MIN_TIME_MS - 1).is_err());
        // Milliseconds given as seconds: the message says so.
        let e = check_time("activated_at", now * 1000)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("activated_at") && e.contains("milliseconds"),
            "{e}"
        );
        assert!(e.contains("year 57"), "{e}");
        for ms in [i64::MIN, i64::MAX, -1, 0] {
            assert!(check_time("t", ms).is_err(), "{ms}");
        }
    }

    #[test]
    fn every_instant_reads_as_a_showable_datetime() {
        assert_eq!(to_utc(i64::MAX).timestamp_millis(), SHOWN_MAX_MS);
        assert_eq!(to_utc(i64::MIN).timestamp_millis(), SHOWN_MIN_MS);
        assert_eq!(to_utc(i64::MAX).year(), 9999);
        assert_eq!(to_utc(i64::MIN).year(), 1);
        // A day to spare: shown in any time zone, it stays in years 1..9999.
        assert_eq!(to_cst(i64::MAX).year(), 9999);
        assert_eq!(to_utc(0).timestamp_millis(), 0);
    }

    #[test]
    fn instants_need_an_offset() {
        assert_eq!(
            parse_instant("2025-09-08T11:00:00+08:00").unwrap(),
            parse_instant("2025-09-08T03:00:00Z").unwrap()
        );
        assert!(parse_instant("2025-09-08T11:00:00").is_err());
        assert_eq!(hour_start(HOUR_MS + 5), HOUR_MS);
        assert_eq!(hour_start(-1), -HOUR_MS);
    }
}
