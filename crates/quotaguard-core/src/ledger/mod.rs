//! The ledger: one trait of token-only atomic steps over the shared state of an
//! account's quotas, reservations, records and aggregates.
//!
//! Each step of [`Ledger`] is atomic and decides on token counts, flags and the
//! reservation alone ([`decide_hold`], [`decide_take`]): the rules that produce
//! those numbers stay in [`crate::guard`] and [`crate::rules`], and money reaches a
//! ledger only as integers computed in Rust. So a server can run a step whole in a
//! script without any copy of the rules or of money arithmetic ([`redis`]). The
//! local backends ([`memory`], [`sqlite`]) share one implementation of the steps,
//! [`Local`], written against [`Tx`]: the reads and writes one step needs.
use std::collections::BTreeMap;

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use crate::clock::{cst_day_start, hour_start, system_now_ms, DAY_MS};
use crate::config::LedgerUrl;
use crate::error::{QuotaError, Result};
use crate::money::Currency;
use crate::quota::QuotaRow;
use crate::rules::{AlertKind, CostType, Kind};

pub mod files;
pub mod memory;
pub mod redis;
pub mod sqlite;

/// A call's worst case held against the quota until settled, released or expired (R9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationRow {
    pub id: i64,
    pub account: String,
    pub model: String,
    pub kind: Kind,
    /// Held as a thinking-mode call: its worst case is priced and settled as one.
    pub thinking: bool,
    pub input_tokens: u64,
    pub worst: u64,
    /// The part of `worst` held from free quota.
    pub free_part: u64,
    pub created_ms: i64,
    pub expires_ms: i64,
}

/// What a settle or a release reads of the reservation it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub kind: Kind,
    pub worst: u64,
    pub expires_ms: i64,
}

/// One settled call (R11). Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub id: i64,
    pub time_ms: i64,
    pub account: String,
    pub user: String,
    pub workspace: Option<String>,
    pub model: String,
    pub kind: Kind,
    pub request_id: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_tokens: u64,
    pub thinking: bool,
    pub free_tokens: u64,
    pub billable_input_tokens: u64,
    pub billable_output_tokens: u64,
    /// pico-units; `None` when unpriced.
    pub cost: Option<i64>,
    pub currency: Currency,
    pub cost_type: CostType,
    /// The call may have reached the service with an unknown outcome: settled at its
    /// worst case (R9).
    pub in_doubt: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AccountRow {
    pub overdue: bool,
    /// pico-units; `None` until the user states a balance (R7).
    pub balance: Option<i64>,
}

/// Running totals per CST day, model and kind: what bills are read from (R14).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailyRow {
    pub day: NaiveDate,
    pub model: String,
    pub kind: Kind,
    pub calls: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub free_tokens: u64,
    pub billable_input_tokens: u64,
    pub billable_output_tokens: u64,
    /// pico-units, summed without overflow.
    pub cost: i128,
    pub unpriced_calls: u64,
    pub currency: Currency,
}

impl DailyRow {
    /// A day's totals of a model and kind, before any call.
    pub fn new(day: NaiveDate, model: String, kind: Kind, currency: Currency) -> Self {
        Self {
            day,
            model,
            kind,
            calls: 0,
            input_tokens: 0,
            output_tokens: 0,
            free_tokens: 0,
            billable_input_tokens: 0,
            billable_output_tokens: 0,
            cost: 0,
            unpriced_calls: 0,
            currency,
        }
    }

    /// Adds another part of the same day, model and kind (an hour's totals).
    pub fn absorb(&mut self, o: &DailyRow) {
        self.calls += o.calls;
        self.input_tokens += o.input_tokens;
        self.output_tokens += o.output_tokens;
        self.free_tokens += o.free_tokens;
        self.billable_input_tokens += o.billable_input_tokens;
        self.billable_output_tokens += o.billable_output_tokens;
        self.cost += o.cost;
        self.unpriced_calls += o.unpriced_calls;
    }
}

/// Call statistics per model per hour (R14).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HourRow {
    pub hour_ms: i64,
    pub model: String,
    pub calls: u64,
    pub refusals: u64,
    pub failures: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsDelta {
    pub calls: u64,
    pub refusals: u64,
    pub failures: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// An alert the ledger recorded as fired (R10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub kind: AlertKind,
    pub model: Option<String>,
    pub remaining: u64,
    pub total: u64,
    pub threshold_ppm: Option<u32>,
    /// For `daily_spend`: the previous CST day's bill, and the day.
    pub amount: Option<i128>,
    pub limit: Option<i64>,
    pub day: Option<NaiveDate>,
    pub time_ms: i64,
}

