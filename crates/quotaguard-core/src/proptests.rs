//! Property tests over every parser and the atomic decisions, with random and hostile
//! values: nothing panics, a refusal names the value in one printable line, a password
//! never shows, and what is accepted round-trips. `PROPTEST_CASES` sets how many cases
//! each property runs (256 by default).
use proptest::prelude::*;

use crate::catalog::{check_region, Catalog, Site};
use crate::clock::{check_time, parse_day, parse_instant, parse_month, to_utc, MAX_TIME_MS};
use crate::config::{check_name, lease_ms, redact_text, redacted, threshold_ppm, LedgerUrl};
use crate::error::thousands;
use crate::guard::{check_tokens, MAX_TOKENS};
use crate::ledger::{decide_hold, decide_take, free_left, HoldRequest, Now, Snapshot, TakeRequest};
use crate::money::{parse_amount, to_decimal};
use crate::quota::{format_console_figure, parse_console_figure, QuotaRow};
use crate::rules::Kind;
use crate::tokens::{chat_bound, text_bound, ChatMessage};

/// Text that hostile callers write: any char (controls, NUL, RTL marks, emoji), near
/// misses of what the parsers expect, and very long runs.
fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ -~]{0,40}",
        "[0-9,/ _.+-]{0,30}",
        "(redis|rediss|Redis|REDIS\\+cluster|sqlite|memory|file|postgres)://[ -~]{0,30}",
        "[\\x00-\\x1f\\x7f]{1,5}",
        "x{1000,3000}",
    ]
}

fn one_printable_line(text: &str) -> bool {
    !text.chars().any(char::is_control)
}

