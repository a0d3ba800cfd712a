//! The ledger contract: the same scenarios against every engine (memory, SQLite, and
//! Redis standalone and Cluster when `QUOTAGUARD_TEST_REDIS` / `..._CLUSTER` name a
//! server; CI sets `QUOTAGUARD_REQUIRE_REDIS=1`, and a missing server then fails).
//! They run through [`Guard`], the only door the bindings use, so that the rules,
//! the money computed in Rust and the engine's atomic steps are tested together.
use std::sync::Arc;

use super::*;
use crate::catalog::{Catalog, Site};
use crate::config::{LedgerUrl, SpendRule};
use crate::error::RefusalReason;
use crate::guard::{BudgetHold, Config, FreeOnlyTarget, Guard, Usage};
use crate::ledger::sqlite::{Durability, Sqlite};
use crate::quota::CUTOVER_MS;

const T0: i64 = CUTOVER_MS + 1_000;
const MODEL: &str = "qwen-max";

fn at(ms: i64) -> Now {
    Now::Caller(ms)
}

/// Each engine once, each guard on an account of its own (Redis servers are shared
/// between tests).
struct Engine {
    name: &'static str,
    url: LedgerUrl,
    _dir: Option<tempfile::TempDir>,
}

fn redis_url(var: &str) -> Option<LedgerUrl> {
    match std::env::var(var).ok().filter(|v| !v.is_empty()) {
        Some(u) => Some(LedgerUrl::parse(&u).expect("a Redis URL")),
        None => {
            assert!(
                std::env::var("QUOTAGUARD_REQUIRE_REDIS").ok().as_deref() != Some("1"),
                "${var} is not set, and QUOTAGUARD_REQUIRE_REDIS=1 says a Redis server must be tested"
            );
            eprintln!("ledger contract: ${var} not set, Redis not tested here");
            None
        }
    }
}

fn engines() -> Vec<Engine> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.db");
    let mut out = vec![
        Engine {
            name: "memory",
            url: LedgerUrl::Memory,
            _dir: None,
        },
        Engine {
            name: "sqlite",
            url: LedgerUrl::Sqlite {
                path,
                durability: Durability::Normal,
            },
            _dir: Some(dir),
        },
    ];
    for (name, var) in [
        ("redis", "QUOTAGUARD_TEST_REDIS"),
        ("redis-cluster", "QUOTAGUARD_TEST_REDIS_CLUSTER"),
    ] {
        if let Some(url) = redis_url(var) {
            out.push(Engine {
                name,
                url,
                _dir: None,
            });
        }
    }
    out
}

fn fresh_account() -> String {
    format!("t{:x}", fresh_id())
}

