//! `guard.check()` and `quotaguard doctor`: the ledger's own integrity check and the
//! invariants every engine keeps, each finding a line that says what to do.
//!
//! The invariants, per model of the account:
//! - **used = records + reconciliation**: the free tokens a model used equal the free
//!   tokens of its records, plus what reconciliation (R12: a console figure, the
//!   service's `FreeTierOnly`) put into `used` (the ledger counts that apart), plus
//!   what settles half-way hold (an engine of several steps). Compacted records are
//!   counted through the daily totals, which compaction keeps; and the records still
//!   there must agree with those totals, day by day, after the last compaction.
//! - **no reservation past its lease**: the tokens held now are exactly those of the
//!   reservations whose lease has not ended; no lease is longer than quotaguard grants.
//! - **sane times**: activations and records fall in 2015..2100.
//!
//! A ledger upgraded from a schema that did not count reconciliation counts from the
//! upgrade: what its models held then is taken as reconciled.
use std::collections::BTreeMap;

use chrono::NaiveDate;

use crate::clock::{cst_day_start, to_utc, MAX_TIME_MS, MIN_TIME_MS};
use crate::config::MAX_LEASE_SECONDS;
use crate::error::{thousands, Result};
use crate::ledger::{Ledger, Now};
use crate::rules::Kind;

/// One line of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// An invariant does not hold (else: a note on what was checked).
    pub problem: bool,
    pub text: String,
}

impl Finding {
    fn ok(text: impl Into<String>) -> Self {
        Self {
            problem: false,
            text: text.into(),
        }
    }

    fn problem(text: impl Into<String>) -> Self {
        Self {
            problem: true,
            text: text.into(),
        }
    }
}

fn sane(ms: i64) -> bool {
    (MIN_TIME_MS..MAX_TIME_MS).contains(&ms)
}

/// The year of an instant, however far (a row poisoned with milliseconds shows its own
/// year, not the last one a reader can show).
fn year(ms: i64) -> String {
    use chrono::TimeZone;
    chrono::Utc.timestamp_millis_opt(ms).single().map_or_else(
        || format!("{} s from the epoch", ms / 1000),
        |t| chrono::Datelike::year(&t).to_string(),
    )
}

fn plural(n: u64, one: &str) -> String {
    format!("{} {one}{}", thousands(n), if n == 1 { "" } else { "s" })
}

fn signed(n: i128) -> String {
    let t = thousands(n.unsigned_abs() as u64);
    if n < 0 {
        format!("-{t}")
    } else {
        t
    }
}

