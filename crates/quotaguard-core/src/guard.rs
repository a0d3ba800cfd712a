//! `Guard` = rules + ledger + catalogue (+ budgets and alert settings): what the
//! bindings call. Every method takes `now_ms` so that time is the caller's to set.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use chrono::NaiveDate;
use parking_lot::Mutex;

use crate::catalog::{check_region, Catalog, Site};
use crate::clock::{parse_day, parse_month};
use crate::error::{invalid, thousands, QuotaError, Refusal, Result};
use crate::ledger::memory::Memory;
use crate::ledger::sqlite::{self, Sqlite};
use crate::ledger::{
    AccountOp, AccountRow, Alert, FreeOnlyTarget, GrantArgs, HourRow, Ledger, Local, Reconcile,
    RecordQuery, Release, ReservationRow, ReserveArgs, SettleArgs, SettleOutcome, SpendRule,
    UsageRecord,
};
use crate::money::{Billable, Currency, PriceTable};
use crate::quota::{format_console_figure, parse_console_figure, validity_days, QuotaRow};
use crate::rules::{self, Kind, Policy};

/// The largest token count quotaguard accepts for one call.
pub const MAX_TOKENS: u64 = 1_000_000_000;

pub fn check_tokens(what: &str, n: i128) -> Result<u64> {
    if n < 0 {
        return Err(invalid(format!(
            "{what} must be a non-negative integer, not {n}"
        )));
    }
    if n > MAX_TOKENS as i128 {
        return Err(invalid(format!(
            "{what} {n} is too large (at most {} per call)",
            thousands(MAX_TOKENS)
        )));
    }
    Ok(n as u64)
}

/// Where a guard's ledger lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerUrl {
    Memory,
    Sqlite { path: PathBuf, sync: sqlite::Sync },
    Redis(String),
}

impl LedgerUrl {
    /// `memory://`, `sqlite:///abs/path.db` (`?synchronous=full`), `redis://…`, or a plain path.
    pub fn parse(text: &str) -> Result<Self> {
        let t = text.trim();
        if t.is_empty() {
            return Err(invalid("ledger \"\" is empty"));
        }
        if t == "memory://" || t == ":memory:" {
            return Ok(Self::Memory);
        }
        if t.starts_with("redis://") || t.starts_with("rediss://") {
            return Ok(Self::Redis(t.to_string()));
        }
        let (rest, query) = match t.split_once('?') {
            Some((a, b)) => (a, Some(b)),
            None => (t, None),
        };
        let sync = match query {
            None | Some("synchronous=normal") => sqlite::Sync::Normal,
            Some("synchronous=full") => sqlite::Sync::Full,
            Some(q) => {
                return Err(invalid(format!(
                    "ledger option {q:?} is not synchronous=normal or synchronous=full"
                )))
            }
        };
        let path = if let Some(p) = rest.strip_prefix("sqlite://") {
            if p.is_empty() {
                return Err(invalid(format!("ledger {text:?} names no file")));
            }
            PathBuf::from(p)
        } else if rest.contains("://") {
            return Err(invalid(format!(
                "ledger {text:?} is not memory://, sqlite:///path, redis://host:port/db or a file path"
            )));
        } else {
            PathBuf::from(rest)
        };
        Ok(Self::Sqlite { path, sync })
    }