pub struct GrantArgs<'a> {
    pub account: &'a str,
    pub model: &'a str,
    pub total: u64,
    pub activated_ms: i64,
    pub valid_days: u32,
}

/// What an engine reads to decide a hold, and what a refusal is explained from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Snapshot {
    pub quota: Option<QuotaRow>,
    /// Free tokens held by the model's live reservations.
    pub held: u64,
    pub overdue: bool,
    /// The kill switch is on (R15).
    pub blocked: bool,
}

/// Where "now" comes from in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Now {
    /// The caller's time (a test clock): every engine uses it as given.
    Caller(i64),
    /// The system clock: an engine with a clock of its own (a Redis server's `TIME`)
    /// uses that instead, so that machines whose clocks disagree agree on leases. The
    /// value is the caller's reading, used by engines without a clock of their own.
    System(i64),
}

impl Now {
    pub fn ms(self) -> i64 {
        match self {
            Now::Caller(ms) | Now::System(ms) => ms,
        }
    }
}

/// The reserve step (R8, R9) as plain numbers and flags. The rules that produce them
/// stay in Rust ([`crate::guard`]); every engine runs [`decide_hold`] on them, whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldRequest<'a> {
    pub account: &'a str,
    pub model: &'a str,
    pub kind: Kind,
    pub thinking: bool,
    pub input_tokens: u64,
    pub worst: u64,
    /// R2: the guard's region has free quota on its site.
    pub free_region: bool,
    /// R4: free quota may cover this kind of call.
    pub covered: bool,
    /// R6: a call that free quota does not fully cover may go at all (a verified
    /// account); the model's Free Quota Only switch is ledger state, read in the step.
    pub may_pay: bool,
    pub now: Now,
    pub lease_ms: i64,
}

/// The outcome of the reserve step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    Held(ReservationRow),
    /// Not admitted; what the step saw, for the rules to say why.
    Refused(Snapshot),
}

/// Free tokens a new call could draw on: 0 without quota, outside the free region,
/// at a total of 0 or after expiry (R2, R3).
pub fn free_left(s: &Snapshot, free_region: bool, now_ms: i64) -> u64 {
    match s.quota {
        Some(q) if free_region && q.total > 0 && now_ms < q.expires_ms() => {
            q.left().saturating_sub(s.held)
        }
        _ => 0,
    }
}

/// The contended decision of a reserve, on integers and flags only: the part of the
/// worst case held from free quota, or `None` to refuse. A Redis script runs the same
/// comparison (`redis.lua`); the shared contract tests hold the two together.
pub fn decide_hold(s: &Snapshot, r: &HoldRequest<'_>, now_ms: i64) -> Option<u64> {
    if s.overdue || s.blocked {
        return None;
    }
    let avail = free_left(s, r.free_region, now_ms);
    if r.covered && r.worst <= avail {
        return Some(r.worst);
    }
    if r.may_pay && !s.quota.is_some_and(|q| q.free_only) {
        return Some(if r.covered { avail } else { 0 });
    }
    None
}

/// The token step of a settle (R9, R11), owned so that it can be spilled to a file and
/// replayed when the engine cannot be reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakeRequest {
    pub account: String,
    pub model: String,
    pub kind: Kind,
    /// The reservation being settled; `None` records usage that had none.
    pub reservation: Option<i64>,
    /// What that reservation held: its free part and its worst case (0 without one).
    pub held_free: u64,
    pub held_worst: u64,
    /// The record's id, chosen by the caller: a replay of the same settle is recognised.
    pub record_id: i64,
    pub user: String,
    pub workspace: Option<String>,
    pub request_id: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_tokens: u64,
    /// Input tokens that created an explicit cache (priced at its write rate).
    #[serde(default)]
    pub cache_write_tokens: u64,
    /// The cache hits were explicit-cache hits (priced at its hit rate).
    #[serde(default)]
    pub explicit_cache: bool,
    pub thinking: bool,
    pub in_doubt: bool,
    pub free_region: bool,
    pub covered: bool,
    pub now: Now,
}

/// What the token step took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taken {
    /// Free tokens the call consumed.
    pub free: u64,
    /// The model's quota after the step.
    pub quota: Option<QuotaRow>,
    /// The reservation had outlived its lease, or had been swept.
    pub lease_expired: bool,
    /// The record's time, as the step's clock read it.
    pub time_ms: i64,
}

/// The token step's decision: free tokens up to what is left. Within its worst case a
/// call draws on its own hold and leaves the others' alone; past it (or once its hold
/// was swept) the record tells the truth (R9): the service gave free tokens up to what
/// remained, whoever had reserved them.
pub fn decide_take(
    quota: Option<&QuotaRow>,
    held_by_others: u64,
    overrun: bool,
    r: &TakeRequest,
    now_ms: i64,
) -> u64 {
    if !r.covered {
        return 0;
    }
    let s = Snapshot {
        quota: quota.copied(),
        held: if overrun { 0 } else { held_by_others },
        ..Snapshot::default()
    };
    free_left(&s, r.free_region, now_ms).min(r.input_tokens + r.output_tokens)
}