impl Engine {
    fn ledger(&self) -> Box<dyn Ledger> {
        open(&self.url, None).unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    fn guard(&self, account: &str) -> Guard {
        let config = Config {
            account: account.to_string(),
            user: "root".into(),
            workspace: None,
            region: "cn-beijing".into(),
            site: Site::China,
            verified: true,
            lease_ms: 600_000,
        };
        Guard::new(config, self.ledger(), Arc::new(Catalog::bundled())).unwrap()
    }

    /// A guard on a fresh account with `total` free tokens of `MODEL`.
    fn granted(&self, total: u64) -> Guard {
        let g = self.guard(&fresh_account());
        g.grant(MODEL, Some(total), Some(CUTOVER_MS), None, at(T0))
            .unwrap();
        g
    }
}

type Held = (ReservationRow, BudgetHold);

fn reserve(g: &Guard, worst: u64, now: i64) -> Result<Held> {
    g.reserve(
        MODEL,
        worst / 2,
        worst - worst / 2,
        Kind::Realtime,
        false,
        at(now),
    )
}

fn settle(g: &Guard, h: &Held, input: u64, output: u64, now: i64) -> Settled {
    let usage = Usage {
        input_tokens: input,
        output_tokens: output,
        ..Default::default()
    };
    g.settle(&h.0, &h.1, &usage, Some("req"), at(now)).unwrap()
}

fn refusal(r: Result<Held>) -> crate::error::Refusal {
    match r {
        Err(QuotaError::Refused(r)) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn all_records(g: &Guard) -> Vec<UsageRecord> {
    g.records(RecordQuery::default()).unwrap()
}

#[test]
fn reserve_settle_release_round_trip() {
    for e in engines() {
        let g = e.granted(1000);
        let r = reserve(&g, 600, T0).unwrap();
        assert_eq!(g.quota(MODEL, at(T0)).unwrap().reserved, 600, "{}", e.name);
        assert!(
            reserve(&g, 500, T0).is_ok(),
            "{}: switch off, admitted as partly paid",
            e.name
        );
        let out = settle(&g, &r, 100, 50, T0);
        assert_eq!(out.record.free_tokens, 150, "{}", e.name);
        assert!(!out.lease_expired);
        assert_eq!(
            g.release(&r.0, &r.1, false, at(T0)).unwrap(),
            Release::Unknown,
            "{}",
            e.name
        );
        let records = all_records(&g);
        assert_eq!(records.len(), 1, "{}", e.name);
        assert_eq!(records[0], out.record, "{}: the record as stored", e.name);
        let q = g.quota(MODEL, at(T0)).unwrap();
        // 150 used; the second call holds as free what the first had left it (400).
        assert_eq!((q.used, q.reserved), (150, 400), "{}", e.name);
    }
}

#[test]
fn free_only_refuses_and_leases_return() {
    for e in engines() {
        let g = e.granted(1000);
        g.set_free_only(FreeOnlyTarget::Models(vec![MODEL.into()]), true, at(T0))
            .unwrap();
        let r = reserve(&g, 900, T0).unwrap();
        let refused = refusal(reserve(&g, 200, T0));
        assert_eq!(
            (refused.remaining, refused.reason),
            (100, RefusalReason::Exhausted),
            "{}",
            e.name
        );
        // The process that held `r` died: after the lease its tokens return.
        let later = T0 + 600_000;
        assert!(reserve(&g, 200, later).is_ok(), "{}", e.name);
        let late = settle(&g, &r, 10, 10, later + 1);
        assert!(late.lease_expired, "{}", e.name);
        let stats = g.stats(None, None).unwrap();
        assert_eq!(
            stats.iter().map(|h| h.refusals).sum::<u64>(),
            1,
            "{}",
            e.name
        );
        assert_eq!(stats.iter().map(|h| h.calls).sum::<u64>(), 1, "{}", e.name);
    }
}

#[test]
fn a_worst_case_exactly_what_remains_is_admitted() {
    for e in engines() {
        let g = e.granted(1000);
        g.set_free_only(FreeOnlyTarget::Models(vec![MODEL.into()]), true, at(T0))
            .unwrap();
        let a = reserve(&g, 400, T0).unwrap();
        let b = reserve(&g, 600, T0).unwrap();
        assert_eq!(b.0.free_part, 600, "{}", e.name);
        assert_eq!(refusal(reserve(&g, 1, T0)).remaining, 0, "{}", e.name);
        settle(&g, &a, 200, 200, T0);
        settle(&g, &b, 300, 300, T0);
        assert_eq!(g.quota(MODEL, at(T0)).unwrap().used, 1000, "{}", e.name);
    }
}

#[test]
fn a_settle_of_exactly_its_worst_case_leaves_other_holds_alone() {
    // `usage > worst` is an overrun; `usage == worst` is not: such a call draws on its
    // own hold and may not take tokens another call in flight holds.
    for e in engines() {
        let g = e.granted(1000);
        let a = reserve(&g, 600, T0).unwrap();
        let b = reserve(&g, 400, T0).unwrap();
        // Someone else used 300 of the free tokens meanwhile (the console's figure).
        g.sync(MODEL, "700/1,000", false, at(T0)).unwrap();
        let out = settle(&g, &b, 200, 200, T0).record;
        // 700 left, 600 of it held by `a`: `b` may take 100 only.
        assert_eq!(
            (
                out.free_tokens,
                out.billable_input_tokens + out.billable_output_tokens
            ),
            (100, 300),
            "{}",
            e.name
        );
        let over = settle(&g, &a, 400, 201, T0).record;
        // Past its worst case, `a` takes what is left (600), whoever held it.
        assert_eq!(over.free_tokens, 600, "{}", e.name);
    }
}

#[test]
fn a_settle_at_the_lease_expiry_is_late() {
    for e in engines() {
        let g = e.granted(1000);
        let r = reserve(&g, 100, T0).unwrap();
        let out = settle(&g, &r, 10, 10, r.0.expires_ms);
        assert!(
            out.lease_expired,
            "{}: expiry is at the lease's end",
            e.name
        );
        let r = reserve(&g, 100, T0).unwrap();
        let out = settle(&g, &r, 10, 10, r.0.expires_ms - 1);
        assert!(!out.lease_expired, "{}", e.name);
    }
}

#[test]
fn a_swept_reservation_is_still_recorded() {
    for e in engines() {
        let g = e.granted(1000);
        let r = reserve(&g, 100, T0).unwrap();
        // Another guard opens the ledger a day later: the reservation is long gone.
        let day_later = T0 + 2 * DAY_MS;
        let _ = reserve(&g, 10, day_later).unwrap();
        let out = settle(&g, &r, 30, 20, day_later);
        assert!(out.lease_expired, "{}", e.name);
        assert_eq!(out.record.free_tokens, 50, "{}", e.name);
        assert_eq!(
            g.quota(MODEL, at(day_later)).unwrap().used,
            50,
            "{}",
            e.name
        );
    }
}

#[test]
fn alerts_fire_once_and_spend_rules_once_a_day() {
    for e in engines() {
        let g = e.granted(1000);
        let r = reserve(&g, 800, T0).unwrap();
        let out = settle(&g, &r, 400, 400, T0);
        assert_eq!(
            out.alerts
                .iter()
                .map(|a| (a.kind, a.remaining))
                .collect::<Vec<_>>(),
            vec![(AlertKind::QuotaLow, 200)],
            "{}",
            e.name
        );
        let r = reserve(&g, 100, T0).unwrap();
        assert!(
            settle(&g, &r, 50, 50, T0).alerts.is_empty(),
            "{}: once",
            e.name
        );
        // Another guard (another process) on the same account sees it fired.
        let other = match e.url {
            LedgerUrl::Memory => e.granted(0), // private: a stand-in that cannot share
            _ => e.guard(&g.config.account),
        };
        let other = if matches!(e.url, LedgerUrl::Memory) {
            &g
        } else {
            &other
        };
        let r = reserve(other, 100, T0).unwrap();
        let out = settle(other, &r, 50, 50, T0);
        assert_eq!(
            out.alerts.iter().map(|a| a.kind).collect::<Vec<_>>(),
            vec![AlertKind::QuotaDepleted],
            "{}",
            e.name
        );
        g.set_spend_rules(vec![SpendRule {
            model: None,
            limit: -1,
        }]);
        assert_eq!(g.check_spend(at(T0)).unwrap().len(), 1, "{}", e.name);
        assert!(g.check_spend(at(T0 + 1)).unwrap().is_empty(), "{}", e.name);
        assert!(
            other.check_spend(at(T0 + 2)).unwrap().is_empty(),
            "{}",
            e.name
        );
    }
}

#[test]
fn a_console_figure_lowers_and_only_a_forced_one_raises() {
    for e in engines() {
        let g = e.granted(1_000);
        let r = reserve(&g, 100, T0).unwrap();
        settle(&g, &r, 50, 50, T0);
        let q = g.sync(MODEL, "600/1,000", false, at(T0)).unwrap().0;
        assert_eq!((q.used, q.total), (400, 1_000), "{}", e.name);
        let q = g.sync(MODEL, "950/1,000", false, at(T0)).unwrap().0;
        assert_eq!(
            q.used, 400,
            "{}: a lagging figure gives nothing back",
            e.name
        );
        let q = g.sync(MODEL, "1,950/2,000", false, at(T0)).unwrap().0;
        assert_eq!(
            (q.used, q.total),
            (400, 2_000),
            "{}: the total is set",
            e.name
        );
        let q = g.sync(MODEL, "950/1,000", true, at(T0)).unwrap().0;
        assert_eq!((q.used, q.total), (50, 1_000), "{}: forced", e.name);
    }
}

#[test]
fn an_overrun_takes_what_remained() {
    for e in engines() {
        let g = e.granted(1000);
        let a = reserve(&g, 500, T0).unwrap();
        let b = reserve(&g, 200, T0).unwrap();
        let over = settle(&g, &b, 900, 300, T0).record;
        assert_eq!(
            (over.free_tokens, over.billable_output_tokens),
            (1000, 200),
            "{}",
            e.name
        );
        let late = settle(&g, &a, 300, 200, T0).record;
        assert_eq!(late.free_tokens, 0, "{}", e.name);
        assert_eq!(g.quota(MODEL, at(T0)).unwrap().used, 1000, "{}", e.name);
    }
}

#[test]
fn the_switch_counts_reserved_tokens_as_left() {
    for e in engines() {
        let g = e.granted(1000);
        let _held = reserve(&g, 1000, T0).unwrap();
        let m = vec![MODEL.to_string()];
        assert_eq!(
            g.set_free_only(FreeOnlyTarget::Models(m.clone()), true, at(T0))
                .unwrap(),
            m,
            "{}",
            e.name
        );
        assert!(g
            .set_free_only(FreeOnlyTarget::Models(m), false, at(T0))
            .is_err());
    }
}

#[test]
fn money_reaches_the_engine_exact() {
    // Pay-as-you-go past the quota: the cost, the bill and the balance are exact
    // integers, whatever engine sums them.
    for e in engines() {
        let g = e.granted(100);
        g.update_account(AccountOp::SetBalance(500_000_000_000))
            .unwrap();
        let r = g
            .reserve(MODEL, 100_000, 50_000, Kind::Realtime, false, at(T0))
            .unwrap();
        let out = settle(&g, &r, 100_000, 50_000, T0).record;
        // qwen-max: 2.4 CNY per million input, 9.6 per million output (pico-units).
        let want = (100_000 - 100) * 2_400_000 + 50_000 * 9_600_000;
        assert_eq!(out.cost, Some(want), "{}", e.name);
        let bill = g.bill_month("2025-09").unwrap();
        assert_eq!(bill.total, i128::from(want), "{}", e.name);
        let acct = g.account_state().unwrap();
        assert_eq!(acct.balance, Some(500_000_000_000 - want), "{}", e.name);
        assert!(acct.overdue, "{}: the balance went below zero", e.name);
    }
}

#[test]
fn a_thinking_call_cut_off_is_settled_as_it_was_held() {
    // Regression: the worst case of a thinking-mode hold was priced as thinking when
    // held, and as plain output when a broken stream settled it.
    for e in engines() {
        let g = e.granted(0);
        let r = g
            .reserve("qwen-plus", 1_000, 1_000, Kind::Realtime, true, at(T0))
            .unwrap();
        assert!(r.0.thinking);
        let out = g
            .settle_worst_case(&r.0, &r.1, true, at(T0))
            .unwrap()
            .record;
        assert!(out.thinking && out.in_doubt, "{}", e.name);
        // qwen-plus, first tier: 0.8 per million input, 8 per million thinking output.
        assert_eq!(
            out.cost,
            Some(1_000 * 800_000 + 1_000 * 8_000_000),
            "{}",
            e.name
        );
    }
}

#[test]
fn records_compact_and_bills_stay() {
    for e in engines() {
        let g = e.granted(10_000);
        for i in 0..5 {
            let r = reserve(&g, 100, T0 + i * 3_600_000).unwrap();
            settle(&g, &r, 10, 10, T0 + i * 3_600_000);
        }
        let bill_before = g.bill_month("2025-09").unwrap();
        assert_eq!(g.compact(T0 + 2 * 3_600_000).unwrap(), 2, "{}", e.name);
        assert_eq!(all_records(&g).len(), 3, "{}", e.name);
        assert_eq!(g.bill_month("2025-09").unwrap(), bill_before, "{}", e.name);
        assert_eq!(g.stats(Some(MODEL), None).unwrap().len(), 5, "{}", e.name);
    }
}

#[test]
fn the_kill_switch_refuses_every_guard_of_the_ledger() {
    for e in engines() {
        let g = e.granted(1_000);
        let other = match e.url {
            LedgerUrl::Memory => None,
            _ => Some(e.guard(&g.config.account)),
        };
        let held = reserve(&g, 100, T0).unwrap();
        g.block("runaway loop").unwrap();
        assert_eq!(g.blocked().unwrap().as_deref(), Some("runaway loop"));
        for guard in std::iter::once(&g).chain(other.as_ref()) {
            match reserve(guard, 10, T0) {
                Err(QuotaError::Blocked(r)) => assert_eq!(r, "runaway loop", "{}", e.name),
                other => panic!("{}: {other:?}", e.name),
            }
        }
        // A call already sent is still recorded.
        assert_eq!(
            settle(&g, &held, 5, 5, T0).record.free_tokens,
            10,
            "{}",
            e.name
        );
        assert!(g.block("  ").is_err());
        g.unblock().unwrap();
        assert_eq!(g.blocked().unwrap(), None);
        for guard in std::iter::once(&g).chain(other.as_ref()) {
            assert!(reserve(guard, 10, T0).is_ok(), "{}", e.name);
        }
    }
}

#[test]
fn several_thresholds_each_fire_once() {
    for e in engines() {
        let g = e.granted(1_000);
        g.set_thresholds(vec![200_000, 500_000, 50_000]);
        let mut fired = Vec::new();
        for _ in 0..10 {
            let r = reserve(&g, 100, T0).unwrap();
            for a in settle(&g, &r, 50, 50, T0).alerts {
                fired.push((a.kind, a.threshold_ppm, a.remaining));
            }
        }
        assert_eq!(
            fired,
            vec![
                (AlertKind::QuotaLow, Some(500_000), 500),
                (AlertKind::QuotaLow, Some(200_000), 200),
                // 50 is never hit exactly: the call that passes it fires it.
                (AlertKind::QuotaLow, Some(50_000), 0),
                (AlertKind::QuotaDepleted, None, 0),
            ],
            "{}",
            e.name
        );
    }
}

#[test]
fn a_quota_near_its_expiry_alerts_once() {
    for e in engines() {
        let g = e.granted(1_000);
        let expires = CUTOVER_MS + 90 * DAY_MS;
        let early = expires - 8 * DAY_MS;
        assert!(
            g.check_quota_alerts(at(early)).unwrap().is_empty(),
            "{}",
            e.name
        );
        let late = expires - 7 * DAY_MS;
        let alerts = g.check_quota_alerts(at(late)).unwrap();
        assert_eq!(
            alerts
                .iter()
                .map(|a| (a.kind, a.remaining))
                .collect::<Vec<_>>(),
            vec![(AlertKind::QuotaExpiring, 1_000)],
            "{}",
            e.name
        );
        let r = reserve(&g, 100, late).unwrap();
        assert!(
            settle(&g, &r, 10, 10, late).alerts.is_empty(),
            "{}: once",
            e.name
        );
        g.set_expiry_alert_days(None).unwrap();
        assert!(g
            .alert_marks(
                &QuotaRow {
                    total: 1,
                    used: 0,
                    activated_ms: CUTOVER_MS,
                    valid_days: 90,
                    free_only: false,
                    configured: false
                },
                late
            )
            .iter()
            .all(|m| m.kind != AlertKind::QuotaExpiring));
    }
}

#[test]
fn first_free_and_forecast() {
    for e in engines() {
        let g = e.granted(1_000);
        g.grant("qwen-plus", Some(10_000), Some(CUTOVER_MS), None, at(T0))
            .unwrap();
        let models = vec![
            MODEL.to_string(),
            "qwen-plus".to_string(),
            "qwen-turbo".into(),
        ];
        assert_eq!(
            g.first_free(&models, 500, Some(500), at(T0))
                .unwrap()
                .as_deref(),
            Some(MODEL)
        );
        assert_eq!(
            g.first_free(&models, 500, Some(501), at(T0))
                .unwrap()
                .as_deref(),
            Some("qwen-plus")
        );
        assert_eq!(
            g.first_free(&models, 10_000, Some(1), at(T0)).unwrap(),
            None
        );
        // 100 free tokens an hour for 10 hours.
        for h in 0..10 {
            let r = reserve(&g, 100, T0 + h * 3_600_000).unwrap();
            settle(&g, &r, 50, 50, T0 + h * 3_600_000);
        }
        let now = T0 + 10 * 3_600_000;
        let f = g.forecast(MODEL, 10.0, at(now)).unwrap();
        assert_eq!((f.remaining, f.burn_per_hour), (0, 100.0), "{}", e.name);
        let f = g.forecast("qwen-plus", 24.0, at(now)).unwrap();
        assert_eq!((f.burn_per_hour, f.runs_out_ms), (0.0, None), "{}", e.name);
        assert_eq!(f.unused_at_expiry, 10_000, "{}", e.name);
        assert!(g.forecast(MODEL, 0.0, at(now)).is_err());
    }
}

fn redis_engines() -> Vec<Engine> {
    engines()
        .into_iter()
        .filter(|e| matches!(e.url, LedgerUrl::Redis { .. }))
        .collect()
}

#[test]
fn redis_keys_of_an_account_share_one_hash_tag() {
    assert_eq!(redis::tests_support::prefix("team-a"), "qg:{team-a}:");
    let odd = redis::tests_support::prefix("x}{y");
    assert!(
        odd.starts_with("qg:{") && !odd[4..odd.len() - 2].contains(['{', '}']),
        "{odd}"
    );
}

#[test]
fn redis_a_settle_cut_between_its_steps_is_recovered_once() {
    for e in redis_engines() {
        let g = e.granted(1000);
        let r = reserve(&g, 100, T0).unwrap();
        let bare = e.ledger();
        let req = TakeRequest {
            account: g.config.account.clone(),
            model: MODEL.into(),
            kind: Kind::Realtime,
            reservation: Some(r.0.id),
            held_free: r.0.free_part,
            held_worst: r.0.worst,
            record_id: fresh_id(),
            user: "root".into(),
            workspace: None,
            request_id: Some("cut".into()),
            input_tokens: 30,
            output_tokens: 20,
            cached_tokens: 0,
            cache_write_tokens: 0,
            explicit_cache: false,
            thinking: false,
            in_doubt: false,
            free_region: true,
            covered: true,
            now: at(T0),
        };
        // The process dies between the token step and the commit.
        let died = bare.settle(&req, &|_, _| Err(QuotaError::Invalid("killed".into())));
        assert!(died.is_err(), "{}", e.name);
        assert_eq!(
            g.quota(MODEL, at(T0)).unwrap().used,
            50,
            "{}: tokens taken",
            e.name
        );
        assert!(all_records(&g).is_empty(), "{}: not yet recorded", e.name);
        let recovered = g.recover().unwrap();
        assert_eq!(recovered.len(), 1, "{}", e.name);
        assert_eq!(recovered[0].record.free_tokens, 50, "{}", e.name);
        assert!(g.recover().unwrap().is_empty(), "{}: exactly once", e.name);
        // A replay of the same settle (a spilled one) is recognised too.
        let again = bare.settle(&req, &|r, t| g.finish(r, t)).unwrap();
        assert_eq!(again.record.id, req.record_id, "{}", e.name);
        assert_eq!(all_records(&g).len(), 1, "{}", e.name);
        assert_eq!(g.quota(MODEL, at(T0)).unwrap().used, 50, "{}", e.name);
    }
}

#[test]
fn sqlite_rejects_newer_schema_and_non_databases() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l.db");
    drop(Sqlite::open(&p, Durability::Normal).unwrap());
    let c = rusqlite::Connection::open(&p).unwrap();
    c.execute("INSERT INTO schema_version (version) VALUES (99)", [])
        .unwrap();
    drop(c);
    let e = Sqlite::open(&p, Durability::Normal)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("schema version 99"), "{e}");

    let junk = dir.path().join("junk.db");
    let bytes =
        b"this is not a database, just some text that is long enough to matter........".repeat(20);
    std::fs::write(&junk, &bytes).unwrap();
    let e = Sqlite::open(&junk, Durability::Normal)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("junk.db") && e.contains("not a SQLite database"),
        "{e}"
    );
    assert_eq!(std::fs::read(&junk).unwrap(), bytes);

