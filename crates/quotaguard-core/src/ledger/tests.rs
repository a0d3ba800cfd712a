//! The same scenarios against every local backend.
use super::*;
use crate::ledger::memory::Memory;
use crate::ledger::sqlite::{Sqlite, Sync};
use crate::quota::CUTOVER_MS;

const ON: Policy = Policy {
    region_has_free: true,
    verified: true,
};
const T0: i64 = CUTOVER_MS + 1_000;

fn backends() -> Vec<(Box<dyn Ledger>, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let sq = Sqlite::open(&dir.path().join("l.db"), Sync::Normal).unwrap();
    vec![
        (Box::new(Local(Memory::new())), None),
        (Box::new(Local(sq)), Some(dir)),
    ]
}

fn grant(l: &dyn Ledger, total: u64) {
    l.grant(&GrantArgs {
        account: "a",
        model: "m",
        total,
        activated_ms: CUTOVER_MS,
        valid_days: 90,
    })
    .unwrap();
}

fn reserve(l: &dyn Ledger, worst: u64, now: i64) -> std::result::Result<ReservationRow, Refusal> {
    l.reserve(&ReserveArgs {
        account: "a",
        model: "m",
        kind: Kind::Realtime,
        input_tokens: worst / 2,
        worst,
        policy: ON,
        now_ms: now,
        lease_ms: 600_000,
    })
    .unwrap()
}

fn settle(l: &dyn Ledger, id: i64, input: u64, output: u64, now: i64) -> Result<SettleOutcome> {
    l.settle(&SettleArgs {
        account: "a",
        model: "m",
        kind: Kind::Realtime,
        reservation: Some(id),
        user: "root",
        workspace: None,
        request_id: Some("req"),
        input_tokens: input,
        output_tokens: output,
        cached_tokens: 0,
        thinking: false,
        policy: ON,
        prices: None,
        currency: Currency::Cny,
        now_ms: now,
        threshold_ppm: Some(200_000),
        spend_rules: &[],
    })
}

#[test]
fn reserve_settle_release_round_trip() {
    for (l, _d) in backends() {
        let l = l.as_ref();
        grant(l, 1000);
        let r = reserve(l, 600, T0).unwrap();
        assert_eq!(l.quota("a", "m", T0).unwrap().unwrap().1, 600);
        assert!(
            reserve(l, 500, T0).is_ok(),
            "switch off: admitted as partly paid"
        );
        let out = settle(l, r.id, 100, 50, T0).unwrap();
        assert_eq!(out.record.free_tokens, 150);
        assert!(!out.lease_expired);
        assert!(
            matches!(settle(l, r.id, 1, 1, T0), Err(QuotaError::Rejected(_))),
            "settled twice"
        );
        assert_eq!(
            l.release("a", "m", r.id, false, T0).unwrap(),
            Release::Unknown
        );
        assert_eq!(
            l.records(&RecordQuery {
                account: "a".into(),
                ..Default::default()
            })
            .unwrap()
            .len(),
            1
        );
    }
}

#[test]
fn free_only_refuses_and_leases_return() {
    for (l, _d) in backends() {
        let l = l.as_ref();
        grant(l, 1000);
        l.set_free_only(
            "a",
            FreeOnlyTarget::Models(&["m".to_string()]),
            true,
            ON,
            T0,
        )
        .unwrap();
        let r = reserve(l, 900, T0).unwrap();
        let refusal = reserve(l, 200, T0).unwrap_err();
        assert_eq!(refusal.remaining, 100);
        // The process that held `r` died: after the lease its tokens return.
        let later = T0 + 600_000;
        assert!(reserve(l, 200, later).is_ok());
        let late = settle(l, r.id, 10, 10, later + 1).unwrap();
        assert!(late.lease_expired);
        let stats = l.hourly("a", None, None).unwrap();
        assert_eq!(stats.iter().map(|h| h.refusals).sum::<u64>(), 1);
    }
}

#[test]
fn alerts_fire_once_and_spend_rules_once_a_day() {
    for (l, _d) in backends() {
        let l = l.as_ref();
        grant(l, 1000);
        let r = reserve(l, 800, T0).unwrap();
        let out = settle(l, r.id, 400, 400, T0).unwrap();
        assert_eq!(
            out.alerts.iter().map(|a| a.kind).collect::<Vec<_>>(),
            vec![AlertKind::QuotaLow]
        );
        let r = reserve(l, 100, T0).unwrap();
        assert!(
            settle(l, r.id, 50, 50, T0).unwrap().alerts.is_empty(),
            "once"
        );
        let r = reserve(l, 100, T0).unwrap();
        let out = settle(l, r.id, 50, 50, T0).unwrap();
        assert_eq!(
            out.alerts.iter().map(|a| a.kind).collect::<Vec<_>>(),
            vec![AlertKind::QuotaDepleted]
        );
        let rule = [SpendRule {
            model: None,
            limit: -1,
        }];
        assert_eq!(l.check_spend("a", &rule, T0).unwrap().len(), 1);
        assert!(l.check_spend("a", &rule, T0 + 1).unwrap().is_empty());
    }
}

#[test]
fn sqlite_rejects_newer_schema_and_non_databases() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l.db");
    drop(Sqlite::open(&p, Sync::Normal).unwrap());
    let c = rusqlite::Connection::open(&p).unwrap();
    c.execute("INSERT INTO schema_version (version) VALUES (99)", [])
        .unwrap();
    drop(c);
    let e = Sqlite::open(&p, Sync::Normal).err().unwrap().to_string();
    assert!(e.contains("schema version 99"), "{e}");

    let junk = dir.path().join("junk.db");
    let bytes =
        b"this is not a database, just some text that is long enough to matter........".repeat(20);
    std::fs::write(&junk, &bytes).unwrap();
    let e = Sqlite::open(&junk, Sync::Normal).err().unwrap().to_string();
    assert!(
        e.contains("junk.db") && e.contains("not a SQLite database"),
        "{e}"
    );
    assert_eq!(std::fs::read(&junk).unwrap(), bytes);

    let e = Sqlite::open(&dir.path().join("missing/x.db"), Sync::Normal)
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
    drop(Sqlite::open(&p, Sync::Normal).unwrap());
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn an_overrun_takes_what_remained() {
    for (l, _d) in backends() {
        let l = l.as_ref();
        grant(l, 1000);
        let a = reserve(l, 500, T0).unwrap();
        let b = reserve(l, 200, T0).unwrap();
        let over = settle(l, b.id, 900, 300, T0).unwrap().record;
        assert_eq!((over.free_tokens, over.billable_output_tokens), (1000, 200));
        let late = settle(l, a.id, 300, 200, T0).unwrap().record;
        assert_eq!(late.free_tokens, 0);
        let q = l.quota("a", "m", T0).unwrap().unwrap().0;
        assert_eq!(q.used, 1000);
    }
}

#[test]
fn the_switch_counts_reserved_tokens_as_left() {
    for (l, _d) in backends() {
        let l = l.as_ref();
        grant(l, 1000);
        let _held = reserve(l, 1000, T0).unwrap();
        let m = ["m".to_string()];
        assert_eq!(
            l.set_free_only("a", FreeOnlyTarget::Models(&m), true, ON, T0)
                .unwrap(),
            m
        );
        assert!(l
            .set_free_only("a", FreeOnlyTarget::Models(&m), false, ON, T0)
            .is_err());
    }
}
