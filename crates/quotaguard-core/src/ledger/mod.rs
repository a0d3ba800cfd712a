//! The ledger: one trait of atomic primitives over the shared state of an
//! account's quotas, reservations, records and aggregates.
//!
//! Each primitive of [`Ledger`] is one atomic step whose inputs are plain data,
//! so a server-side implementation (a Redis script) can run it whole. The local
//! backends ([`memory`], [`sqlite`]) share one implementation of the steps,
//! [`Local`], written against [`Tx`]: the reads and writes one step needs. The
//! decisions themselves come from [`crate::rules`].
use chrono::NaiveDate;

use crate::clock::{cst_day, cst_day_start, hour_start, system_now_ms, DAY_MS};
use crate::error::{QuotaError, Refusal, Result};
use crate::money::{Billable, Currency, PriceTable};
use crate::quota::QuotaRow;
use crate::rules::{self, Admission, AlertKind, CostType, Kind, Policy};

pub mod memory;
pub mod sqlite;

/// A call's worst case held against the quota until settled, released or expired (R9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationRow {
    pub id: i64,
    pub account: String,
    pub model: String,
    pub kind: Kind,
    pub input_tokens: u64,
    pub worst: u64,
    /// The part of `worst` held from free quota.
    pub free_part: u64,
    pub created_ms: i64,
    pub expires_ms: i64,
}

/// One settled call (R11). Append-only.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// A high-spending rule: alert when the previous CST day's bill exceeds `limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendRule {
    /// `None`: the whole account.
    pub model: Option<String>,
    pub limit: i64,
}

pub struct GrantArgs<'a> {
    pub account: &'a str,
    pub model: &'a str,
    pub total: u64,
    pub activated_ms: i64,
    pub valid_days: u32,
}

pub struct ReserveArgs<'a> {
    pub account: &'a str,
    pub model: &'a str,
    pub kind: Kind,
    pub input_tokens: u64,
    pub worst: u64,
    pub policy: Policy,
    pub now_ms: i64,
    pub lease_ms: i64,
}