    let e = Sqlite::open(&dir.path().join("missing/x.db"), Durability::Normal)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("does not exist"), "{e}");
}

#[cfg(unix)]
#[test]
fn sqlite_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l.db");
    drop(Sqlite::open(&p, Durability::Normal).unwrap());
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn the_hold_decision_on_plain_numbers() {
    let q = QuotaRow {
        total: 1000,
        used: 400,
        activated_ms: CUTOVER_MS,
        valid_days: 90,
        free_only: false,
        configured: false,
    };
    let s = Snapshot {
        quota: Some(q),
        held: 100,
        overdue: false,
        blocked: false,
    };
    let req = |worst, may_pay| HoldRequest {
        account: "a",
        model: "m",
        kind: Kind::Realtime,
        thinking: false,
        input_tokens: 0,
        worst,
        free_region: true,
        covered: true,
        may_pay,
        now: at(T0),
        lease_ms: 1,
    };
    assert_eq!(decide_hold(&s, &req(500, false), T0), Some(500));
    assert_eq!(decide_hold(&s, &req(501, false), T0), None);
    assert_eq!(decide_hold(&s, &req(501, true), T0), Some(500));
    let fo = Snapshot {
        quota: Some(QuotaRow {
            free_only: true,
            ..q
        }),
        ..s
    };
    assert_eq!(decide_hold(&fo, &req(501, true), T0), None);
    let late = q.expires_ms();
    assert_eq!(decide_hold(&s, &req(1, false), late), None, "expired");
    assert_eq!(
        decide_hold(&Snapshot { overdue: true, ..s }, &req(1, true), T0),
        None
    );
    assert_eq!(
        decide_hold(&Snapshot { blocked: true, ..s }, &req(1, true), T0),
        None
    );
}

