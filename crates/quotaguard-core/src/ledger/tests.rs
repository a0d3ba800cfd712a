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
