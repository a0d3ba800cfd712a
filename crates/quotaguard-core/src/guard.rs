//! `Guard` = rules + ledger + catalogue (+ budgets and alert settings): what the
//! bindings call. Every method takes `now_ms` so that time is the caller's to set.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use chrono::NaiveDate;
use parking_lot::Mutex;

use crate::catalog::{check_region, Catalog, Site};
use crate::clock::{check_time, cst_day, parse_day, parse_month, DAY_MS};
use crate::config::{check_name, SpendRule};
use crate::error::{invalid, thousands, QuotaError, RefusalReason, Result};
use crate::ledger::{
    fresh_id, marks_reached, AccountOp, AccountRow, Alert, AlertMark, Commit, GrantArgs, Hold,
    HoldRequest, HourRow, Ledger, Now, Reconcile, RecordQuery, Release, ReservationRow, Settled,
    TakeRequest, Taken, UsageRecord,
};
use crate::money::{Billable, Currency, PriceTable};
use crate::quota::{format_console_figure, parse_console_figure, validity_days, QuotaRow};
use crate::rules::{self, Admission, AlertKind, CostType, Kind, Policy};

/// The largest token count quotaguard accepts: for one call, and for a quota (a grant
/// or a console figure).
pub const MAX_TOKENS: u64 = 1_000_000_000;

/// What a `BudgetExceeded` message says after the figures.
const BUDGET_FIX: &str =
    "It was not sent; to go on:\n  - lower max_tokens (the worst case is what \
                          must fit), or give the budget a higher limit";

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
        check_name("account", &self.account)?;
        check_name("user", &self.user)?;
        if let Some(w) = &self.workspace {
            check_name("workspace", w)?;
        }
        check_region(&self.region)?;
        crate::config::lease_ms(self.lease_ms as f64 / 1000.0)?;
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

/// R17: where a model's free quota is heading at its recent burn rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Forecast {
    pub model: String,
    pub remaining: u64,
    /// Free tokens used per hour over the window.
    pub burn_per_hour: f64,
    /// When the quota runs out at that rate, if before it expires.
    pub runs_out_ms: Option<i64>,
    /// When the quota expires (`None`: no quota).
    pub expires_ms: Option<i64>,
    /// Free tokens that will expire unused at that rate.
    pub unused_at_expiry: u64,
    pub window_ms: i64,
}

impl Forecast {
    /// From the quota now and the free tokens burned in the last `window_ms`.
    pub fn new(q: &QuotaView, burned: u64, window_ms: i64, now_ms: i64) -> Self {
        let granted = q.total > 0;
        let burn_per_hour = burned as f64 * 3_600_000.0 / window_ms as f64;
        let until_expiry_ms = (q.expires_ms - now_ms).max(0);
        let (runs_out_ms, unused_at_expiry) = if q.remaining == 0 || !granted {
            (None, 0)
        } else if burned == 0 {
            (None, q.remaining)
        } else {
            // Integer arithmetic in ms: tokens * window / burned.
            let to_empty = (u128::from(q.remaining) * window_ms as u128 / u128::from(burned))
                .min(i64::MAX as u128) as i64;
            if to_empty < until_expiry_ms {
                (Some(now_ms + to_empty), 0)
            } else {
                let burnable =
                    u128::from(burned) * until_expiry_ms as u128 / window_ms.max(1) as u128;
                (
                    None,
                    q.remaining
                        .saturating_sub(burnable.min(u64::MAX as u128) as u64),
                )
            }
        };
        Self {
            model: q.model.clone(),
            remaining: q.remaining,
            burn_per_hour,
            runs_out_ms,
            expires_ms: granted.then_some(q.expires_ms),
            unused_at_expiry,
            window_ms,
        }
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

/// What the service reported for one call (R9, R11).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Input tokens that hit a cache.
    pub cached_tokens: u64,
    /// Input tokens that created an explicit cache.
    pub cache_write_tokens: u64,
    /// The cache hits were explicit-cache hits.
    pub explicit_cache: bool,
    /// The output was produced in thinking mode (priced as reasoning).
    pub thinking: bool,
    /// The real usage never arrived: this is the call's worst case (R9).
    pub in_doubt: bool,
}

/// Which models a Free Quota Only change names (R5).
pub enum FreeOnlyTarget {
    Models(Vec<String>),
    /// Every eligible model whose switch was never set ("enable for all").
    AllEligible,
}

pub struct Guard {
    pub config: Config,
    ledger: Box<dyn Ledger>,
    catalog: Arc<Catalog>,
    budgets: Mutex<BTreeMap<u64, BudgetState>>,
    next_budget: AtomicU64,
    /// Quota alert thresholds in parts per million, highest first; empty: off.
    thresholds: Mutex<Arc<Vec<u32>>>,
    /// How long before its expiry a quota with tokens left alerts; negative: off.
    expiry_alert_ms: AtomicI64,
    spend_rules: Mutex<Arc<Vec<SpendRule>>>,
    /// The CST day (days since the epoch) whose spend rules this guard last evaluated.
    spend_day: AtomicI64,
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
            thresholds: Mutex::new(Arc::new(vec![200_000])),
            expiry_alert_ms: AtomicI64::new(7 * DAY_MS),
            spend_rules: Mutex::new(Arc::new(Vec::new())),
            spend_day: AtomicI64::new(i64::MIN),
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