/// Runs every check on `account`'s part of `ledger`.
pub fn check(ledger: &dyn Ledger, account: &str, now: Now) -> Result<Vec<Finding>> {
    let now_ms = now.ms();
    let mut out = Vec::new();
    let insp = ledger.inspect(account, now)?;
    if insp.problems.is_empty() {
        out.push(Finding::ok(format!(
            "ledger {}: the engine's own checks hold",
            ledger.name()
        )));
    }
    out.extend(insp.problems.iter().cloned().map(Finding::problem));

    let (quotas, daily, records) = (&insp.quotas, &insp.daily, &insp.records);

    // Free tokens per model by the daily totals (compaction keeps them).
    let mut totals_free: BTreeMap<&str, u128> = BTreeMap::new();
    for d in daily {
        *totals_free.entry(d.model.as_str()).or_default() += u128::from(d.free_tokens);
    }

    for (model, q, held) in quotas {
        if !sane(q.activated_ms) {
            out.push(Finding::problem(format!(
                "{model:?}: its quota was activated in year {}, outside 2015..2100 (a time in \
                 milliseconds?): grant it again with activated_at in seconds",
                year(q.activated_ms)
            )));
        }
        let from_records = totals_free.remove(model.as_str()).unwrap_or(0) as i128;
        let adjusted = i128::from(insp.adjusted.get(model).copied().unwrap_or(0));
        let pending = i128::from(insp.pending.get(model).copied().unwrap_or(0));
        let used = i128::from(q.used);
        let expected = from_records + adjusted + pending;
        let pending_note = if pending > 0 {
            format!(", {} in settles half-way", signed(pending))
        } else {
            String::new()
        };
        if used == expected {
            let (sign, syncs) = if adjusted < 0 {
                ("-", -adjusted)
            } else {
                ("+", adjusted)
            };
            out.push(Finding::ok(format!(
                "{model:?}: {} free tokens used = {} in records {sign} {} from console syncs{pending_note}",
                signed(used),
                signed(from_records),
                signed(syncs)
            )));
        } else {
            let diff = used - expected;
            out.push(Finding::problem(format!(
                "{model:?}: {} free tokens used, but the records account for {} and console syncs \
                 for {}{pending_note}: {} tokens {}; the ledger was changed outside quotaguard or \
                 lost a record: set the console's figure with `quotaguard sync {model} FIGURE --force`",
                signed(used),
                signed(from_records),
                signed(adjusted),
                signed(diff.abs()),
                if diff > 0 { "too many" } else { "missing" }
            )));
        }
        let live: u64 = insp
            .reservations
            .iter()
            .filter(|r| &r.model == model && r.expires_ms > now_ms)
            .map(|r| r.free_part)
            .sum();
        if live != *held {
            out.push(Finding::problem(format!(
                "{model:?}: {} free tokens are held, but its live reservations hold {}: a \
                 reservation is counted past its lease or lost; restore the ledger from a copy",
                thousands(*held),
                thousands(live)
            )));
        }
    }
    for (model, free) in totals_free {
        if free > 0 {
            out.push(Finding::problem(format!(
                "{model:?}: its records took {} free tokens, but it has no quota row: the ledger \
                 lost it; grant the model again, then sync it with the console's figure",
                thousands(free as u64)
            )));
        }
    }

    // The records still there agree with the totals, each day after the last compaction.
    let mut by_day: BTreeMap<(NaiveDate, &str, Kind), (u64, u128)> = BTreeMap::new();
    let mut odd_times = 0u64;
    let mut odd_example = None;
    for r in records {
        if !sane(r.time_ms) {
            odd_times += 1;
            odd_example.get_or_insert(r.time_ms);
        }
        let e = by_day
            .entry((crate::clock::cst_day(r.time_ms), r.model.as_str(), r.kind))
            .or_default();
        e.0 += 1;
        e.1 += u128::from(r.free_tokens);
    }
    let intact = |day: NaiveDate| {
        insp.compacted_before
            .is_none_or(|c| cst_day_start(day) >= c)
    };
    let mut days_checked = 0u64;
    let mut mismatched = 0u64;
    for d in daily {
        if !intact(d.day) {
            continue;
        }
        days_checked += 1;
        let (n, free) = by_day
            .remove(&(d.day, d.model.as_str(), d.kind))
            .unwrap_or((0, 0));
        if n != d.calls || free != u128::from(d.free_tokens) {
            mismatched += 1;
            if mismatched <= 5 {
                out.push(Finding::problem(format!(
                    "{:?} on {} ({}): {} records with {} free tokens, but the day's totals \
                     count {} with {}: a record was lost or altered; restore the ledger from a copy",
                    d.model,
                    d.day,
                    d.kind.as_str(),
                    thousands(n),
                    thousands(free as u64),
                    thousands(d.calls),
                    thousands(d.free_tokens)
                )));
            }
        }
    }
    for ((day, model, kind), (n, _)) in by_day {
        if intact(day) {
            mismatched += 1;
            if mismatched <= 5 {
                out.push(Finding::problem(format!(
                    "{model:?} on {day} ({}): {} records that no daily total counts: the totals \
                     were altered; restore the ledger from a copy",
                    kind.as_str(),
                    thousands(n)
                )));
            }
        }
    }
    if mismatched > 5 {
        out.push(Finding::problem(format!(
            "… and {} more days whose records and totals disagree",
            mismatched - 5
        )));
    }
    if mismatched == 0 {
        let since = insp
            .compacted_before
            .map(|c| {
                format!(
                    " (records before {} were compacted; their totals stay)",
                    year_day(c)
                )
            })
            .unwrap_or_default();
        out.push(Finding::ok(format!(
            "the records agree with the daily totals ({} checked){since}",
            plural(days_checked, "model-day")
        )));
    }
    if odd_times > 0 {
        out.push(Finding::problem(format!(
            "{} dated outside 2015..2100 (one in year {}): written with a clock in \
             milliseconds or a wrong clock; their bills and statistics are misplaced",
            plural(odd_times, "record"),
            year(odd_example.unwrap_or(0))
        )));
    }

    let max_lease = (MAX_LEASE_SECONDS * 1000.0) as i64;
    let mut expired = 0u64;
    for r in &insp.reservations {
        if r.expires_ms <= now_ms {
            expired += 1;
        }
        if r.expires_ms.saturating_sub(r.created_ms) > max_lease || r.expires_ms < r.created_ms {
            out.push(Finding::problem(format!(
                "reservation {} of {:?} runs from {} to {}, a lease quotaguard never grants: \
                 release it, or restore the ledger from a copy",
                r.id,
                r.model,
                year_day(r.created_ms),
                year_day(r.expires_ms)
            )));
        }
        if r.free_part > r.worst {
            out.push(Finding::problem(format!(
                "reservation {} of {:?} holds {} free tokens, more than its worst case {}",
                r.id,
                r.model,
                thousands(r.free_part),
                thousands(r.worst)
            )));
        }
    }
    let live = insp.reservations.len() as u64 - expired;
    let stale = if expired > 0 {
        format!(
            "; {} past the lease, holding nothing (the process that made it died)",
            thousands(expired)
        )
    } else {
        String::new()
    };
    out.push(Finding::ok(format!(
        "{} within {} lease{stale}",
        plural(live, "reservation"),
        if live == 1 { "its" } else { "their" }
    )));
    Ok(out)
}

fn year_day(ms: i64) -> String {
    to_utc(ms).format("%Y-%m-%d %H:%M UTC").to_string()
}