fn problems(g: &Guard, now: i64) -> Vec<String> {
    g.check(at(now))
        .unwrap()
        .into_iter()
        .filter(|f| f.problem)
        .map(|f| f.text)
        .collect()
}

#[test]
fn a_busy_ledger_checks_clean_on_every_engine() {
    for e in engines() {
        let g = e.granted(10_000);
        g.grant("qwen-plus", Some(5_000), Some(CUTOVER_MS), None, at(T0))
            .unwrap();
        for i in 0..6 {
            let now = T0 + i * 3_600_000;
            let r = reserve(&g, 300, now).unwrap();
            settle(&g, &r, 100 + i as u64, 50, now);
        }
        // An overrun, a release, a hold still in flight, one past its lease.
        let r = reserve(&g, 100, T0).unwrap();
        settle(&g, &r, 200, 200, T0 + 1);
        let r = reserve(&g, 100, T0).unwrap();
        g.release(&r.0, &r.1, true, at(T0)).unwrap();
        let _live = reserve(&g, 50, T0 + 7 * 3_600_000).unwrap();
        let _dead = reserve(&g, 70, T0).unwrap();
        // Reconciliation in every form, then a compaction.
        g.sync(MODEL, "8,000/10,000", false, at(T0)).unwrap();
        g.sync(MODEL, "9,500/10,000", true, at(T0)).unwrap();
        g.mark_depleted("qwen-plus", at(T0)).unwrap();
        g.sync("qwen-turbo", "10/100", false, at(T0)).unwrap();
        g.compact(T0 + 2 * 3_600_000).unwrap();
        let now = T0 + 7 * 3_600_000 + 1;
        assert_eq!(problems(&g, now), Vec::<String>::new(), "{}", e.name);
        let all = g.check(at(now)).unwrap();
        let text: Vec<&str> = all.iter().map(|f| f.text.as_str()).collect();
        assert!(
            text.iter()
                .any(|t| t.contains("1 reservation within its lease")
                    && t.contains("; 1 past the lease")),
            "{}: {text:?}",
            e.name
        );
    }
}