    /// R13: the prices of `model` for this guard's site, in the region it calls.
    fn prices(&self, model: &str) -> Option<&PriceTable> {
        self.catalog
            .model(model)
            .and_then(|m| m.prices(self.config.site, &self.config.region))
    }

    pub fn currency(&self) -> Currency {
        self.config.site.currency()
    }

    fn check_model(model: &str) -> Result<()> {
        check_name("model", model)
    }

    /// The quota alert thresholds (R10), parts per million, highest first.
    pub fn thresholds(&self) -> Arc<Vec<u32>> {
        self.thresholds.lock().clone()
    }

    /// Sets the thresholds: each fires once per grant; empty switches quota alerts off.
    pub fn set_thresholds(&self, mut ppm: Vec<u32>) {
        ppm.sort_unstable_by(|a, b| b.cmp(a));
        ppm.dedup();
        *self.thresholds.lock() = Arc::new(ppm);
    }

    /// The one-threshold form: the highest threshold, the first to fire.
    pub fn threshold_ppm(&self) -> Option<u32> {
        self.thresholds().first().copied()
    }

    pub fn set_threshold_ppm(&self, ppm: Option<u32>) {
        self.set_thresholds(ppm.into_iter().collect());
    }

    /// Days before expiry at which a quota with tokens left alerts; `None`: off.
    pub fn expiry_alert_days(&self) -> Option<u32> {
        let v = self.expiry_alert_ms.load(Ordering::Relaxed);
        (v >= 0).then(|| u32::try_from(v / DAY_MS).unwrap_or(u32::MAX))
    }

    pub fn set_expiry_alert_days(&self, days: Option<u32>) -> Result<()> {
        if let Some(d) = days.filter(|d| *d > 3650) {
            return Err(invalid(format!(
                "expiry_alert_days {d} is more than ten years"
            )));
        }
        let ms = days.map_or(-1, |d| i64::from(d) * DAY_MS);
        self.expiry_alert_ms.store(ms, Ordering::Relaxed);
        Ok(())
    }

    pub fn spend_rules(&self) -> Arc<Vec<SpendRule>> {
        self.spend_rules.lock().clone()
    }

    pub fn set_spend_rules(&self, rules_: Vec<SpendRule>) {
        *self.spend_rules.lock() = Arc::new(rules_);
        self.spend_day.store(i64::MIN, Ordering::Relaxed);
    }

    // ---- quota ----