    /// Hides a password in a URL before it is shown anywhere.
    pub fn redacted(url: &str) -> String {
        match (url.find("://"), url.rfind('@')) {
            (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
            _ => url.to_string(),
        }
    }
}

/// The default ledger file: `$HOME/.quotaguard/ledger.db`.
pub fn default_ledger_path(home: &Path) -> PathBuf {
    home.join(".quotaguard").join("ledger.db")
}

pub fn open_ledger(url: &LedgerUrl, default_dir: Option<&Path>) -> Result<Box<dyn Ledger>> {
    match url {
        LedgerUrl::Memory => Ok(Box::new(Local(Memory::new()))),
        LedgerUrl::Sqlite { path, sync } => {
            if let Some(dir) = default_dir {
                sqlite::create_private_dir(dir).map_err(|e| QuotaError::Ledger {
                    ledger: path.display().to_string(),
                    message: format!(
                        "cannot create directory {:?}: {e}",
                        dir.display().to_string()
                    ),
                })?;
            }
            Ok(Box::new(Local(Sqlite::open(path, *sync)?)))
        }
        LedgerUrl::Redis(u) => Err(QuotaError::Ledger {
            ledger: LedgerUrl::redacted(u),
            message:
                "the Redis ledger is not part of this build yet; use a SQLite file or memory://"
                    .into(),
        }),
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub account: String,
    pub user: String,
    pub workspace: Option<String>,
    pub region: String,
    pub site: Site,
    pub verified: bool,
    pub lease_ms: i64,
}

impl Config {
    pub fn validate(&self) -> Result<()> {
        if self.account.is_empty() {
            return Err(invalid("account \"\" is empty"));
        }
        if self.user.is_empty() {
            return Err(invalid("user \"\" is empty"));
        }
        check_region(&self.region)?;
        if self.lease_ms <= 0 {
            return Err(invalid(format!(
                "lease_seconds {} must be positive",
                self.lease_ms as f64 / 1000.0
            )));
        }
        Ok(())
    }

    pub fn policy(&self) -> Policy {
        Policy {
            region_has_free: self.region == self.site.free_region(),
            verified: self.verified,
        }
    }
}

/// A model's quota as `guard.quota()` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaView {
    pub model: String,
    pub total: u64,
    pub used: u64,
    pub reserved: u64,
    pub remaining: u64,
    pub activated_ms: i64,
    pub expires_ms: i64,
    pub expired: bool,
    pub free_only: bool,
}

impl QuotaView {
    pub fn console(&self) -> String {
        format_console_figure(self.remaining, self.total)
    }
}

/// A sub-limit on what one guard admits while it is active.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BudgetState {
    pub name: Option<String>,
    pub tokens: Option<u64>,
    pub cost: Option<i64>,
    /// Tokens of settled calls.
    pub used: u64,
    /// Cost of settled calls, pico-units (unpriced calls add nothing).
    pub spent: i64,
    /// Worst cases of calls in flight.
    pub held_tokens: u64,
    pub held_cost: i64,
    pub active: bool,
}

impl BudgetState {
    pub fn tokens_left(&self) -> Option<u64> {
        self.tokens
            .map(|t| t.saturating_sub(self.used + self.held_tokens))
    }

    pub fn cost_left(&self) -> Option<i64> {
        self.cost.map(|c| (c - self.spent - self.held_cost).max(0))
    }
}