#[test]
fn a_ledger_changed_behind_quotaguards_back_fails_its_check() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l.db");
    let url = LedgerUrl::Sqlite {
        path: p.clone(),
        durability: Durability::Normal,
    };
    let g = Engine {
        name: "sqlite",
        url,
        _dir: None,
    }
    .granted(10_000);
    for i in 0..3 {
        let r = reserve(&g, 100, T0 + i).unwrap();
        settle(&g, &r, 10, 10, T0 + i);
    }
    assert!(problems(&g, T0 + 10).is_empty());
    let c = rusqlite::Connection::open(&p).unwrap();
    c.execute("UPDATE quotas SET used = used - 15", []).unwrap();
    let found = problems(&g, T0 + 10);
    assert!(
        found.len() == 1 && found[0].contains("15 tokens missing") && found[0].contains("sync"),
        "{found:?}"
    );
    c.execute("UPDATE quotas SET used = used + 15", []).unwrap();
    c.execute(
        "DELETE FROM records WHERE time_ms = (SELECT min(time_ms) FROM records)",
        [],
    )
    .unwrap();
    let found = problems(&g, T0 + 10);
    assert!(
        found.iter().any(|f| f.contains("a record was lost")),
        "{found:?}"
    );
    drop(c);
}

#[test]
fn another_applications_database_is_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("app.db");
    {
        let c = rusqlite::Connection::open(&p).unwrap();
        c.execute_batch(
            "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT);
             CREATE TABLE orders (id INTEGER PRIMARY KEY, user INTEGER, total REAL);
             INSERT INTO users (name) VALUES ('ann');",
        )
        .unwrap();
    }
    let marked = dir.path().join("marked.db");
    {
        let c = rusqlite::Connection::open(&marked).unwrap();
        c.execute_batch("PRAGMA application_id = 1234; CREATE TABLE t (x);")
            .unwrap();
    }
    for (path, why) in [(&p, "\"orders\", \"users\""), (&marked, "0x000004d2")] {
        let before = std::fs::read(path).unwrap();
        let listing = |d: &std::path::Path| {
            let mut v: Vec<_> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            v.sort();
            v
        };
        let files_before = listing(dir.path());
        let e = Sqlite::open(path, Durability::Normal)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&path.display().to_string())
                && e.contains("not a quotaguard ledger")
                && e.contains(why)
                && e.contains("left untouched"),
            "{e}"
        );
        assert!(
            !e.contains("CREATE") && !e.contains('\n') && e.len() < 300,
            "{e}"
        );
        assert_eq!(std::fs::read(path).unwrap(), before);
        assert_eq!(listing(dir.path()), files_before);
    }
}