proptest! {
    #[test]
    fn ledger_urls_never_panic_and_refuse_in_one_line(text in hostile_text()) {
        if let Err(e) = LedgerUrl::parse(&text) {
            let m = e.to_string();
            prop_assert!(one_printable_line(&m), "{:?}", m);
        }
    }

    #[test]
    fn a_password_never_shows(
        scheme in "[a-zA-Z][a-zA-Z0-9+.-]{0,10}",
        user in "[a-z]{0,6}",
        pw in "[A-Za-z0-9]{6,20}",
        host in "[a-z0-9.]{1,12}(:[0-9]{1,5})?",
        tail in "(/[a-z0-9]{0,6})?",
    ) {
        let url = format!("{scheme}://{user}:{pw}@{host}{tail}");
        let secret = format!(":{pw}@");
        let shown = redacted(&url);
        prop_assert!(!shown.contains(&secret), "{}", shown);
        prop_assert_eq!(redacted(&shown), shown.clone());
        let msg = format!("cannot reach {url}: refused");
        prop_assert!(!redact_text(&msg).contains(&secret));
        if let Err(e) = LedgerUrl::parse(&url) {
            prop_assert!(!e.to_string().contains(&secret), "{}", e);
        }
    }

    #[test]
    fn redaction_never_panics(text in hostile_text()) {
        let _ = redacted(&text);
        let _ = redact_text(&text);
    }

    #[test]
    fn console_figures_round_trip(total in 0..=MAX_TOKENS, frac in 0.0f64..=1.0) {
        let remaining = ((total as f64) * frac) as u64;
        let text = format_console_figure(remaining, total);
        prop_assert_eq!(parse_console_figure(&text).unwrap(), (remaining, total));
    }

    #[test]
    fn console_figures_never_panic_and_stay_in_range(text in hostile_text()) {
        match parse_console_figure(&text) {
            Ok((r, t)) => prop_assert!(r <= t && t <= MAX_TOKENS),
            Err(e) => {
                let m = e.to_string();
                let quoted = format!("{text:?}");
                prop_assert!(m.contains(&quoted), "{}", m);
            }
        }
    }

    #[test]
    fn amounts_are_exact_or_refused(text in prop_oneof![
        hostile_text(),
        "-?[0-9]{1,20}(\\.[0-9]{0,15})?",
    ]) {
        match parse_amount(&text, "amount") {
            Ok(pico) => {
                let d: rust_decimal::Decimal = text.trim().parse().unwrap();
                prop_assert_eq!(to_decimal(pico), d.normalize());
            }
            Err(e) => prop_assert!(e.to_string().starts_with("amount "), "{}", e),
        }
    }

    #[test]
    fn times_never_panic(text in hostile_text(), ms in any::<i64>()) {
        let _ = parse_instant(&text);
        let _ = parse_month(&text);
        let _ = parse_day(&text);
        let _ = to_utc(ms);
        match check_time("t", ms) {
            Ok(v) => prop_assert!(v < MAX_TIME_MS),
            Err(e) => prop_assert!(one_printable_line(&e.to_string())),
        }
    }

    #[test]
    fn counts_and_settings_are_checked(n in any::<i128>(), f in any::<f64>()) {
        match check_tokens("input_tokens", n) {
            Ok(v) => prop_assert!(u128::from(v) <= u128::from(MAX_TOKENS) && i128::from(v) == n),
            Err(e) => prop_assert!(e.to_string().contains(&n.to_string())),
        }
        if let Ok(ms) = lease_ms(f) {
            prop_assert!(ms >= 1);
        }
        if let Ok(ppm) = threshold_ppm(f) {
            prop_assert!(ppm <= 1_000_000);
        }
    }

    #[test]
    fn names_kinds_regions_and_sites_never_panic(text in hostile_text()) {
        if check_name("account", &text).is_ok() {
            prop_assert!(one_printable_line(&text) && !text.trim().is_empty());
        }
        let _ = Kind::parse(&text);
        let _ = Site::parse(&text);
        let _ = check_region(&text);
    }

    #[test]
    fn a_catalogue_of_any_text_never_panics(text in hostile_text()) {
        let _ = Catalog::from_sources(&[("hostile.toml", &text)]);
    }

    #[test]
    fn thousands_groups_like_the_console(n in any::<u64>()) {
        let t = thousands(n);
        prop_assert_eq!(t.replace(',', "").parse::<u64>().unwrap(), n);
        prop_assert!(t.split(',').skip(1).all(|g| g.len() == 3));
    }

    #[test]
    fn byte_bounds_never_panic_and_cover_the_bytes(text in any::<String>(), role in any::<String>()) {
        let b = text_bound(None, &text);
        prop_assert!(b >= text.len() as u64 / 4);
        let m = [ChatMessage { role: &role, content: &text }];
        prop_assert!(chat_bound(None, &m) >= b);
    }

    #[test]
    fn a_hold_never_takes_more_than_is_free(
        total in 0u64..10_000,
        used in 0u64..12_000,
        held in 0u64..10_000,
        worst in 0u64..12_000,
        may_pay in any::<bool>(),
        covered in any::<bool>(),
        free_only in any::<bool>(),
        overdue in any::<bool>(),
        blocked in any::<bool>(),
        at in 0i64..200,
    ) {
        let q = QuotaRow {
            total, used, activated_ms: 0, valid_days: 0, free_only, configured: false,
        };
        // valid_days 0 with activation 0: expired at 0; a real validity otherwise.
        let q = QuotaRow { valid_days: if at < 100 { 30 } else { 0 }, ..q };
        let s = Snapshot { quota: Some(q), held, overdue, blocked };
        let r = HoldRequest {
            account: "a", model: "m", kind: Kind::Realtime, thinking: false,
            input_tokens: 0, worst, free_region: true, covered, may_pay,
            now: Now::Caller(at), lease_ms: 1,
        };
        let avail = free_left(&s, true, at);
        prop_assert!(avail <= total.saturating_sub(used));
        match decide_hold(&s, &r, at) {
            Some(part) => {
                prop_assert!(part <= avail && part <= worst);
                prop_assert!(!overdue && !blocked);
                // Under Free Quota Only (or unverified) a call is held whole or not at all.
                if !may_pay || free_only {
                    prop_assert!(covered && part == worst);
                }
            }
            None => prop_assert!(
                overdue || blocked || worst > avail || !covered || !may_pay || free_only
            ),
        }
        // A settle takes at most what is free and at most what the call used.
        let t = TakeRequest {
            account: "a".into(), model: "m".into(), kind: Kind::Realtime, reservation: None,
            held_free: 0, held_worst: worst, record_id: 1, user: "u".into(), workspace: None,
            request_id: None, input_tokens: worst / 2, output_tokens: worst - worst / 2,
            cached_tokens: 0, cache_write_tokens: 0, explicit_cache: false, thinking: false,
            in_doubt: false, free_region: true, covered,
            now: Now::Caller(at),
        };
        for overrun in [false, true] {
            let took = decide_take(Some(&q), held, overrun, &t, at);
            prop_assert!(took <= worst && took <= total.saturating_sub(used));
            if !overrun {
                prop_assert!(took <= avail);
            }
        }
    }
}
