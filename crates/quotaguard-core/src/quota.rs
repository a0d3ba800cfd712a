//! A model's free quota: grants and validity (R3), the console figure (R12).
use crate::clock::DAY_MS;
use crate::error::{invalid, thousands, Result};
use crate::guard::MAX_TOKENS;

/// 2025-09-08 11:00 CST (03:00 UTC): quota activated from then on is valid 90 days.
pub const CUTOVER_MS: i64 = 1_757_300_400_000;
pub const CUTOVER_DAYS: u32 = 90;

/// A model's free quota as the ledger stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QuotaRow {
    pub total: u64,
    /// Free tokens consumed by settled calls (and reconciliation).
    pub used: u64,
    pub activated_ms: i64,
    pub valid_days: u32,
    /// The Free Quota Only switch (R5).
    pub free_only: bool,
    /// Whether the switch was ever set by the user ("enable for all" skips these).
    pub configured: bool,
}

impl QuotaRow {
    pub fn expires_ms(&self) -> i64 {
        // Saturating: a row written by mistake far in the future still reads.
        self.activated_ms
            .saturating_add(i64::from(self.valid_days).saturating_mul(DAY_MS))
    }

    pub fn expired(&self, now_ms: i64) -> bool {
        now_ms >= self.expires_ms()
    }

    pub fn left(&self) -> u64 {
        self.total.saturating_sub(self.used)
    }
}

/// R3: the validity in days of a quota activated at `activated_ms`.
pub fn validity_days(activated_ms: i64, catalog_days: u32, stated: Option<i64>) -> Result<u32> {
    if let Some(n) = stated {
        if !(30..=90).contains(&n) {
            return Err(invalid(format!("valid_days {n} is outside 30..90")));
        }
        return Ok(n as u32);
    }
    Ok(if activated_ms >= CUTOVER_MS {
        CUTOVER_DAYS
    } else {
        catalog_days
    })
}

/// Parses the console's `"362,917/1,000,000"` into `(remaining, total)`.
pub fn parse_console_figure(text: &str) -> Result<(u64, u64)> {
    let bad = |why: &str| {
        invalid(format!(
            "console figure {text:?} {why} (expected e.g. \"362,917/1,000,000\")"
        ))
    };
    let (rem, tot) = text.split_once('/').ok_or_else(|| bad("has no '/'"))?;
    let number = |part: &str| -> Result<u64> {
        let p = part.trim();
        if p.is_empty() {
            return Err(bad("has an empty number"));
        }
        if p.starts_with('-') {
            return Err(bad("is negative"));
        }
        let groups: Vec<&str> = p.split(',').collect();
        let grouped_ok = groups.len() == 1
            || (!groups[0].is_empty()
                && groups[0].len() <= 3
                && groups[1..].iter().all(|g| g.len() == 3));
        if !grouped_ok || !p.chars().all(|c| c.is_ascii_digit() || c == ',') {
            return Err(bad("is not two whole numbers"));
        }
        let n = p.replace(',', "");
        // Digits only by now: a number that does not fit is merely large.
        match n.parse::<u64>() {
            Ok(v) if v <= MAX_TOKENS => Ok(v),
            _ => Err(bad(&format!(
                "is too large (at most {} tokens)",
                thousands(MAX_TOKENS)
            ))),
        }
    };
    let (remaining, total) = (number(rem)?, number(tot)?);
    if remaining > total {
        return Err(bad("has remaining above total"));
    }
    Ok((remaining, total))
}

pub fn format_console_figure(remaining: u64, total: u64) -> String {
    format!("{}/{}", thousands(remaining), thousands(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::parse_instant;

    #[test]
    fn cutover_instant_is_11_cst() {
        assert_eq!(
            parse_instant("2025-09-08T11:00:00+08:00").unwrap(),
            CUTOVER_MS
        );
    }

    #[test]
    fn validity_follows_the_cutover() {
        assert_eq!(validity_days(CUTOVER_MS, 30, None).unwrap(), 90);
        assert_eq!(validity_days(CUTOVER_MS - 1, 30, None).unwrap(), 30);
        assert_eq!(validity_days(CUTOVER_MS - 1, 60, Some(45)).unwrap(), 45);
        assert_eq!(validity_days(CUTOVER_MS, 60, Some(30)).unwrap(), 30);
        for bad in [29, 91, -1] {
            assert!(validity_days(0, 90, Some(bad))
                .unwrap_err()
                .to_string()
                .contains(&bad.to_string()));
        }
    }

    #[test]
    fn expiry_is_exclusive() {
        let q = QuotaRow {
            total: 10,
            used: 0,
            activated_ms: 0,
            valid_days: 30,
            free_only: false,
            configured: false,
        };
        assert!(!q.expired(30 * DAY_MS - 1));
        assert!(q.expired(30 * DAY_MS));
    }

    #[test]
    fn console_figure_round_trips() {
        assert_eq!(
            parse_console_figure("362,917/1,000,000").unwrap(),
            (362_917, 1_000_000)
        );
        assert_eq!(parse_console_figure(" 0 / 100000 ").unwrap(), (0, 100_000));
        assert_eq!(
            format_console_figure(362_917, 1_000_000),
            "362,917/1,000,000"
        );
        // Nothing used yet: remaining equal to total, both ways.
        assert_eq!(
            format_console_figure(1_000_000, 1_000_000),
            "1,000,000/1,000,000"
        );
        assert_eq!(
            parse_console_figure("1,000,000/1,000,000").unwrap(),
            (1_000_000, 1_000_000)
        );
        assert_eq!(format_console_figure(0, 0), "0/0");
        assert_eq!(format_console_figure(999, 1_000), "999/1,000");
    }

    #[test]
    fn console_figures_stop_at_the_stated_maximum() {
        let max = thousands(MAX_TOKENS);
        assert_eq!(
            parse_console_figure(&format!("{max}/{max}")).unwrap(),
            (MAX_TOKENS, MAX_TOKENS)
        );
        for bad in [
            "1/1,000,000,001".to_string(),
            "0/9,223,372,036,854,775,808".into(),
            "18,446,744,073,709,551,615/18,446,744,073,709,551,615".into(),
            "1/99999999999999999999999999".into(),
        ] {
            let e = parse_console_figure(&bad).unwrap_err().to_string();
            assert!(e.contains("too large") && e.contains(&bad), "{bad}: {e}");
        }
    }

    #[test]
    fn a_quota_far_in_the_future_still_reads() {
        let q = QuotaRow {
            total: 10,
            used: 0,
            activated_ms: i64::MAX - 5,
            valid_days: 90,
            free_only: false,
            configured: false,
        };
        assert_eq!(q.expires_ms(), i64::MAX);
        assert!(!q.expired(0));
    }

    #[test]
    fn malformed_console_figures_name_themselves() {
        for bad in [
            "362917",
            "abc/1,000",
            "2,000/1,000",
            "-5/1,000",
            "",
            "/1000",
            "1,00/1000",
            "12,3456/1",
            "1/2/3",
        ] {
            let e = parse_console_figure(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }
}