/// A quota alert as plain numbers (R10): it fires, once across every process, when the
/// model's remaining free tokens after the step are within `at_least..=at_or_below`.
/// Its key and its alert are built only when it is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlertMark {
    pub kind: AlertKind,
    pub at_least: u64,
    pub at_or_below: u64,
    /// The grant the mark belongs to: a new grant alerts afresh.
    pub total: u64,
    pub activated_ms: i64,
    pub threshold_ppm: Option<u32>,
}

impl AlertMark {
    /// The key the ledger records the alert under.
    pub fn key(&self, model: &str) -> String {
        match self.kind {
            AlertKind::QuotaLow => format!(
                "quota_low:{model}:{}:{}",
                self.activated_ms,
                self.threshold_ppm.unwrap_or(0)
            ),
            kind => format!("{}:{model}:{}", kind.as_str(), self.activated_ms),
        }
    }

    /// The alert, with the remaining figure the step left.
    pub fn alert(&self, model: &str, remaining: u64, time_ms: i64) -> Alert {
        Alert {
            kind: self.kind,
            model: Some(model.to_string()),
            remaining,
            total: self.total,
            threshold_ppm: self.threshold_ppm,
            amount: None,
            limit: None,
            day: None,
            time_ms,
        }
    }
}

/// The money and alerts of a settle, computed in Rust from what the token step took,
/// reaching the engine as integers it stores unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub record: UsageRecord,
    pub marks: Vec<AlertMark>,
}

/// The marks reached at `left` free tokens remaining.
pub fn marks_reached(marks: &[AlertMark], left: u64) -> impl Iterator<Item = &AlertMark> {
    marks
        .iter()
        .filter(move |m| (m.at_least..=m.at_or_below).contains(&left))
}

/// A settled call: its record, and the alerts that fired with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub record: UsageRecord,
    pub lease_expired: bool,
    pub alerts: Vec<Alert>,
}

/// Computes a settle's money and alerts from its request and what the token step took.
pub type Finish<'a> = dyn Fn(&TakeRequest, &Taken) -> Result<Commit> + 'a;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    Released,
    /// Already settled or released (or expired and cleaned up).
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconcile {
    /// The console's figure (R12): sets the total and lowers the remaining, never
    /// raising it above the ledger's own figure, unless `force` (set it exactly).
    Console {
        remaining: u64,
        total: u64,
        force: bool,
    },
    /// The service answered `AllocationQuota.FreeTierOnly` (R12).
    Depleted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountOp {
    SetBalance(i64),
    TopUp(i64),
    MarkOverdue,
}

#[derive(Debug, Clone, Default)]
pub struct RecordQuery {
    pub account: String,
    pub model: Option<String>,
    pub user: Option<String>,
    pub workspace: Option<String>,
    pub kind: Option<Kind>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub limit: Option<u64>,
}

impl RecordQuery {
    pub fn matches(&self, r: &UsageRecord) -> bool {
        r.account == self.account
            && self.model.as_ref().is_none_or(|m| *m == r.model)
            && self.user.as_ref().is_none_or(|u| *u == r.user)
            && self
                .workspace
                .as_ref()
                .is_none_or(|w| r.workspace.as_ref() == Some(w))
            && self.kind.is_none_or(|k| k == r.kind)
            && self.since_ms.is_none_or(|s| r.time_ms >= s)
            && self.until_ms.is_none_or(|u| r.time_ms < u)
    }
}

/// An account's part of a ledger read in one step (a consistent snapshot, however
/// busy the ledger), with what only the engine knows: for [`crate::check`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inspection {
    /// What the engine's own checks found wrong (SQLite's `integrity_check`, the
    /// permissions of its files), one line each, saying what to do.
    pub problems: Vec<String>,
    /// Every quota row, with the free tokens its live reservations hold.
    pub quotas: Vec<(String, QuotaRow, u64)>,
    /// Every daily total.
    pub daily: Vec<DailyRow>,
    /// Every record (those compacted away are gone).
    pub records: Vec<UsageRecord>,
    /// Per model, the free tokens reconciliation (R12: console figures, the service's
    /// `FreeTierOnly`) added to `used` (negative: gave back), since the model's row was
    /// made or the ledger was upgraded to count them.
    pub adjusted: BTreeMap<String, i64>,
    /// Records before this time were compacted away (their totals stay).
    pub compacted_before: Option<i64>,
    /// Every reservation row of the account, live or past its lease.
    pub reservations: Vec<ReservationRow>,
    /// Per model, free tokens taken by settles whose record is not written yet (an
    /// engine of several steps, between them).
    pub pending: BTreeMap<String, u64>,
}