pub struct SettleArgs<'a> {
    pub account: &'a str,
    pub model: &'a str,
    pub kind: Kind,
    /// The reservation being settled; `None` records usage that had none.
    pub reservation: Option<i64>,
    pub user: &'a str,
    pub workspace: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_tokens: u64,
    pub thinking: bool,
    pub policy: Policy,
    pub prices: Option<&'a PriceTable>,
    pub currency: Currency,
    pub now_ms: i64,
    pub threshold_ppm: Option<u32>,
    pub spend_rules: &'a [SpendRule],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettleOutcome {
    pub record: UsageRecord,
    /// The reservation had outlived its lease (its tokens had already returned).
    pub lease_expired: bool,
    pub alerts: Vec<Alert>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    Released,
    /// Already settled or released (or expired and cleaned up).
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconcile {
    /// The console's figure (R12).
    Console { remaining: u64, total: u64 },
    /// The service answered `AllocationQuota.FreeTierOnly` (R12).
    Depleted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountOp {
    SetBalance(i64),
    TopUp(i64),
    MarkOverdue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeOnlyTarget<'a> {
    Models(&'a [String]),
    /// Every eligible model whose switch was never set.
    AllEligible,
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

/// The atomic primitives every ledger offers. Each call is one atomic step.
pub trait Ledger: Send + Sync {
    /// Where the ledger lives, for messages (a path or URL, never a secret).
    fn name(&self) -> &str;
    fn grant(&self, a: &GrantArgs<'_>) -> Result<QuotaRow>;
    /// The quota and the free tokens held by live reservations.
    fn quota(&self, account: &str, model: &str, now_ms: i64) -> Result<Option<(QuotaRow, u64)>>;
    fn quotas(&self, account: &str, now_ms: i64) -> Result<Vec<(String, QuotaRow, u64)>>;
    /// R5: changes the switch where the rules allow; returns the models changed.
    fn set_free_only(
        &self,
        account: &str,
        target: FreeOnlyTarget<'_>,
        enable: bool,
        policy: Policy,
        now_ms: i64,
    ) -> Result<Vec<String>>;
    /// R12 reconciliation; returns the quota alerts it crossed (R10).
    fn reconcile(
        &self,
        account: &str,
        model: &str,
        op: Reconcile,
        threshold_ppm: Option<u32>,
        now_ms: i64,
    ) -> Result<(QuotaRow, Vec<Alert>)>;
    fn reserve(&self, a: &ReserveArgs<'_>) -> Result<std::result::Result<ReservationRow, Refusal>>;
    fn settle(&self, a: &SettleArgs<'_>) -> Result<SettleOutcome>;
    fn release(
        &self,
        account: &str,
        model: &str,
        id: i64,
        failed: bool,
        now_ms: i64,
    ) -> Result<Release>;
    fn account(&self, account: &str) -> Result<AccountRow>;
    fn update_account(&self, account: &str, op: AccountOp) -> Result<AccountRow>;
    fn records(&self, q: &RecordQuery) -> Result<Vec<UsageRecord>>;
    /// Daily totals for CST days in `[from, to)`.
    fn daily(&self, account: &str, from: NaiveDate, to: NaiveDate) -> Result<Vec<DailyRow>>;
    fn hourly(
        &self,
        account: &str,
        model: Option<&str>,
        since_ms: Option<i64>,
    ) -> Result<Vec<HourRow>>;
    /// Evaluates high-spending rules for the CST day of `now_ms` (R10).
    fn check_spend(&self, account: &str, rules: &[SpendRule], now_ms: i64) -> Result<Vec<Alert>>;
    /// Drops records older than `before_ms`; daily and hourly totals stay.
    fn compact(&self, account: &str, before_ms: i64) -> Result<u64>;
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
    fn insert_reservation(&mut self, r: &ReservationRow) -> Result<i64>;
    fn reservation(
        &mut self,
        account: &str,
        model: &str,
        id: i64,
    ) -> Result<Option<ReservationRow>>;
    fn delete_reservation(&mut self, account: &str, model: &str, id: i64) -> Result<()>;
    fn account(&mut self, account: &str) -> Result<AccountRow>;
    fn put_account(&mut self, account: &str, a: &AccountRow) -> Result<()>;
    /// Appends the record (assigning its id) and adds it to the daily totals.
    fn append_record(&mut self, r: &mut UsageRecord) -> Result<()>;
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
    fn compact(&mut self, account: &str, before_ms: i64) -> Result<u64>;
}

/// A local store that runs a closure as one atomic step.
pub trait Backend: Send + Sync {
    fn name(&self) -> &str;
    fn write<R>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<R>) -> Result<R>;
    fn read<R>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<R>) -> Result<R> {
        self.write(f)
    }
}

/// The one implementation of the atomic steps for local backends.
pub struct Local<B: Backend>(pub B);

fn spend_key(rule: &SpendRule, day: NaiveDate) -> String {
    match &rule.model {
        Some(m) => format!("daily_spend:{m}:{day}"),
        None => format!("daily_spend:*:{day}"),
    }
}

/// R10 high-spending rules for the CST day of `now_ms`: evaluated once per day and rule.
fn spend_alerts(
    tx: &mut dyn Tx,
    account: &str,
    rules_: &[SpendRule],
    now_ms: i64,
) -> Result<Vec<Alert>> {
    let mut out = Vec::new();
    let today = cst_day(now_ms);
    let yesterday = today.pred_opt().unwrap_or(today);
    for rule in rules_ {
        let key = spend_key(rule, today);
        // Marked as evaluated whether it fires or not: at most one per day.
        if !tx.fire_once(account, &key, now_ms)? {
            continue;
        }
        let cost = tx.day_cost(account, yesterday, rule.model.as_deref())?;
        if cost > i128::from(rule.limit) {
            out.push(Alert {
                kind: AlertKind::DailySpend,
                model: rule.model.clone(),
                remaining: 0,
                total: 0,
                threshold_ppm: None,
                amount: Some(cost),
                limit: Some(rule.limit),
                day: Some(yesterday),
                time_ms: now_ms,
            });
        }
    }
    Ok(out)
}

fn quota_alerts(
    tx: &mut dyn Tx,
    account: &str,
    model: &str,
    q: &QuotaRow,
    threshold_ppm: Option<u32>,
    now_ms: i64,
) -> Result<Vec<Alert>> {
    let mut out = Vec::new();
    if q.expired(now_ms) {
        return Ok(out);
    }
    for kind in rules::quota_alerts(q.total, q.left(), threshold_ppm) {
        let key = match kind {
            AlertKind::QuotaLow => format!(
                "quota_low:{model}:{}:{}",
                q.activated_ms,
                threshold_ppm.unwrap_or(0)
            ),
            _ => format!("{}:{model}:{}", kind.as_str(), q.activated_ms),
        };
        if tx.fire_once(account, &key, now_ms)? {
            out.push(Alert {
                kind,
                model: Some(model.to_string()),
                remaining: q.left(),
                total: q.total,
                threshold_ppm,
                amount: None,
                limit: None,
                day: None,
                time_ms: now_ms,
            });
        }
    }
    Ok(out)
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

    fn quota(&self, account: &str, model: &str, now_ms: i64) -> Result<Option<(QuotaRow, u64)>> {
        self.0.read(|tx| {
            let Some(q) = tx.quota(account, model)? else {
                return Ok(None);
            };
            Ok(Some((q, tx.reserved(account, model, now_ms, None)?)))
        })
    }

    fn quotas(&self, account: &str, now_ms: i64) -> Result<Vec<(String, QuotaRow, u64)>> {
        self.0.read(|tx| {
            let mut out = Vec::new();
            for m in tx.quota_models(account)? {
                if let Some(q) = tx.quota(account, &m)? {
                    let r = tx.reserved(account, &m, now_ms, None)?;
                    out.push((m, q, r));
                }
            }
            Ok(out)
        })
    }

    fn set_free_only(
        &self,
        account: &str,
        target: FreeOnlyTarget<'_>,
        enable: bool,
        policy: Policy,
        now_ms: i64,
    ) -> Result<Vec<String>> {
        self.0.write(|tx| {
            let all = matches!(target, FreeOnlyTarget::AllEligible);
            let models = match target {
                FreeOnlyTarget::Models(m) => m.to_vec(),
                FreeOnlyTarget::AllEligible => tx.quota_models(account)?,
            };
            // Decide every model first: a refused change changes nothing.
            let mut changes = Vec::new();
            for m in &models {
                let q = tx.quota(account, m)?;
                // The switch looks at what is unused, as the console does: tokens merely
                // held by calls in flight still count as left.
                let left = rules::remaining(q.as_ref(), 0, policy, now_ms);
                if all {
                    if q.is_some_and(|q| !q.configured) && left > 0 {
                        changes.push((m.clone(), q.expect("checked above")));
                    }
                    continue;
                }
                rules::check_free_only_change(m, enable, left)?;
                let q = q.ok_or_else(|| {
                    QuotaError::Rejected(format!(
                        "cannot change Free Quota Only for {m:?}: it has no free quota"
                    ))
                })?;
                changes.push((m.clone(), q));
            }
            let mut changed = Vec::new();
            for (m, mut q) in changes {
                q.free_only = enable;
                q.configured = true;
                tx.put_quota(account, &m, &q)?;
                changed.push(m);
            }
            Ok(changed)
        })
    }

    fn reconcile(
        &self,
        account: &str,
        model: &str,
        op: Reconcile,
        threshold_ppm: Option<u32>,
        now_ms: i64,
    ) -> Result<(QuotaRow, Vec<Alert>)> {
        self.0.write(|tx| {
            let q = tx.quota(account, model)?;
            let q = match (op, q) {
                (Reconcile::Console { remaining, total }, Some(mut q)) => {
                    q.total = total;
                    q.used = total - remaining;
                    q
                }
                (Reconcile::Console { remaining, total }, None) => QuotaRow {
                    total,
                    used: total - remaining,
                    activated_ms: now_ms,
                    valid_days: crate::quota::CUTOVER_DAYS,
                    free_only: false,
                    configured: false,
                },
                (Reconcile::Depleted, Some(mut q)) => {
                    q.used = q.total;
                    q
                }
                (Reconcile::Depleted, None) => QuotaRow {
                    total: 0,
                    used: 0,
                    activated_ms: now_ms,
                    valid_days: crate::quota::CUTOVER_DAYS,
                    free_only: false,
                    configured: false,
                },
            };
            tx.put_quota(account, model, &q)?;
            let alerts = quota_alerts(tx, account, model, &q, threshold_ppm, now_ms)?;
            Ok((q, alerts))
        })
    }

    fn reserve(&self, a: &ReserveArgs<'_>) -> Result<std::result::Result<ReservationRow, Refusal>> {
        self.0.write(|tx| {
            let q = tx.quota(a.account, a.model)?;
            let overdue = tx.account(a.account)?.overdue;
            let reserved = tx.reserved(a.account, a.model, a.now_ms, None)?;
            match rules::admit(
                a.model,
                q.as_ref(),
                reserved,
                overdue,
                a.policy,
                a.kind,
                a.worst,
                a.now_ms,
            ) {
                Admission::Refuse(r) => {
                    let d = StatsDelta {
                        refusals: 1,
                        ..Default::default()
                    };
                    tx.bump_hour(a.account, a.model, a.kind, hour_start(a.now_ms), &d)?;
                    Ok(Err(r))
                }
                Admission::Admit { free_part } => {
                    let mut row = ReservationRow {
                        id: 0,
                        account: a.account.to_string(),
                        model: a.model.to_string(),
                        kind: a.kind,
                        input_tokens: a.input_tokens,
                        worst: a.worst,
                        free_part,
                        created_ms: a.now_ms,
                        expires_ms: a.now_ms.saturating_add(a.lease_ms),
                    };
                    row.id = tx.insert_reservation(&row)?;
                    Ok(Ok(row))
                }
            }
        })
    }

    fn settle(&self, a: &SettleArgs<'_>) -> Result<SettleOutcome> {
        self.0.write(|tx| {
            let mut lease_expired = false;
            let mut overrun = false;
            if let Some(id) = a.reservation {
                match tx.reservation(a.account, a.model, id)? {
                    Some(r) => {
                        lease_expired = r.expires_ms <= a.now_ms;
                        overrun = a.input_tokens + a.output_tokens > r.worst;
                        tx.delete_reservation(a.account, a.model, id)?;
                    }
                    None => {
                        return Err(QuotaError::Rejected(format!(
                            "reservation {id} is already settled or released"
                        )))
                    }
                }
            }
            let mut q = tx.quota(a.account, a.model)?;
            // Within its worst case a call draws on its own hold and leaves the others'
            // alone. Past it, the record tells the truth (R9): the service gave free
            // tokens up to what remained, whoever had reserved them.
            let others = if overrun {
                0
            } else {
                tx.reserved(a.account, a.model, a.now_ms, a.reservation)?
            };
            let cap = rules::settle_cap(q.as_ref(), others, a.policy, a.kind, a.now_ms);
            let split = rules::split(a.input_tokens, a.output_tokens, cap);
            let billable = Billable {
                request_input: a.input_tokens,
                input: split.billable_input,
                output: split.billable_output,
                // Free quota covers cached input first: the bill never under-states.
                cached_input: a
                    .cached_tokens
                    .saturating_sub(a.input_tokens - split.billable_input),
                thinking: a.thinking,
                batch: a.kind == Kind::Batch,
            };
            let has_bill = split.billable_input + split.billable_output > 0;
            let cost = match (has_bill, a.prices) {
                (false, _) => Some(0),
                (true, Some(p)) => Some(p.cost(&billable)?),
                (true, None) => None,
            };
            let mut alerts = Vec::new();
            if let Some(qr) = q.as_mut() {
                qr.used += split.free;
                tx.put_quota(a.account, a.model, qr)?;
                alerts.extend(quota_alerts(
                    tx,
                    a.account,
                    a.model,
                    qr,
                    a.threshold_ppm,
                    a.now_ms,
                )?);
            }
            let mut record = UsageRecord {
                id: 0,
                time_ms: a.now_ms,
                account: a.account.to_string(),
                user: a.user.to_string(),
                workspace: a.workspace.map(str::to_string),
                model: a.model.to_string(),
                kind: a.kind,
                request_id: a.request_id.map(str::to_string),
                input_tokens: a.input_tokens,
                output_tokens: a.output_tokens,
                cached_tokens: a.cached_tokens,
                thinking: a.thinking,
                free_tokens: split.free,
                billable_input_tokens: split.billable_input,
                billable_output_tokens: split.billable_output,
                cost,
                currency: a.currency,
                cost_type: CostType::of(&split, a.prices.is_some()),
            };
            tx.append_record(&mut record)?;
            let d = StatsDelta {
                calls: 1,
                input_tokens: a.input_tokens,
                output_tokens: a.output_tokens,
                ..Default::default()
            };
            tx.bump_hour(a.account, a.model, a.kind, hour_start(a.now_ms), &d)?;
            // R7: pay-as-you-go charges draw on a tracked balance.
            if let Some(c) = cost.filter(|c| *c > 0) {
                let mut acct = tx.account(a.account)?;
                if let Some(b) = acct.balance {
                    let nb = b.checked_sub(c).ok_or_else(|| {
                        QuotaError::Invalid(format!("balance {b} minus cost {c} overflows"))
                    })?;
                    acct.balance = Some(nb);
                    if nb < 0 {
                        acct.overdue = true;
                    }
                    tx.put_account(a.account, &acct)?;
                }
            }
            if !a.spend_rules.is_empty() {
                alerts.extend(spend_alerts(tx, a.account, a.spend_rules, a.now_ms)?);
            }
            Ok(SettleOutcome {
                record,
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
        now_ms: i64,
    ) -> Result<Release> {
        self.0.write(|tx| {
            let Some(r) = tx.reservation(account, model, id)? else {
                return Ok(Release::Unknown);
            };
            tx.delete_reservation(account, model, id)?;
            if failed {
                let d = StatsDelta {
                    failures: 1,
                    ..Default::default()
                };
                tx.bump_hour(account, &r.model, r.kind, hour_start(now_ms), &d)?;
            }
            Ok(Release::Released)
        })
    }

    fn account(&self, account: &str) -> Result<AccountRow> {
        self.0.read(|tx| tx.account(account))
    }

    fn update_account(&self, account: &str, op: AccountOp) -> Result<AccountRow> {
        self.0.write(|tx| {
            let mut a = tx.account(account)?;
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
            tx.put_account(account, &a)?;
            Ok(a)
        })
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

    fn check_spend(&self, account: &str, rules_: &[SpendRule], now_ms: i64) -> Result<Vec<Alert>> {
        if rules_.is_empty() {
            return Ok(Vec::new());
        }
        self.0.write(|tx| spend_alerts(tx, account, rules_, now_ms))
    }

    fn compact(&self, account: &str, before_ms: i64) -> Result<u64> {
        self.0.write(|tx| tx.compact(account, before_ms))
    }
}

/// CST days `[from, to)` as epoch-millisecond bounds.
pub fn day_bounds(from: NaiveDate, to: NaiveDate) -> (i64, i64) {
    (cst_day_start(from), cst_day_start(to))
}

/// A fresh positive 63-bit id without a shared counter: a random 31-bit prefix per
/// process, then a counter, so ids rise in call order within a process and two
/// processes almost never meet (a clash is retried by the caller).
pub fn fresh_id() -> i64 {
    use std::hash::{BuildHasher, RandomState};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| {
        RandomState::new().hash_one((std::process::id(), system_now_ms())) & 0x7fff_ffff
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    ((prefix << 32).wrapping_add(n) & 0x7fff_ffff_ffff_ffff) as i64
}

/// Reservations that expired more than a day ago are deleted when a ledger opens.
pub const STALE_RESERVATION_MS: i64 = DAY_MS;

#[cfg(test)]
mod tests;