#[test]
fn an_empty_database_or_file_becomes_a_marked_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let empty_file = dir.path().join("empty.db");
    std::fs::write(&empty_file, b"").unwrap();
    let empty_db = dir.path().join("emptydb.db");
    rusqlite::Connection::open(&empty_db)
        .unwrap()
        .execute_batch("PRAGMA user_version = 0; VACUUM;")
        .unwrap();
    for p in [&empty_file, &empty_db, &dir.path().join("new.db")] {
        drop(Sqlite::open(p, Durability::Normal).unwrap());
        let head = std::fs::read(p).unwrap();
        assert_eq!(
            u32::from_be_bytes([head[68], head[69], head[70], head[71]]),
            sqlite::APPLICATION_ID,
            "{}",
            p.display()
        );
        // Opened again: recognised by its mark.
        drop(Sqlite::open(p, Durability::Normal).unwrap());
    }
}

#[test]
fn a_ledger_of_an_older_schema_is_upgraded_and_marked() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("old.db");
    {
        // A version 2 ledger as the last release wrote it: no mark, no reconciliation count.
        let c = rusqlite::Connection::open(&p).unwrap();
        c.execute_batch("PRAGMA journal_mode=WAL;").unwrap();
        c.execute_batch("CREATE TABLE schema_version (version INTEGER NOT NULL);")
            .unwrap();
        for (i, sql) in sqlite_migrations().iter().take(2).enumerate() {
            c.execute_batch(sql).unwrap();
            c.execute("INSERT INTO schema_version VALUES (?1)", [i as i64 + 1])
                .unwrap();
        }
        c.execute_batch(
            "INSERT INTO quotas VALUES ('a', 'qwen-max', 1000, 300, 1757300400000, 90, 0, 0);",
        )
        .unwrap();
    }
    let ledger = Sqlite::open(&p, Durability::Normal).unwrap();
    let g = Guard::new(
        Config {
            account: "a".into(),
            user: "root".into(),
            workspace: None,
            region: "cn-beijing".into(),
            site: Site::China,
            verified: true,
            lease_ms: 600_000,
        },
        Box::new(Local(ledger)),
        Arc::new(Catalog::bundled()),
    )
    .unwrap();
    assert_eq!(g.quota(MODEL, at(T0)).unwrap().used, 300);
    // What the old ledger used is taken as reconciled: its check holds.
    assert!(problems(&g, T0).is_empty(), "{:?}", problems(&g, T0));
    let r = reserve(&g, 100, T0).unwrap();
    settle(&g, &r, 10, 10, T0);
    assert!(problems(&g, T0).is_empty());
    drop(g);
    let head = std::fs::read(&p).unwrap();
    assert_eq!(
        u32::from_be_bytes([head[68], head[69], head[70], head[71]]),
        sqlite::APPLICATION_ID
    );
}