/// The atomic steps every ledger offers: each call is one atomic step of the engine,
/// deciding on token counts, flags and the reservation alone. Money reaches a ledger
/// only as integers computed in Rust, which it stores unchanged.
pub trait Ledger: Send + Sync {
    /// Where the ledger lives, for messages (a path or URL, never a secret).
    fn name(&self) -> &str;
    fn grant(&self, a: &GrantArgs<'_>) -> Result<QuotaRow>;
    /// The quota and the free tokens held by live reservations.
    fn quota(&self, account: &str, model: &str, now: Now) -> Result<Option<(QuotaRow, u64)>>;
    fn quotas(&self, account: &str, now: Now) -> Result<Vec<(String, QuotaRow, u64)>>;
    /// Sets the Free Quota Only switch (R5) of models the rules allowed, marking them
    /// configured; a model without a quota row is skipped. Returns the models changed.
    fn set_free_only(&self, account: &str, models: &[String], enable: bool) -> Result<Vec<String>>;
    /// R12 reconciliation; returns the quota after it.
    fn reconcile(&self, account: &str, model: &str, op: Reconcile, now: Now) -> Result<QuotaRow>;
    /// The reserve step: [`decide_hold`] on what the engine holds, and the hold written
    /// (or a refusal counted in the hour's statistics) in the same step.
    fn reserve(&self, r: &HoldRequest<'_>) -> Result<Hold>;
    /// The settle: the token step ([`decide_take`]; the reservation deleted, the free
    /// tokens taken), then `finish` in Rust, then the commit (record, totals, balance,
    /// alerts fired once). Local engines run all three in one transaction; an engine of
    /// several steps marks the call pending in its token step so that a crash between
    /// the steps is recovered by [`Ledger::recover`], never lost nor counted twice.
    fn settle(&self, r: &TakeRequest, finish: &Finish<'_>) -> Result<Settled>;
    fn release(
        &self,
        account: &str,
        model: &str,
        id: i64,
        failed: bool,
        now: Now,
    ) -> Result<Release>;
    fn account(&self, account: &str) -> Result<AccountRow>;
    fn update_account(&self, account: &str, op: AccountOp) -> Result<AccountRow>;
    /// Turns the kill switch on with a reason, or off (R15): every guard on the ledger
    /// refuses every call of the account from its next call on.
    fn set_blocked(&self, account: &str, reason: Option<&str>) -> Result<()>;
    /// The kill switch's reason, while it is on.
    fn blocked(&self, account: &str) -> Result<Option<String>>;
    /// Records that each alert key fired, once across every process; true where it
    /// had not fired before.
    fn fire_once(&self, account: &str, keys: &[String], now_ms: i64) -> Result<Vec<bool>>;
    /// The cost of a CST day's records, of one model or all, pico-units.
    fn day_cost(&self, account: &str, day: NaiveDate, model: Option<&str>) -> Result<i128>;
    fn records(&self, q: &RecordQuery) -> Result<Vec<UsageRecord>>;
    /// Daily totals for CST days in `[from, to)`.
    fn daily(&self, account: &str, from: NaiveDate, to: NaiveDate) -> Result<Vec<DailyRow>>;
    fn hourly(
        &self,
        account: &str,
        model: Option<&str>,
        since_ms: Option<i64>,
    ) -> Result<Vec<HourRow>>;
    /// Drops records older than `before_ms`; daily and hourly totals stay.
    fn compact(&self, account: &str, before_ms: i64) -> Result<u64>;
    /// Completes settles that a crash or an outage left half-way (pending token steps,
    /// spilled records), each exactly once. Local engines have none.
    fn recover(&self, _account: &str, _finish: &Finish<'_>) -> Result<Vec<Settled>> {
        Ok(Vec::new())
    }
    /// Whether [`Ledger::recover`] has work to do (a spill to replay, a periodic look
    /// for settles a crash left pending).
    fn recovery_due(&self) -> bool {
        false
    }
    /// The account's part of the ledger in one step, and what the engine's own checks
    /// show, for a check of the ledger's invariants.
    fn inspect(&self, account: &str, now: Now) -> Result<Inspection>;
    /// What opening the ledger found worth a warning (loose permissions it could not
    /// tighten), one line each.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }
}

/// The reads and writes of one atomic step of a local backend.
pub trait Tx {
    fn quota(&mut self, account: &str, model: &str) -> Result<Option<QuotaRow>>;
    fn put_quota(&mut self, account: &str, model: &str, q: &QuotaRow) -> Result<()>;
    fn quota_models(&mut self, account: &str) -> Result<Vec<String>>;
    /// Free tokens held by reservations of (account, model) alive at `now_ms`, except `except`.
    fn reserved(
        &mut self,
        account: &str,
        model: &str,
        now_ms: i64,
        except: Option<i64>,
    ) -> Result<u64>;
    /// What a reserve decides on: the quota, the free tokens live reservations hold at
    /// `now_ms`, the account's standing and its kill switch.
    fn snapshot(&mut self, account: &str, model: &str, now_ms: i64) -> Result<Snapshot> {
        Ok(Snapshot {
            quota: self.quota(account, model)?,
            held: self.reserved(account, model, now_ms, None)?,
            overdue: self.account(account)?.overdue,
            blocked: self.blocked(account)?.is_some(),
        })
    }
    /// The quota and the free tokens held by the other live reservations (all but
    /// `except`), as a settle reads them.
    fn quota_held(
        &mut self,
        account: &str,
        model: &str,
        now_ms: i64,
        except: Option<i64>,
    ) -> Result<(Option<QuotaRow>, u64)> {
        Ok((
            self.quota(account, model)?,
            self.reserved(account, model, now_ms, except)?,
        ))
    }
    /// Sets the used tokens of a quota row that exists.
    fn set_used(&mut self, account: &str, model: &str, used: u64) -> Result<()>;
    /// Inserts the reservation; returns its id (the row's, or a fresh one on a clash).
    fn insert_reservation(&mut self, r: &ReservationRow) -> Result<i64>;
    /// Deletes the reservation and returns what a settle or a release reads of it.
    fn take_reservation(&mut self, account: &str, model: &str, id: i64) -> Result<Option<Lease>>;
    fn account(&mut self, account: &str) -> Result<AccountRow>;
    fn put_account(&mut self, account: &str, a: &AccountRow) -> Result<()>;
    fn blocked(&mut self, account: &str) -> Result<Option<String>>;
    fn set_blocked(&mut self, account: &str, reason: Option<&str>, now_ms: i64) -> Result<()>;
    /// Appends the record and adds it to the running totals, with the call's
    /// statistics `d` for the record's hour (one write of the hour's row).
    fn append_record(&mut self, r: &mut UsageRecord, d: &StatsDelta) -> Result<()>;
    fn bump_hour(
        &mut self,
        account: &str,
        model: &str,
        kind: Kind,
        hour_ms: i64,
        d: &StatsDelta,
    ) -> Result<()>;
    /// Records that alert `key` fired; false if it had fired before.
    fn fire_once(&mut self, account: &str, key: &str, now_ms: i64) -> Result<bool>;
    fn day_cost(&mut self, account: &str, day: NaiveDate, model: Option<&str>) -> Result<i128>;
    fn records(&mut self, q: &RecordQuery) -> Result<Vec<UsageRecord>>;
    fn daily(&mut self, account: &str, from: NaiveDate, to: NaiveDate) -> Result<Vec<DailyRow>>;
    fn hourly(
        &mut self,
        account: &str,
        model: Option<&str>,
        since_ms: Option<i64>,
    ) -> Result<Vec<HourRow>>;
    /// Drops records older than `before_ms` and remembers that it did
    /// ([`Tx::compacted_before`]).
    fn compact(&mut self, account: &str, before_ms: i64) -> Result<u64>;
    /// Adds `delta` to the free tokens reconciliation put into a model's `used`.
    fn adjust(&mut self, account: &str, model: &str, delta: i64) -> Result<()>;
    /// Per model, the free tokens reconciliation put into `used`.
    fn adjustments(&mut self, account: &str) -> Result<BTreeMap<String, i64>>;
    /// The latest `before_ms` records were compacted with, if ever.
    fn compacted_before(&mut self, account: &str) -> Result<Option<i64>>;
    /// Every reservation row of the account.
    fn reservations(&mut self, account: &str) -> Result<Vec<ReservationRow>>;
}

/// A local store that runs a closure as one atomic step.
pub trait Backend: Send + Sync {
    fn name(&self) -> &str;
    fn write<R>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<R>) -> Result<R>;
    fn read<R>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<R>) -> Result<R> {
        self.write(f)
    }
    /// The store's own check of itself (a file's integrity and permissions): problems.
    fn integrity(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
    /// What opening the store found worth a warning.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }
}

/// The one implementation of the atomic steps for local backends.
pub struct Local<B: Backend>(pub B);

/// The token step's effect on the hour's statistics and the balance, shared by every
/// engine's commit: what a tracked balance becomes after `cost` (R7).
pub fn charge(acct: AccountRow, cost: Option<i64>) -> Result<Option<AccountRow>> {
    let (Some(c), Some(b)) = (cost.filter(|c| *c > 0), acct.balance) else {
        return Ok(None);
    };
    let nb = b
        .checked_sub(c)
        .ok_or_else(|| QuotaError::Invalid(format!("balance {b} minus cost {c} overflows")))?;
    Ok(Some(AccountRow {
        balance: Some(nb),
        overdue: acct.overdue || nb < 0,
    }))
}

/// A balance after a change of the user's (R7).
pub fn apply_account_op(mut a: AccountRow, op: AccountOp) -> Result<AccountRow> {
    match op {
        AccountOp::SetBalance(b) => {
            a.balance = Some(b);
            a.overdue = b < 0;
        }
        AccountOp::TopUp(amount) => {
            let b = a.balance.unwrap_or(0).checked_add(amount).ok_or_else(|| {
                QuotaError::Invalid(format!(
                    "top-up of {amount} pico-units overflows the balance"
                ))
            })?;
            a.balance = Some(b);
            if b >= 0 {
                a.overdue = false;
            }
        }
        AccountOp::MarkOverdue => a.overdue = true,
    }
    Ok(a)
}

/// A quota after reconciliation (R12).
pub fn reconciled(old: Option<QuotaRow>, op: Reconcile, now_ms: i64) -> QuotaRow {
    let fresh = |total: u64, used: u64| QuotaRow {
        total,
        used,
        activated_ms: now_ms,
        valid_days: crate::quota::CUTOVER_DAYS,
        free_only: false,
        configured: false,
    };
    match (op, old) {
        (
            Reconcile::Console {
                remaining,
                total,
                force,
            },
            Some(mut q),
        ) => {
            // The console lags and may show quota that is already gone: only a forced
            // sync gives tokens back.
            q.used = if force {
                total - remaining
            } else {
                q.used.max(total - remaining)
            };
            q.total = total;
            q
        }
        (
            Reconcile::Console {
                remaining, total, ..
            },
            None,
        ) => fresh(total, total - remaining),
        (Reconcile::Depleted, Some(mut q)) => {
            q.used = q.total;
            q
        }
        (Reconcile::Depleted, None) => fresh(0, 0),
    }
}

impl<B: Backend> Ledger for Local<B> {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn grant(&self, a: &GrantArgs<'_>) -> Result<QuotaRow> {
        self.0.write(|tx| {
            let old = tx.quota(a.account, a.model)?;
            let q = QuotaRow {
                total: a.total,
                // Granting again corrects the grant and keeps what was used (R3).
                used: old.map_or(0, |o| o.used),
                activated_ms: a.activated_ms,
                valid_days: a.valid_days,
                free_only: old.is_some_and(|o| o.free_only),
                configured: old.is_some_and(|o| o.configured),
            };
            tx.put_quota(a.account, a.model, &q)?;
            Ok(q)
        })
    }

    fn quota(&self, account: &str, model: &str, now: Now) -> Result<Option<(QuotaRow, u64)>> {
        self.0.read(|tx| {
            let Some(q) = tx.quota(account, model)? else {
                return Ok(None);
            };
            Ok(Some((q, tx.reserved(account, model, now.ms(), None)?)))
        })
    }

    fn quotas(&self, account: &str, now: Now) -> Result<Vec<(String, QuotaRow, u64)>> {
        self.0.read(|tx| {
            let mut out = Vec::new();
            for m in tx.quota_models(account)? {
                if let Some(q) = tx.quota(account, &m)? {
                    let r = tx.reserved(account, &m, now.ms(), None)?;
                    out.push((m, q, r));
                }
            }
            Ok(out)
        })
    }

    fn set_free_only(&self, account: &str, models: &[String], enable: bool) -> Result<Vec<String>> {
        self.0.write(|tx| {
            let mut changed = Vec::new();
            for m in models {
                if let Some(mut q) = tx.quota(account, m)? {
                    q.free_only = enable;
                    q.configured = true;
                    tx.put_quota(account, m, &q)?;
                    changed.push(m.clone());
                }
            }
            Ok(changed)
        })
    }

    fn reconcile(&self, account: &str, model: &str, op: Reconcile, now: Now) -> Result<QuotaRow> {
        self.0.write(|tx| {
            let old = tx.quota(account, model)?;
            let q = reconciled(old, op, now.ms());
            tx.put_quota(account, model, &q)?;
            let delta = i128::from(q.used) - i128::from(old.map_or(0, |o| o.used));
            if delta != 0 {
                tx.adjust(account, model, delta as i64)?;
            }
            Ok(q)
        })
    }

    fn reserve(&self, r: &HoldRequest<'_>) -> Result<Hold> {
        let now = r.now.ms();
        self.0.write(|tx| {
            let snap = tx.snapshot(r.account, r.model, now)?;
            let Some(free_part) = decide_hold(&snap, r, now) else {
                let d = StatsDelta {
                    refusals: 1,
                    ..Default::default()
                };
                tx.bump_hour(r.account, r.model, r.kind, hour_start(now), &d)?;
                return Ok(Hold::Refused(snap));
            };
            let mut row = ReservationRow {
                id: fresh_id(),
                account: r.account.to_string(),
                model: r.model.to_string(),
                kind: r.kind,
                thinking: r.thinking,
                input_tokens: r.input_tokens,
                worst: r.worst,
                free_part,
                created_ms: now,
                expires_ms: now.saturating_add(r.lease_ms),
            };
            row.id = tx.insert_reservation(&row)?;
            Ok(Hold::Held(row))
        })
    }

    fn settle(&self, r: &TakeRequest, finish: &Finish<'_>) -> Result<Settled> {
        let now = r.now.ms();
        self.0.write(|tx| {
            let (acct, model) = (r.account.as_str(), r.model.as_str());
            let (mut overrun, mut lease_expired) = (false, false);
            if let Some(id) = r.reservation {
                match tx.take_reservation(acct, model, id)? {
                    Some(res) => {
                        lease_expired = res.expires_ms <= now;
                        overrun = r.input_tokens + r.output_tokens > res.worst;
                    }
                    // Swept after its lease: the usage is still recorded (R9).
                    None => (lease_expired, overrun) = (true, true),
                }
            }
            let (mut quota, others) = tx.quota_held(acct, model, now, r.reservation)?;
            let free = decide_take(quota.as_ref(), others, overrun, r, now);
            if let Some(q) = quota.as_mut() {
                if free > 0 {
                    q.used += free;
                    tx.set_used(acct, model, q.used)?;
                }
            }
            let taken = Taken {
                free,
                quota,
                lease_expired,
                time_ms: now,
            };
            let mut c = finish(r, &taken)?;
            let left = quota.map_or(0, |q| q.left());
            let mut alerts = Vec::new();
            for m in marks_reached(&c.marks, left) {
                if tx.fire_once(acct, &m.key(model), now)? {
                    alerts.push(m.alert(model, left, now));
                }
            }
            // The record's hour is the step's: its totals and the call's statistics share
            // one row.
            let d = StatsDelta {
                calls: 1,
                input_tokens: r.input_tokens,
                output_tokens: r.output_tokens,
                ..Default::default()
            };
            tx.append_record(&mut c.record, &d)?;
            // Only a cost can move a balance: a free call reads no account row.
            if c.record.cost.is_some_and(|c| c > 0) {
                if let Some(a) = charge(tx.account(acct)?, c.record.cost)? {
                    tx.put_account(acct, &a)?;
                }
            }
            Ok(Settled {
                record: c.record,
                lease_expired,
                alerts,
            })
        })
    }

    fn release(
        &self,
        account: &str,
        model: &str,
        id: i64,
        failed: bool,
        now: Now,
    ) -> Result<Release> {
        self.0.write(|tx| {
            let Some(r) = tx.take_reservation(account, model, id)? else {
                return Ok(Release::Unknown);
            };
            if failed {
                let d = StatsDelta {
                    failures: 1,
                    ..Default::default()
                };
                tx.bump_hour(account, model, r.kind, hour_start(now.ms()), &d)?;
            }
            Ok(Release::Released)
        })
    }

    fn account(&self, account: &str) -> Result<AccountRow> {
        self.0.read(|tx| tx.account(account))
    }

    fn update_account(&self, account: &str, op: AccountOp) -> Result<AccountRow> {
        self.0.write(|tx| {
            let a = apply_account_op(tx.account(account)?, op)?;
            tx.put_account(account, &a)?;
            Ok(a)
        })
    }

    fn set_blocked(&self, account: &str, reason: Option<&str>) -> Result<()> {
        self.0
            .write(|tx| tx.set_blocked(account, reason, system_now_ms()))
    }

    fn blocked(&self, account: &str) -> Result<Option<String>> {
        self.0.read(|tx| tx.blocked(account))
    }

    fn fire_once(&self, account: &str, keys: &[String], now_ms: i64) -> Result<Vec<bool>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.0.write(|tx| {
            keys.iter()
                .map(|k| tx.fire_once(account, k, now_ms))
                .collect()
        })
    }

    fn day_cost(&self, account: &str, day: NaiveDate, model: Option<&str>) -> Result<i128> {
        self.0.read(|tx| tx.day_cost(account, day, model))
    }

    fn records(&self, q: &RecordQuery) -> Result<Vec<UsageRecord>> {
        self.0.read(|tx| tx.records(q))
    }

    fn daily(&self, account: &str, from: NaiveDate, to: NaiveDate) -> Result<Vec<DailyRow>> {
        self.0.read(|tx| tx.daily(account, from, to))
    }

    fn hourly(
        &self,
        account: &str,
        model: Option<&str>,
        since_ms: Option<i64>,
    ) -> Result<Vec<HourRow>> {
        self.0.read(|tx| tx.hourly(account, model, since_ms))
    }

    fn compact(&self, account: &str, before_ms: i64) -> Result<u64> {
        self.0.write(|tx| tx.compact(account, before_ms))
    }

    fn inspect(&self, account: &str, now: Now) -> Result<Inspection> {
        let problems = self.0.integrity()?;
        self.0.read(|tx| {
            let mut quotas = Vec::new();
            for m in tx.quota_models(account)? {
                if let Some(q) = tx.quota(account, &m)? {
                    let held = tx.reserved(account, &m, now.ms(), None)?;
                    quotas.push((m, q, held));
                }
            }
            let (first, last) = all_days();
            Ok(Inspection {
                problems,
                quotas,
                daily: tx.daily(account, first, last)?,
                records: tx.records(&RecordQuery {
                    account: account.to_string(),
                    ..Default::default()
                })?,
                adjusted: tx.adjustments(account)?,
                compacted_before: tx.compacted_before(account)?,
                reservations: tx.reservations(account)?,
                pending: BTreeMap::new(),
            })
        })
    }

    fn warnings(&self) -> Vec<String> {
        self.0.warnings()
    }
}

/// Opens the ledger `url` names; `create_dir` is a directory to create (private) first.
pub fn open(url: &LedgerUrl, create_dir: Option<&std::path::Path>) -> Result<Box<dyn Ledger>> {
    match url {
        LedgerUrl::Memory => Ok(Box::new(Local(memory::Memory::new()))),
        LedgerUrl::Sqlite { path, durability } => {
            if let Some(dir) = create_dir {
                files::create_private_dir(dir).map_err(|e| QuotaError::Ledger {
                    ledger: path.display().to_string(),
                    message: format!(
                        "cannot create directory {:?}: {e}",
                        dir.display().to_string()
                    ),
                })?;
                // quotaguard's own directory: made 0700, and brought back to it if loosened
                // (opening warns when it cannot be).
                let _ = files::tighten_dir(dir);
            }
            Ok(Box::new(Local(sqlite::Sqlite::open(path, *durability)?)))
        }
        LedgerUrl::Redis { topology, display } => Ok(Box::new(redis::Redis::open(
            topology.clone(),
            display.clone(),
            crate::config::spill_dir(),
        )?)),
    }
}

/// Every CST day a ledger can hold a total for, as `[from, to)`.
pub fn all_days() -> (NaiveDate, NaiveDate) {
    (
        NaiveDate::from_ymd_opt(1, 1, 1).unwrap_or(NaiveDate::MIN),
        NaiveDate::from_ymd_opt(9999, 12, 31).unwrap_or(NaiveDate::MAX),
    )
}

/// CST days `[from, to)` as epoch-millisecond bounds.
pub fn day_bounds(from: NaiveDate, to: NaiveDate) -> (i64, i64) {
    (cst_day_start(from), cst_day_start(to))
}

/// A fresh positive 63-bit id without a shared counter: a random 31-bit prefix per
/// process, then a counter, so ids rise in call order within a process and two
/// processes almost never meet (a clash is retried by the caller). A child after
/// `fork()` draws a prefix of its own: it never repeats its parent's ids.
pub fn fresh_id() -> i64 {
    use std::hash::{BuildHasher, RandomState};
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
    static PID: AtomicU32 = AtomicU32::new(0);
    static PREFIX: AtomicU64 = AtomicU64::new(0);
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let pid = crate::process::pid();
    if PID.load(Ordering::Acquire) != pid {
        let prefix =
            RandomState::new().hash_one((pid, system_now_ms(), COUNTER.load(Ordering::Relaxed)));
        PREFIX.store(prefix & 0x7fff_ffff, Ordering::Release);
        PID.store(pid, Ordering::Release);
    }
    let prefix = PREFIX.load(Ordering::Acquire);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    ((prefix << 32).wrapping_add(n) & 0x7fff_ffff_ffff_ffff) as i64
}

/// Reservations that expired more than a day ago are deleted when a ledger opens.
pub const STALE_RESERVATION_MS: i64 = DAY_MS;

#[cfg(test)]
mod tests;