    pub fn grant(
        &self,
        model: &str,
        tokens: Option<u64>,
        activated_ms: Option<i64>,
        valid_days: Option<i64>,
        now: Now,
    ) -> Result<QuotaView> {
        Self::check_model(model)?;
        let info = self.catalog.model(model);
        let total = match (tokens, info) {
            (Some(t), _) => t,
            (None, Some(i)) => i.free_tokens,
            (None, None) => {
                return Err(invalid(format!(
                    "model {model:?} is not in the catalogue{}: pass tokens= to grant it",
                    self.catalog.did_you_mean(model)
                )))
            }
        };
        let activated = check_time("activated_at", activated_ms.unwrap_or(now.ms()))?;
        let catalog_days = info.map_or(self.catalog.defaults.valid_days, |i| i.valid_days);
        let days = validity_days(activated, catalog_days, valid_days)?;
        self.ledger.grant(&GrantArgs {
            account: self.account(),
            model,
            total,
            activated_ms: activated,
            valid_days: days,
        })?;
        self.quota(model, now)
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
    pub fn quota(&self, model: &str, now: Now) -> Result<QuotaView> {
        Self::check_model(model)?;
        let now_ms = now.ms();
        Ok(match self.ledger.quota(self.account(), model, now)? {
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

    pub fn remaining(&self, model: &str, now: Now) -> Result<u64> {
        Ok(self.quota(model, now)?.remaining)
    }

    pub fn quotas(&self, now: Now) -> Result<Vec<QuotaView>> {
        Ok(self
            .ledger
            .quotas(self.account(), now)?
            .into_iter()
            .map(|(m, q, r)| self.view(m, &q, r, now.ms()))
            .collect())
    }

    /// R5: decides every model first (a refused change changes nothing), then sets
    /// the switches; returns the models changed.
    pub fn set_free_only(
        &self,
        target: FreeOnlyTarget,
        enable: bool,
        now: Now,
    ) -> Result<Vec<String>> {
        let policy = self.config.policy();
        let models = match target {
            FreeOnlyTarget::AllEligible => {
                if !enable {
                    return Err(invalid("\"all\" only enables: disable models by name"));
                }
                self.ledger
                    .quotas(self.account(), now)?
                    .into_iter()
                    .filter(|(_, q, _)| {
                        // The switch looks at what is unused, as the console does.
                        !q.configured && rules::remaining(Some(q), 0, policy, now.ms()) > 0
                    })
                    .map(|(m, _, _)| m)
                    .collect()
            }
            FreeOnlyTarget::Models(list) => {
                for m in &list {
                    Self::check_model(m)?;
                    let q = self.ledger.quota(self.account(), m, now)?.map(|(q, _)| q);
                    let left = rules::remaining(q.as_ref(), 0, policy, now.ms());
                    rules::check_free_only_change(m, enable, left)?;
                    if q.is_none() {
                        return Err(QuotaError::Rejected(format!(
                            "cannot change Free Quota Only for {m:?}: it has no free quota"
                        )));
                    }
                }
                list
            }
        };
        self.ledger.set_free_only(self.account(), &models, enable)
    }

    /// The quota alerts of a model's grant as marks (R10): `quota_low` at the threshold,
    /// `quota_depleted` at zero, each once per grant across every process. They depend
    /// on the grant (total, activation, expiry), not on what is left.
    pub fn alert_marks(&self, q: &QuotaRow, now_ms: i64) -> Vec<AlertMark> {
        if q.expired(now_ms) || q.total == 0 {
            return Vec::new();
        }
        let mark = |kind, at_least, at_or_below, threshold_ppm| AlertMark {
            kind,
            at_least,
            at_or_below,
            total: q.total,
            activated_ms: q.activated_ms,
            threshold_ppm,
        };
        let thresholds = self.thresholds();
        let mut marks = Vec::with_capacity(thresholds.len() + 2);
        for &ppm in thresholds.iter() {
            let at = rules::low_mark(q.total, ppm);
            marks.push(mark(AlertKind::QuotaLow, 0, at, Some(ppm)));
        }
        marks.push(mark(AlertKind::QuotaDepleted, 0, 0, None));
        // Expiring: within the window before expiry, while any free token is left.
        let window = self.expiry_alert_ms.load(Ordering::Relaxed);
        if window >= 0 && q.expires_ms().saturating_sub(now_ms) <= window {
            marks.push(mark(AlertKind::QuotaExpiring, 1, u64::MAX, None));
        }
        marks
    }

    /// Fires the quota alerts every model's quota has reached now (R10): for processes
    /// that make no calls, and for expiry, which comes with time rather than with use.
    pub fn check_quota_alerts(&self, now: Now) -> Result<Vec<Alert>> {
        let mut out = Vec::new();
        for (model, q, _) in self.ledger.quotas(self.account(), now)? {
            let marks = self.alert_marks(&q, now.ms());
            let reached: Vec<&AlertMark> = marks_reached(&marks, q.left()).collect();
            if reached.is_empty() {
                continue;
            }
            let keys: Vec<String> = reached.iter().map(|m| m.key(&model)).collect();
            let fired = self.ledger.fire_once(self.account(), &keys, now.ms())?;
            out.extend(
                reached
                    .into_iter()
                    .zip(fired)
                    .filter(|(_, f)| *f)
                    .map(|(m, _)| m.alert(&model, q.left(), now.ms())),
            );
        }
        Ok(out)
    }

    // ---- the kill switch (R15) ----

    /// Blocks every call of every guard on this ledger and account, from its next call.
    pub fn block(&self, reason: &str) -> Result<()> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(invalid("a block needs a reason, not \"\""));
        }
        if reason.chars().count() > 1000 || reason.chars().any(char::is_control) {
            return Err(invalid(format!(
                "block reason {:?} must be one line of at most 1,000 characters",
                reason.chars().take(40).collect::<String>()
            )));
        }
        self.ledger.set_blocked(self.account(), Some(reason))
    }

    pub fn unblock(&self) -> Result<()> {
        self.ledger.set_blocked(self.account(), None)
    }

    /// The reason of the block, while the ledger is blocked.
    pub fn blocked(&self) -> Result<Option<String>> {
        self.ledger.blocked(self.account())
    }

    // ---- beyond the console: fallback (R16) and forecast (R17) ----

    /// The first of `models` whose free quota covers the worst case `input_tokens` +
    /// `max_output_tokens` (the model's default output when `None`) now.
    pub fn first_free(
        &self,
        models: &[String],
        input_tokens: u64,
        max_output_tokens: Option<u64>,
        now: Now,
    ) -> Result<Option<String>> {
        for m in models {
            let worst = input_tokens
                .saturating_add(max_output_tokens.unwrap_or_else(|| self.default_max_output(m)));
            let left = self.quota(m, now)?.remaining;
            if left > 0 && worst <= left {
                return Ok(Some(m.clone()));
            }
        }
        Ok(None)
    }

    /// R17: the burn rate over the last `window_hours` and where it leads.
    pub fn forecast(&self, model: &str, window_hours: f64, now: Now) -> Result<Forecast> {
        if !window_hours.is_finite() || window_hours <= 0.0 || window_hours > 24.0 * 366.0 {
            return Err(invalid(format!(
                "window_hours {window_hours} must be a positive number of hours, at most a year"
            )));
        }
        let q = self.quota(model, now)?;
        let now_ms = now.ms();
        let window_ms = (window_hours * 3_600_000.0).round() as i64;
        let burned: u64 = self
            .records(RecordQuery {
                model: Some(model.to_string()),
                since_ms: Some(now_ms - window_ms),
                until_ms: Some(now_ms.saturating_add(1)),
                ..Default::default()
            })?
            .iter()
            .map(|r| r.free_tokens)
            .sum();
        Ok(Forecast::new(&q, burned, window_ms, now_ms))
    }

    pub fn forecasts(&self, window_hours: f64, now: Now) -> Result<Vec<Forecast>> {
        self.quotas(now)?
            .into_iter()
            .map(|q| self.forecast(&q.model, window_hours, now))
            .collect()
    }

    fn reconcile(&self, model: &str, op: Reconcile, now: Now) -> Result<(QuotaView, Vec<Alert>)> {
        Self::check_model(model)?;
        let q = self.ledger.reconcile(self.account(), model, op, now)?;
        let marks = self.alert_marks(&q, now.ms());
        let reached: Vec<&AlertMark> = marks_reached(&marks, q.left()).collect();
        let keys: Vec<String> = reached.iter().map(|m| m.key(model)).collect();
        let fired = self.ledger.fire_once(self.account(), &keys, now.ms())?;
        let alerts = reached
            .into_iter()
            .zip(fired)
            .filter(|(_, f)| *f)
            .map(|(m, _)| m.alert(model, q.left(), now.ms()))
            .collect();
        Ok((self.quota(model, now)?, alerts))
    }

    /// R12: the console's figure; lowers the remaining (never raises it above the
    /// ledger's own) unless `force`. Returns the quota and the alerts it crossed.
    pub fn sync(
        &self,
        model: &str,
        console_text: &str,
        force: bool,
        now: Now,
    ) -> Result<(QuotaView, Vec<Alert>)> {
        let (remaining, total) = parse_console_figure(console_text)?;
        let op = Reconcile::Console {
            remaining,
            total,
            force,
        };
        self.reconcile(model, op, now)
    }

    /// R12: the service answered `AllocationQuota.FreeTierOnly`.
    pub fn mark_depleted(&self, model: &str, now: Now) -> Result<(QuotaView, Vec<Alert>)> {
        self.reconcile(model, Reconcile::Depleted, now)
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
                        "budget {} exceeded: the call may use {} tokens, {} of {} left. {BUDGET_FIX}",
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
                             cannot be bounded. It was not sent; to go on:\n  - add its prices with \
                             QuotaGuard(catalog=...), or open the budget without a cost limit",
                            b.name
                                .as_deref()
                                .map_or_else(|| format!("#{id}"), |n| format!("{n:?}")),
                        )));
                    };
                    if cost > left {
                        return Err(QuotaError::Budget(format!(
                            "budget {} exceeded: the call may cost {} {}, {} left. {BUDGET_FIX}",
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

    /// The worst-case cost of a hold: everything not held from free quota is billed,
    /// priced as the call was held (thinking or not). `None`: the model has no price.
    fn worst_cost(&self, row: &ReservationRow) -> Result<Option<i64>> {
        let billable = row.worst - row.free_part.min(row.worst);
        if billable == 0 {
            // Nothing billable: free, whatever the price.
            return Ok(Some(0));
        }
        let b_in = row.input_tokens.saturating_sub(row.free_part);
        self.prices(&row.model)
            .map(|p| {
                p.cost(&Billable {
                    request_input: row.input_tokens,
                    input: b_in,
                    output: billable - b_in,
                    batch: row.kind == Kind::Batch,
                    thinking: row.thinking,
                    ..Default::default()
                })
            })
            .transpose()
    }

    /// R8/R9: holds a call's worst case, or says why it is refused.
    pub fn reserve(
        &self,
        model: &str,
        input_tokens: u64,
        max_output_tokens: u64,
        kind: Kind,
        thinking: bool,
        now: Now,
    ) -> Result<(ReservationRow, BudgetHold)> {
        Self::check_model(model)?;
        self.recover_if_due();
        let worst = input_tokens + max_output_tokens;
        let mut hold = self.hold_budgets(worst)?;
        let policy = self.config.policy();
        let req = HoldRequest {
            account: self.account(),
            model,
            kind,
            thinking,
            input_tokens,
            worst,
            free_region: policy.region_has_free,
            covered: kind.covered(),
            may_pay: policy.verified,
            now,
            lease_ms: self.config.lease_ms,
        };
        let row = match self.ledger.reserve(&req) {
            Ok(Hold::Held(row)) => row,
            Ok(Hold::Refused(s)) if s.blocked => {
                self.end_hold(&hold, None);
                let reason = self.blocked()?.unwrap_or_else(|| "blocked".into());
                return Err(QuotaError::Blocked(reason));
            }
            Ok(Hold::Refused(s)) => {
                self.end_hold(&hold, None);
                let at = now.ms();
                return Err(
                    match rules::admit(
                        model,
                        s.quota.as_ref(),
                        s.held,
                        s.overdue,
                        policy,
                        kind,
                        worst,
                        at,
                    ) {
                        Admission::Refuse(r) => QuotaError::Refused(crate::error::Refusal {
                            input: Some(input_tokens),
                            ..r
                        }),
                        // The step refused on what it saw; the rules agree on the same
                        // figures, so this is a ledger that broke the contract.
                        Admission::Admit { .. } => QuotaError::Ledger {
                            ledger: self.ledger_name().to_string(),
                            message: format!("refused a call to {model:?} that the rules admit"),
                        },
                    },
                );
            }
            Err(e) => {
                self.end_hold(&hold, None);
                return Err(e);
            }
        };
        if !hold.ids.is_empty() {
            let held = self
                .worst_cost(&row)
                .and_then(|cost| self.hold_budget_cost(&mut hold, model, cost));
            if let Err(e) = held {
                self.end_hold(&hold, None);
                self.ledger
                    .release(self.account(), model, row.id, false, now)?;
                return Err(e);
            }
        }
        Ok((row, hold))
    }

    /// A settle's money and alerts, from what its token step took: the `finish` every
    /// ledger calls between its token step and its commit.
    pub(crate) fn finish(&self, r: &TakeRequest, t: &Taken) -> Result<Commit> {
        let split = rules::split(r.input_tokens, r.output_tokens, t.free);
        let prices = self.prices(&r.model);
        // Free quota covers the cheapest input first (cache hits, then plain input, then
        // cache writes): what is left to bill is the dearest, so the bill never
        // under-states.
        let written = r.cache_write_tokens.min(r.input_tokens);
        let hits = r.cached_tokens.min(r.input_tokens - written);
        let mut free_in = r.input_tokens - split.billable_input;
        let free_hits = hits.min(free_in);
        free_in -= free_hits;
        free_in -= free_in.min(r.input_tokens - written - hits);
        let billable = Billable {
            request_input: r.input_tokens,
            input: split.billable_input,
            output: split.billable_output,
            cached_input: hits - free_hits,
            cache_write_input: written - free_in.min(written),
            explicit_cache: r.explicit_cache,
            thinking: r.thinking,
            batch: r.kind == Kind::Batch,
        };
        let cost = match (split.billable_input + split.billable_output > 0, prices) {
            (false, _) => Some(0),
            (true, Some(p)) => Some(p.cost(&billable)?),
            (true, None) => None,
        };
        let record = UsageRecord {
            id: r.record_id,
            time_ms: t.time_ms,
            account: r.account.clone(),
            user: r.user.clone(),
            workspace: r.workspace.clone(),
            model: r.model.clone(),
            kind: r.kind,
            request_id: r.request_id.clone(),
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            cached_tokens: r.cached_tokens,
            thinking: r.thinking,
            free_tokens: split.free,
            billable_input_tokens: split.billable_input,
            billable_output_tokens: split.billable_output,
            cost,
            currency: self.currency(),
            cost_type: CostType::of(&split, prices.is_some()),
            in_doubt: r.in_doubt,
        };
        let marks = match &t.quota {
            Some(q) => self.alert_marks(q, t.time_ms),
            None => Vec::new(),
        };
        Ok(Commit { record, marks })
    }

    /// R9/R11: records what the service reported for a reservation.
    pub fn settle(
        &self,
        row: &ReservationRow,
        hold: &BudgetHold,
        usage: &Usage,
        request_id: Option<&str>,
        now: Now,
    ) -> Result<Settled> {
        let mut out = self.take(&row.model, row.kind, Some(row), usage, request_id, now)?;
        self.end_hold(
            hold,
            Some((
                usage.input_tokens + usage.output_tokens,
                out.record.cost.unwrap_or(0),
            )),
        );
        self.spend_alerts(&mut out, now)?;
        Ok(out)
    }

    /// R9/R11: records usage that had no reservation: a call the wrapper could not
    /// hold beforehand (an application's models, a batch's other models). Others'
    /// holds stay untouched, so the free part is never over-stated.
    pub fn record_usage(
        &self,
        model: &str,
        kind: Kind,
        usage: &Usage,
        request_id: Option<&str>,
        now: Now,
    ) -> Result<Settled> {
        Self::check_model(model)?;
        let mut out = self.take(model, kind, None, usage, request_id, now)?;
        self.spend_alerts(&mut out, now)?;
        Ok(out)
    }

    fn take(
        &self,
        model: &str,
        kind: Kind,
        row: Option<&ReservationRow>,
        usage: &Usage,
        request_id: Option<&str>,
        now: Now,
    ) -> Result<Settled> {
        let Usage {
            input_tokens,
            output_tokens,
            cached_tokens,
            cache_write_tokens,
            ..
        } = *usage;
        if cached_tokens + cache_write_tokens > input_tokens {
            return Err(invalid(format!(
                "cached_tokens {cached_tokens} and cache_creation_tokens {cache_write_tokens} are \
                 more than input_tokens {input_tokens}"
            )));
        }
        let policy = self.config.policy();
        let req = TakeRequest {
            account: self.config.account.clone(),
            model: model.to_string(),
            kind,
            reservation: row.map(|r| r.id),
            held_free: row.map_or(0, |r| r.free_part),
            held_worst: row.map_or(0, |r| r.worst),
            record_id: fresh_id(),
            user: self.config.user.clone(),
            workspace: self.config.workspace.clone(),
            request_id: request_id.map(str::to_string),
            input_tokens,
            output_tokens,
            cached_tokens,
            cache_write_tokens,
            explicit_cache: usage.explicit_cache,
            thinking: usage.thinking,
            in_doubt: usage.in_doubt,
            free_region: policy.region_has_free,
            covered: kind.covered(),
            now,
        };
        self.ledger.settle(&req, &|r, t| self.finish(r, t))
    }

    /// R10: the high-spending rules, on the first settle of a new CST day.
    fn spend_alerts(&self, out: &mut Settled, now: Now) -> Result<()> {
        let day = (out.record.time_ms + crate::clock::CST_OFFSET_MS).div_euclid(DAY_MS);
        if self.spend_day.swap(day, Ordering::Relaxed) != day {
            out.alerts.extend(self.check_spend(now)?);
        }
        Ok(())
    }

    /// Settles at the worst case as it was held (thinking or not): for calls whose
    /// real usage never arrived.
    pub fn settle_worst_case(
        &self,
        row: &ReservationRow,
        hold: &BudgetHold,
        in_doubt: bool,
        now: Now,
    ) -> Result<Settled> {
        let usage = Usage {
            input_tokens: row.input_tokens,
            output_tokens: row.worst - row.input_tokens,
            thinking: row.thinking,
            in_doubt,
            ..Default::default()
        };
        self.settle(row, hold, &usage, None, now)
    }

    /// R6-R8 for a call whose cost is not known before it is sent: input that cannot be
    /// bounded, or a method that cannot be guarded. `model`: the model the call names,
    /// if any (else every model of the account counts). Refused wherever a chargeable
    /// call would be; `Ok` lets it go ahead.
    pub fn check_uncounted(
        &self,
        model: Option<&str>,
        reason: RefusalReason,
        detail: &str,
        now: Now,
    ) -> Result<()> {
        if let Some(m) = model {
            Self::check_model(m)?;
        }
        // The kill switch refuses every call, the ones it cannot count too (R15).
        if let Some(reason) = self.blocked()? {
            return Err(QuotaError::Blocked(reason));
        }
        let overdue = self.ledger.account(self.account())?.overdue;
        let rows: Vec<QuotaRow> = match model {
            Some(m) => self
                .ledger
                .quota(self.account(), m, now)?
                .map(|(q, _)| q)
                .into_iter()
                .collect(),
            None => self
                .ledger
                .quotas(self.account(), now)?
                .into_iter()
                .map(|(_, q, _)| q)
                .collect(),
        };
        let refs: Vec<&QuotaRow> = rows.iter().collect();
        match rules::refuse_uncounted(
            model.unwrap_or(""),
            &refs,
            overdue,
            self.config.policy(),
            reason,
            detail,
            now.ms(),
        ) {
            Some(r) => Err(QuotaError::Refused(r)),
            None => Ok(()),
        }
    }

    pub fn release(
        &self,
        row: &ReservationRow,
        hold: &BudgetHold,
        failed: bool,
        now: Now,
    ) -> Result<Release> {
        self.end_hold(hold, None);
        self.ledger
            .release(self.account(), &row.model, row.id, failed, now)
    }

    /// Completes settles that a crash or an outage of the ledger left half-way.
    pub fn recover(&self) -> Result<Vec<Settled>> {
        self.ledger
            .recover(self.account(), &|r, t| self.finish(r, t))
    }

    /// Recovers when the ledger says there is work; a failure here surfaces on the
    /// step that follows, which meets the same ledger.
    fn recover_if_due(&self) {
        if self.ledger.recovery_due() {
            let _ = self.recover();
        }
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

    /// R10: the high-spending rules for the CST day of `now`, each evaluated once per
    /// day across every process (marked evaluated whether it fires or not).
    pub fn check_spend(&self, now: Now) -> Result<Vec<Alert>> {
        let rules_ = self.spend_rules();
        if rules_.is_empty() {
            return Ok(Vec::new());
        }
        let now_ms = now.ms();
        let today = cst_day(now_ms);
        let yesterday = today.pred_opt().unwrap_or(today);
        let keys: Vec<String> = rules_
            .iter()
            .map(|r| format!("daily_spend:{}:{today}", r.model.as_deref().unwrap_or("*")))
            .collect();
        let fresh = self.ledger.fire_once(self.account(), &keys, now_ms)?;
        let mut out = Vec::new();
        for (rule, first) in rules_.iter().zip(fresh) {
            if !first {
                continue;
            }
            let cost = self
                .ledger
                .day_cost(self.account(), yesterday, rule.model.as_deref())?;
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

    /// The ledger's integrity and invariants ([`crate::check`]): every finding, the
    /// problems among them marked.
    pub fn check(&self, now: Now) -> Result<Vec<crate::check::Finding>> {
        crate::check::check(&*self.ledger, self.account(), now)
    }

    /// What opening the ledger found worth a warning.
    pub fn ledger_warnings(&self) -> Vec<String> {
        self.ledger.warnings()
    }

    pub fn compact(&self, before_ms: i64) -> Result<u64> {
        check_time("before", before_ms)?;
        self.ledger.compact(self.account(), before_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(remaining: u64, expires_ms: i64) -> QuotaView {
        QuotaView {
            model: "m".into(),
            total: 1_000_000,
            used: 1_000_000 - remaining,
            reserved: 0,
            remaining,
            activated_ms: 0,
            expires_ms,
            expired: false,
            free_only: false,
        }
    }

    #[test]
    fn forecasts_run_out_or_leave_tokens_unused() {
        const H: i64 = 3_600_000;
        // 1,000 an hour with 10,000 left and 100 hours to go: out in 10 hours.
        let f = Forecast::new(&view(10_000, 100 * H), 24_000, 24 * H, 0);
        assert_eq!((f.burn_per_hour, f.runs_out_ms), (1_000.0, Some(10 * H)));
        assert_eq!(f.unused_at_expiry, 0);
        // 10 an hour with 10,000 left and 100 hours to go: 9,000 expire unused.
        let f = Forecast::new(&view(10_000, 100 * H), 240, 24 * H, 0);
        assert_eq!((f.runs_out_ms, f.unused_at_expiry), (None, 9_000));
        // Nothing burned: everything expires unused; nothing left: nothing to forecast.
        let f = Forecast::new(&view(10_000, 100 * H), 0, 24 * H, 0);
        assert_eq!((f.runs_out_ms, f.unused_at_expiry), (None, 10_000));
        let f = Forecast::new(&view(0, 100 * H), 5_000, 24 * H, 0);
        assert_eq!((f.runs_out_ms, f.unused_at_expiry), (None, 0));
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