fn sqlite_migrations() -> &'static [&'static str] {
    sqlite::MIGRATIONS
}

#[test]
fn a_wait_for_a_locked_ledger_can_be_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l.db");
    let ledger = Local(Sqlite::open(&p, Durability::Normal).unwrap());
    let holder = rusqlite::Connection::open(&p).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let asked = std::rc::Rc::new(std::cell::Cell::new(0));
    let seen = asked.clone();
    let started = std::time::Instant::now();
    let out = crate::interrupt::with_check(
        move || {
            seen.set(seen.get() + 1);
            seen.get() >= 3
        },
        || {
            ledger.grant(&GrantArgs {
                account: "a",
                model: MODEL,
                total: 10,
                activated_ms: T0,
                valid_days: 90,
            })
        },
    );
    assert!(
        matches!(out, Err(QuotaError::Interrupted(ref m)) if m.contains("nothing was recorded")),
        "{out:?}"
    );
    assert_eq!(asked.get(), 3);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    holder.execute_batch("COMMIT").unwrap();
    assert_eq!(ledger.quota("a", MODEL, at(T0)).unwrap(), None);
}

#[cfg(unix)]
#[test]
fn loose_files_of_a_ledger_are_tightened() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l.db");
    drop(Sqlite::open(&p, Durability::Normal).unwrap());
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
    let l = Local(Sqlite::open(&p, Durability::Normal).unwrap());
    l.grant(&GrantArgs {
        account: "a",
        model: MODEL,
        total: 10,
        activated_ms: T0,
        valid_days: 90,
    })
    .unwrap();
    assert!(l.warnings().is_empty(), "{:?}", l.warnings());
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let entry = entry.unwrap();
        assert_eq!(
            entry.metadata().unwrap().permissions().mode() & 0o777,
            0o600,
            "{:?}",
            entry.file_name()
        );
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let l = Local(Sqlite::open(&p, Durability::Normal).unwrap());
    let w = l.warnings();
    assert!(w.len() == 1 && w[0].contains("every user"), "{w:?}");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
}