/// What a reservation holds in budgets, to be given back or charged on settle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BudgetHold {
    pub ids: Vec<u64>,
    pub tokens: u64,
    pub cost: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillLine {
    pub model: String,
    pub calls: u64,
    pub free_tokens: u64,
    pub billable_input_tokens: u64,
    pub billable_output_tokens: u64,
    pub cost: i128,
    pub unpriced_calls: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bill {
    pub period: String,
    pub currency: Currency,
    pub lines: Vec<BillLine>,
    pub total: i128,
    pub charged_models: Vec<String>,
}

pub enum FreeOnlyModels {
    Some(Vec<String>),
    All,
}

pub struct Guard {
    pub config: Config,
    ledger: Box<dyn Ledger>,
    catalog: Arc<Catalog>,
    budgets: Mutex<BTreeMap<u64, BudgetState>>,
    next_budget: AtomicU64,
    /// Quota alert threshold in parts per million; negative: off.
    threshold_ppm: AtomicI64,
    spend_rules: Mutex<Arc<Vec<SpendRule>>>,
}

fn refused(r: Refusal) -> QuotaError {
    QuotaError::Refused(r)
}

impl Guard {
    pub fn new(config: Config, ledger: Box<dyn Ledger>, catalog: Arc<Catalog>) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            ledger,
            catalog,
            budgets: Mutex::new(BTreeMap::new()),
            next_budget: AtomicU64::new(1),
            threshold_ppm: AtomicI64::new(200_000),
            spend_rules: Mutex::new(Arc::new(Vec::new())),
        })
    }

    pub fn ledger_name(&self) -> &str {
        self.ledger.name()
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    fn account(&self) -> &str {
        &self.config.account
    }

    fn prices(&self, model: &str) -> Option<&PriceTable> {
        self.catalog
            .model(model)
            .and_then(|m| m.prices(self.config.site))
    }

    pub fn currency(&self) -> Currency {
        self.config.site.currency()
    }

    fn check_model(model: &str) -> Result<()> {
        if model.trim().is_empty() {
            return Err(invalid(format!("model {model:?} is empty")));
        }
        Ok(())
    }

    pub fn threshold_ppm(&self) -> Option<u32> {
        let v = self.threshold_ppm.load(Ordering::Relaxed);
        (v >= 0).then_some(v as u32)
    }

    pub fn set_threshold_ppm(&self, ppm: Option<u32>) {
        self.threshold_ppm
            .store(ppm.map_or(-1, i64::from), Ordering::Relaxed);
    }

    pub fn spend_rules(&self) -> Arc<Vec<SpendRule>> {
        self.spend_rules.lock().clone()
    }

    pub fn set_spend_rules(&self, rules_: Vec<SpendRule>) {
        *self.spend_rules.lock() = Arc::new(rules_);
    }

    // ---- quota ----

    pub fn grant(
        &self,
        model: &str,
        tokens: Option<u64>,
        activated_ms: Option<i64>,
        valid_days: Option<i64>,
        now_ms: i64,
    ) -> Result<QuotaView> {
        Self::check_model(model)?;
        let info = self.catalog.model(model);
        let total = match (tokens, info) {
            (Some(t), _) => t,
            (None, Some(i)) => i.free_tokens,
            (None, None) => {
                return Err(invalid(format!(
                    "model {model:?} is not in the catalogue: pass tokens= to grant it"
                )))
            }
        };
        let activated = activated_ms.unwrap_or(now_ms);
        let catalog_days = info.map_or(self.catalog.defaults.valid_days, |i| i.valid_days);
        let days = validity_days(activated, catalog_days, valid_days)?;
        self.ledger.grant(&GrantArgs {
            account: self.account(),
            model,
            total,
            activated_ms: activated,
            valid_days: days,
        })?;
        self.quota(model, now_ms)
    }

    fn view(&self, model: String, q: &QuotaRow, reserved: u64, now_ms: i64) -> QuotaView {
        QuotaView {
            remaining: rules::remaining(Some(q), reserved, self.config.policy(), now_ms),
            total: q.total,
            used: q.used,
            reserved,
            activated_ms: q.activated_ms,
            expires_ms: q.expires_ms(),
            expired: q.expired(now_ms),
            free_only: q.free_only,
            model,
        }
    }

    /// A model never granted reads as a zero quota.
    pub fn quota(&self, model: &str, now_ms: i64) -> Result<QuotaView> {
        Self::check_model(model)?;
        Ok(match self.ledger.quota(self.account(), model, now_ms)? {
            Some((q, r)) => self.view(model.to_string(), &q, r, now_ms),
            None => QuotaView {
                model: model.to_string(),
                total: 0,
                used: 0,
                reserved: 0,
                remaining: 0,
                activated_ms: now_ms,
                expires_ms: now_ms,
                expired: false,
                free_only: false,
            },
        })
    }

    pub fn remaining(&self, model: &str, now_ms: i64) -> Result<u64> {
        Ok(self.quota(model, now_ms)?.remaining)
    }

    pub fn quotas(&self, now_ms: i64) -> Result<Vec<QuotaView>> {
        Ok(self
            .ledger
            .quotas(self.account(), now_ms)?
            .into_iter()
            .map(|(m, q, r)| self.view(m, &q, r, now_ms))
            .collect())
    }

    pub fn set_free_only(
        &self,
        models: FreeOnlyModels,
        enable: bool,
        now_ms: i64,
    ) -> Result<Vec<String>> {
        let target_models;
        let target = match &models {
            FreeOnlyModels::All => {
                if !enable {
                    return Err(invalid("\"all\" only enables: disable models by name"));
                }
                FreeOnlyTarget::AllEligible
            }
            FreeOnlyModels::Some(list) => {
                for m in list {
                    Self::check_model(m)?;
                }
                target_models = list.clone();
                FreeOnlyTarget::Models(&target_models)
            }
        };
        self.ledger
            .set_free_only(self.account(), target, enable, self.config.policy(), now_ms)
    }

    /// R12: the console's figure; returns the quota and the alerts it crossed.
    pub fn sync(
        &self,
        model: &str,
        console_text: &str,
        now_ms: i64,
    ) -> Result<(QuotaView, Vec<Alert>)> {
        Self::check_model(model)?;
        let (remaining, total) = parse_console_figure(console_text)?;
        let op = Reconcile::Console { remaining, total };
        let (_, alerts) =
            self.ledger
                .reconcile(self.account(), model, op, self.threshold_ppm(), now_ms)?;
        Ok((self.quota(model, now_ms)?, alerts))
    }

    /// R12: the service answered `AllocationQuota.FreeTierOnly`.
    pub fn mark_depleted(&self, model: &str, now_ms: i64) -> Result<(QuotaView, Vec<Alert>)> {
        Self::check_model(model)?;
        let (_, alerts) = self.ledger.reconcile(
            self.account(),
            model,
            Reconcile::Depleted,
            self.threshold_ppm(),
            now_ms,
        )?;
        Ok((self.quota(model, now_ms)?, alerts))
    }

    // ---- calls ----

    /// The output limit assumed for a call that states none.
    pub fn default_max_output(&self, model: &str) -> u64 {
        self.catalog.default_max_output(model)
    }

    fn hold_budgets(&self, worst: u64) -> Result<BudgetHold> {
        let mut budgets = self.budgets.lock();
        let mut hold = BudgetHold {
            tokens: worst,
            ..Default::default()
        };
        for (id, b) in budgets.iter().filter(|(_, b)| b.active) {
            if let Some(left) = b.tokens_left() {
                if worst > left {
                    return Err(QuotaError::Budget(format!(
                        "budget {} exceeded: the call may use {} tokens, {} of {} left",
                        b.name
                            .as_deref()
                            .map_or_else(|| format!("#{id}"), |n| format!("{n:?}")),
                        thousands(worst),
                        thousands(left),
                        thousands(b.tokens.unwrap_or(0))
                    )));
                }
            }
            hold.ids.push(*id);
        }
        for id in &hold.ids {
            if let Some(b) = budgets.get_mut(id) {
                b.held_tokens += worst;
            }
        }
        Ok(hold)
    }

    /// `cost`: the call's worst-case cost, `None` when it cannot be known (no price).
    fn hold_budget_cost(
        &self,
        hold: &mut BudgetHold,
        model: &str,
        cost: Option<i64>,
    ) -> Result<()> {
        let mut budgets = self.budgets.lock();
        for id in &hold.ids {
            if let Some(b) = budgets.get(id) {
                if let Some(left) = b.cost_left() {
                    let Some(cost) = cost else {
                        return Err(QuotaError::Budget(format!(
                            "budget {} has a cost limit, and {model:?} has no known price: its cost \
                             cannot be bounded (add its prices with catalog=)",
                            b.name
                                .as_deref()
                                .map_or_else(|| format!("#{id}"), |n| format!("{n:?}")),
                        )));
                    };
                    if cost > left {
                        return Err(QuotaError::Budget(format!(
                            "budget {} exceeded: the call may cost {} {}, {} left",
                            b.name
                                .as_deref()
                                .map_or_else(|| format!("#{id}"), |n| format!("{n:?}")),
                            crate::money::format_amount(cost),
                            self.currency(),
                            crate::money::format_amount(left)
                        )));
                    }
                }
            }
        }
        let cost = cost.unwrap_or(0);
        for id in &hold.ids {
            if let Some(b) = budgets.get_mut(id) {
                b.held_cost += cost;
            }
        }
        hold.cost = cost;
        Ok(())
    }

    fn end_hold(&self, hold: &BudgetHold, used: Option<(u64, i64)>) {
        if hold.ids.is_empty() {
            return;
        }
        let mut budgets = self.budgets.lock();
        for id in &hold.ids {
            if let Some(b) = budgets.get_mut(id) {
                b.held_tokens = b.held_tokens.saturating_sub(hold.tokens);
                b.held_cost -= hold.cost;
                if let Some((tokens, cost)) = used {
                    b.used += tokens;
                    b.spent += cost;
                }
            }
        }
    }

    pub fn reserve(
        &self,
        model: &str,
        input_tokens: u64,
        max_output_tokens: u64,
        kind: Kind,
        now_ms: i64,
    ) -> Result<(ReservationRow, BudgetHold)> {
        Self::check_model(model)?;
        let worst = input_tokens + max_output_tokens;
        let mut hold = self.hold_budgets(worst)?;
        let args = ReserveArgs {
            account: self.account(),
            model,
            kind,
            input_tokens,
            worst,
            policy: self.config.policy(),
            now_ms,
            lease_ms: self.config.lease_ms,
        };
        let row = match self.ledger.reserve(&args) {
            Ok(Ok(row)) => row,
            Ok(Err(r)) => {
                self.end_hold(&hold, None);
                return Err(refused(r));
            }
            Err(e) => {
                self.end_hold(&hold, None);
                return Err(e);
            }
        };
        if !hold.ids.is_empty() {
            // Worst-case cost: everything not held from free quota is billed.
            let billable = worst - row.free_part.min(worst);
            let b_in = input_tokens.saturating_sub(row.free_part);
            let cost = self
                .prices(model)
                .map(|p| {
                    p.cost(&Billable {
                        request_input: input_tokens,
                        input: b_in,
                        output: billable - b_in,
                        batch: kind == Kind::Batch,
                        thinking: true,
                        ..Default::default()
                    })
                })
                .transpose()?;
            // Nothing billable: free, whatever the price.
            let cost = if billable == 0 { Some(0) } else { cost };
            if let Err(e) = self.hold_budget_cost(&mut hold, model, cost) {
                self.end_hold(&hold, None);
                self.ledger
                    .release(self.account(), model, row.id, false, now_ms)?;
                return Err(e);
            }
        }
        Ok((row, hold))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn settle(
        &self,
        row: &ReservationRow,
        hold: &BudgetHold,
        input_tokens: u64,
        output_tokens: u64,
        cached_tokens: u64,
        thinking: bool,
        request_id: Option<&str>,
        now_ms: i64,
    ) -> Result<SettleOutcome> {
        if cached_tokens > input_tokens {
            return Err(invalid(format!(
                "cached_tokens {cached_tokens} is more than input_tokens {input_tokens}"
            )));
        }
        let rules_ = self.spend_rules();
        let out = self.ledger.settle(&SettleArgs {
            account: self.account(),
            model: &row.model,
            kind: row.kind,
            reservation: Some(row.id),
            user: &self.config.user,
            workspace: self.config.workspace.as_deref(),
            request_id,
            input_tokens,
            output_tokens,
            cached_tokens,
            thinking,
            policy: self.config.policy(),
            prices: self.prices(&row.model),
            currency: self.currency(),
            now_ms,
            threshold_ppm: self.threshold_ppm(),
            spend_rules: &rules_,
        })?;
        self.end_hold(
            hold,
            Some((input_tokens + output_tokens, out.record.cost.unwrap_or(0))),
        );
        Ok(out)
    }

    pub fn release(
        &self,
        row: &ReservationRow,
        hold: &BudgetHold,
        failed: bool,
        now_ms: i64,
    ) -> Result<Release> {
        self.end_hold(hold, None);
        self.ledger
            .release(self.account(), &row.model, row.id, failed, now_ms)
    }

    // ---- budgets ----

    pub fn open_budget(
        &self,
        name: Option<String>,
        tokens: Option<u64>,
        cost: Option<i64>,
    ) -> Result<u64> {
        if let Some(c) = cost.filter(|c| *c < 0) {
            return Err(invalid(format!(
                "budget cost {} must not be negative",
                crate::money::to_decimal(c)
            )));
        }
        let id = self.next_budget.fetch_add(1, Ordering::Relaxed);
        self.budgets.lock().insert(
            id,
            BudgetState {
                name,
                tokens,
                cost,
                active: true,
                ..Default::default()
            },
        );
        Ok(id)
    }

    pub fn close_budget(&self, id: u64) {
        if let Some(b) = self.budgets.lock().get_mut(&id) {
            b.active = false;
        }
    }

    pub fn budget(&self, id: u64) -> Option<BudgetState> {
        self.budgets.lock().get(&id).cloned()
    }

    /// Forgets a closed budget (calls still in flight then count in no budget).
    pub fn drop_budget(&self, id: u64) {
        let mut b = self.budgets.lock();
        if b.get(&id).is_some_and(|s| !s.active) {
            b.remove(&id);
        }
    }

    // ---- money ----

    pub fn account_state(&self) -> Result<AccountRow> {
        self.ledger.account(self.account())
    }

    pub fn update_account(&self, op: AccountOp) -> Result<AccountRow> {
        if let AccountOp::TopUp(a) = op {
            if a <= 0 {
                return Err(invalid(format!(
                    "top-up amount {} must be positive",
                    crate::money::to_decimal(a)
                )));
            }
        }
        self.ledger.update_account(self.account(), op)
    }

    // ---- records, bills, statistics ----

    pub fn records(&self, mut q: RecordQuery) -> Result<Vec<UsageRecord>> {
        q.account = self.config.account.clone();
        self.ledger.records(&q)
    }

    pub fn bill_days(&self, from: NaiveDate, to: NaiveDate, period: String) -> Result<Bill> {
        let rows = self.ledger.daily(self.account(), from, to)?;
        let mut by_model: BTreeMap<String, BillLine> = BTreeMap::new();
        for r in rows {
            let l = by_model.entry(r.model.clone()).or_insert_with(|| BillLine {
                model: r.model.clone(),
                calls: 0,
                free_tokens: 0,
                billable_input_tokens: 0,
                billable_output_tokens: 0,
                cost: 0,
                unpriced_calls: 0,
            });
            l.calls += r.calls;
            l.free_tokens += r.free_tokens;
            l.billable_input_tokens += r.billable_input_tokens;
            l.billable_output_tokens += r.billable_output_tokens;
            l.cost = l
                .cost
                .checked_add(r.cost)
                .ok_or_else(|| invalid("bill total overflows"))?;
            l.unpriced_calls += r.unpriced_calls;
        }
        let lines: Vec<BillLine> = by_model.into_values().collect();
        let total = lines.iter().try_fold(0i128, |a, l| a.checked_add(l.cost));
        let charged_models = lines
            .iter()
            .filter(|l| l.cost > 0 || l.unpriced_calls > 0)
            .map(|l| l.model.clone())
            .collect();
        Ok(Bill {
            period,
            currency: self.currency(),
            total: total.ok_or_else(|| invalid("bill total overflows"))?,
            lines,
            charged_models,
        })
    }

    pub fn bill_month(&self, month: &str) -> Result<Bill> {
        let (from, to) = parse_month(month)?;
        self.bill_days(from, to, month.trim().to_string())
    }

    pub fn bill_day(&self, day: &str) -> Result<Bill> {
        let d = parse_day(day)?;
        self.bill_days(d, d.succ_opt().unwrap_or(d), d.to_string())
    }

    pub fn stats(&self, model: Option<&str>, since_ms: Option<i64>) -> Result<Vec<HourRow>> {
        self.ledger.hourly(self.account(), model, since_ms)
    }

    pub fn check_spend(&self, now_ms: i64) -> Result<Vec<crate::ledger::Alert>> {
        let rules_ = self.spend_rules();
        self.ledger.check_spend(self.account(), &rules_, now_ms)
    }

    pub fn compact(&self, before_ms: i64) -> Result<u64> {
        self.ledger.compact(self.account(), before_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_urls() {
        assert_eq!(LedgerUrl::parse("memory://").unwrap(), LedgerUrl::Memory);
        assert_eq!(
            LedgerUrl::parse("sqlite:///tmp/x.db").unwrap(),
            LedgerUrl::Sqlite {
                path: "/tmp/x.db".into(),
                sync: sqlite::Sync::Normal
            }
        );
        assert_eq!(
            LedgerUrl::parse("x.db?synchronous=full").unwrap(),
            LedgerUrl::Sqlite {
                path: "x.db".into(),
                sync: sqlite::Sync::Full
            }
        );
        assert!(LedgerUrl::parse("ftp://x").is_err());
        assert!(LedgerUrl::parse("x.db?fast=yes")
            .unwrap_err()
            .to_string()
            .contains("fast=yes"));
        assert_eq!(
            LedgerUrl::redacted("redis://:secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
    }

    #[test]
    fn token_counts_are_checked() {
        assert_eq!(check_tokens("input_tokens", 5).unwrap(), 5);
        assert!(check_tokens("input_tokens", -1)
            .unwrap_err()
            .to_string()
            .contains("-1"));
        assert!(check_tokens("input_tokens", 10i128.pow(30))
            .unwrap_err()
            .to_string()
            .contains("too large"));
    }
}