#[test]
fn a_check_reads_one_consistent_state_while_others_write() {
    for e in engines() {
        let g = Arc::new(e.granted(100_000_000));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let (g, stop) = (Arc::clone(&g), Arc::clone(&stop));
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let r = reserve(&g, 20, T0).unwrap();
                        settle(&g, &r, 7, 6, T0);
                    }
                })
            })
            .collect();
        for _ in 0..15 {
            assert_eq!(problems(&g, T0), Vec::<String>::new(), "{}", e.name);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        assert!(problems(&g, T0).is_empty(), "{}", e.name);
    }
}

#[test]
fn usage_without_a_reservation_is_recorded_beside_the_holds() {
    for e in engines() {
        let g = e.granted(1_000);
        let held = reserve(&g, 500, T0).unwrap();
        let usage = Usage {
            input_tokens: 600,
            output_tokens: 40,
            ..Default::default()
        };
        let out = g
            .record_usage(MODEL, Kind::Realtime, &usage, Some("app"), at(T0))
            .unwrap()
            .record;
        // Free tokens up to what the others' holds leave; the rest is billed.
        assert_eq!(
            (
                out.free_tokens,
                out.billable_input_tokens,
                out.billable_output_tokens
            ),
            (500, 100, 40),
            "{}",
            e.name
        );
        assert_eq!(g.remaining(MODEL, at(T0)).unwrap(), 0, "{}", e.name);
        settle(&g, &held, 10, 10, T0);
        assert_eq!(g.remaining(MODEL, at(T0)).unwrap(), 480, "{}", e.name);
    }
}

#[test]
fn uncounted_calls_are_refused_where_chargeable_calls_are() {
    for e in engines() {
        let g = e.granted(1_000);
        let unbounded = RefusalReason::Unbounded;
        g.check_uncounted(Some(MODEL), unbounded, "enable_search", at(T0))
            .unwrap();
        g.check_uncounted(None, RefusalReason::Unguarded, "POST /x", at(T0))
            .unwrap();
        g.set_free_only(FreeOnlyTarget::Models(vec![MODEL.into()]), true, at(T0))
            .unwrap();
        let r = refused(g.check_uncounted(Some(MODEL), unbounded, "enable_search", at(T0)));
        assert_eq!((r.reason, r.remaining), (unbounded, 1_000), "{}", e.name);
        assert!(r.to_string().contains("enable_search"), "{r}");
        assert!(r.to_string().contains("max_input_tokens="), "{r}");
        // A call naming no model is refused while any model has the switch on.
        let r = refused(g.check_uncounted(None, RefusalReason::Unguarded, "POST /x", at(T0)));
        assert_eq!(r.reason, RefusalReason::Unguarded, "{}", e.name);
        assert!(r.to_string().contains("POST /x"), "{r}");
        // Another model, without the switch, goes ahead.
        g.check_uncounted(Some("qwen-plus"), unbounded, "fileid://", at(T0))
            .unwrap();
        g.update_account(AccountOp::MarkOverdue).unwrap();
        let r = refused(g.check_uncounted(Some("qwen-plus"), unbounded, "fileid://", at(T0)));
        assert_eq!(r.reason, RefusalReason::Overdue, "{}", e.name);
    }
}

fn refused(r: Result<()>) -> crate::error::Refusal {
    match r {
        Err(QuotaError::Refused(r)) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn cache_writes_and_hits_are_priced_and_free_quota_covers_the_cheapest_first() {
    for e in engines() {
        // qwen-max: 2.4 per million input, flat.
        for (free, cost) in [
            // 100 plain at 2.4, 400 written at 125 %, 500 explicit hits at 10 %.
            (0, 100 * 2_400_000 + 400 * 3_000_000 + 500 * 240_000),
            // 600 free tokens cover the 500 hits, then 100 plain: the writes are billed.
            (600, 400 * 3_000_000),
        ] {
            let g = e.granted(free);
            let h = g
                .reserve(MODEL, 1_000, 0, Kind::Realtime, false, at(T0))
                .unwrap();
            let usage = Usage {
                input_tokens: 1_000,
                cached_tokens: 500,
                cache_write_tokens: 400,
                explicit_cache: true,
                ..Default::default()
            };
            let out = g.settle(&h.0, &h.1, &usage, None, at(T0)).unwrap().record;
            assert_eq!(out.cost, Some(cost), "{} with {free} free", e.name);
        }
    }
}
