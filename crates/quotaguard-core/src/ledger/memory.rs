//! `memory://`: a ledger private to one guard, held in this process.
use std::collections::BTreeMap;
use std::sync::Arc;

use rustc_hash::{FxBuildHasher, FxHashMap as HashMap};

/// Keyed by name, found by `&str`.
type ByName<V> = hashbrown::HashMap<String, V, FxBuildHasher>;

use chrono::NaiveDate;
use parking_lot::Mutex;

use super::{
    AccountRow, Backend, DailyRow, HourRow, Lease, RecordQuery, ReservationRow, Snapshot,
    StatsDelta, Tx, UsageRecord,
};
use crate::clock::cst_day;
use crate::error::Result;
use crate::money::Currency;
use crate::quota::QuotaRow;
use crate::rules::{CostType, Kind};

/// A reservation as held here: its account and model are the keys it is filed under.
#[derive(Debug, Clone, Copy)]
struct Held {
    kind: Kind,
    thinking: bool,
    input_tokens: u64,
    worst: u64,
    free_part: u64,
    created_ms: i64,
    expires_ms: i64,
}

/// Everything of one account's model a step reads or writes: one lookup finds it.
#[derive(Default)]
struct PerModel {
    quota: Option<QuotaRow>,
    /// id -> reservation, as SQLite keys them.
    held: HashMap<i64, Held>,
    /// (day, kind) -> totals
    daily: BTreeMap<(NaiveDate, Kind), DailyRow>,
    /// hour -> statistics
    hourly: BTreeMap<i64, HourRow>,
    /// Free tokens reconciliation put into `used`.
    adjusted: Option<i64>,
}

impl PerModel {
    /// Free tokens held by reservations alive at `now_ms`, except `except`.
    fn held_at(&self, now_ms: i64, except: Option<i64>) -> u64 {
        self.held
            .iter()
            .filter(|(id, r)| r.expires_ms > now_ms && Some(**id) != except)
            .map(|(_, r)| r.free_part)
            .sum()
    }
}

/// A record as kept here: its names shared with every other record that bears them.
struct Stored {
    id: i64,
    time_ms: i64,
    account: Arc<str>,
    user: Arc<str>,
    workspace: Option<Arc<str>>,
    model: Arc<str>,
    kind: Kind,
    request_id: Option<Box<str>>,
    input_tokens: u64,
    output_tokens: u64,
    cached_tokens: u64,
    free_tokens: u64,
    billable_input_tokens: u64,
    billable_output_tokens: u64,
    cost: Option<i64>,
    currency: Currency,
    cost_type: CostType,
    thinking: bool,
    in_doubt: bool,
}

impl Stored {
    fn record(&self) -> UsageRecord {
        UsageRecord {
            id: self.id,
            time_ms: self.time_ms,
            account: self.account.to_string(),
            user: self.user.to_string(),
            workspace: self.workspace.as_deref().map(str::to_string),
            model: self.model.to_string(),
            kind: self.kind,
            request_id: self.request_id.as_deref().map(str::to_string),
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            cached_tokens: self.cached_tokens,
            thinking: self.thinking,
            free_tokens: self.free_tokens,
            billable_input_tokens: self.billable_input_tokens,
            billable_output_tokens: self.billable_output_tokens,
            cost: self.cost,
            currency: self.currency,
            cost_type: self.cost_type,
            in_doubt: self.in_doubt,
        }
    }

    /// [`RecordQuery::matches`] on the stored form, without building the record.
    fn matches(&self, q: &RecordQuery) -> bool {
        *self.account == *q.account
            && q.model.as_deref().is_none_or(|m| m == &*self.model)
            && q.user.as_deref().is_none_or(|u| u == &*self.user)
            && q.workspace
                .as_deref()
                .is_none_or(|w| self.workspace.as_deref() == Some(w))
            && q.kind.is_none_or(|k| k == self.kind)
            && q.since_ms.is_none_or(|s| self.time_ms >= s)
            && q.until_ms.is_none_or(|u| self.time_ms < u)
    }
}

#[derive(Default)]
struct State {
    /// account -> model -> its quota, reservations and totals
    models: ByName<ByName<PerModel>>,
    accounts: HashMap<String, AccountRow>,
    blocked: HashMap<String, String>,
    records: Vec<Stored>,
    /// The names records bear, each kept once.
    names: hashbrown::HashSet<Arc<str>, FxBuildHasher>,
    alerts: HashMap<(String, String), i64>,
    /// account -> the latest compaction point
    compacted: HashMap<String, i64>,
}

impl State {
    fn model(&self, account: &str, model: &str) -> Option<&PerModel> {
        self.models.get(account).and_then(|m| m.get(model))
    }

    /// The model's entry, made (its keys allocated) only when new.
    fn model_mut(&mut self, account: &str, model: &str) -> &mut PerModel {
        self.models
            .entry_ref(account)
            .or_default()
            .entry_ref(model)
            .or_default()
    }

    /// The shared copy of `name`.
    fn name(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.get(name) {
            return Arc::clone(n);
        }
        let n: Arc<str> = Arc::from(name);
        self.names.insert(Arc::clone(&n));
        n
    }
}

pub struct Memory {
    state: Mutex<State>,
}

impl Memory {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
        }
    }
}

impl Default for Memory {
    fn default() -> Self {
        Self::new()
    }
}

impl Backend for Memory {
    fn name(&self) -> &str {
        "memory://"
    }

    fn write<R>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<R>) -> Result<R> {
        let mut s = self.state.lock();
        f(&mut *s)
    }
}

impl Tx for State {
    fn quota(&mut self, account: &str, model: &str) -> Result<Option<QuotaRow>> {
        Ok(self.model(account, model).and_then(|m| m.quota))
    }

    fn put_quota(&mut self, account: &str, model: &str, q: &QuotaRow) -> Result<()> {
        self.model_mut(account, model).quota = Some(*q);
        Ok(())
    }

    fn snapshot(&mut self, account: &str, model: &str, now_ms: i64) -> Result<Snapshot> {
        let (quota, held) = self
            .model(account, model)
            .map_or((None, 0), |m| (m.quota, m.held_at(now_ms, None)));
        Ok(Snapshot {
            quota,
            held,
            overdue: self.accounts.get(account).is_some_and(|a| a.overdue),
            blocked: self.blocked.contains_key(account),
        })
    }

    fn quota_held(
        &mut self,
        account: &str,
        model: &str,
        now_ms: i64,
        except: Option<i64>,
    ) -> Result<(Option<QuotaRow>, u64)> {
        Ok(self
            .model(account, model)
            .map_or((None, 0), |m| (m.quota, m.held_at(now_ms, except))))
    }

    fn set_used(&mut self, account: &str, model: &str, used: u64) -> Result<()> {
        if let Some(q) = self
            .models
            .get_mut(account)
            .and_then(|m| m.get_mut(model))
            .and_then(|m| m.quota.as_mut())
        {
            q.used = used;
        }
        Ok(())
    }

    fn quota_models(&mut self, account: &str) -> Result<Vec<String>> {
        let mut out: Vec<String> = self
            .models
            .get(account)
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(|(_, m)| m.quota.is_some())
            .map(|(name, _)| name.clone())
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    fn reserved(
        &mut self,
        account: &str,
        model: &str,
        now_ms: i64,
        except: Option<i64>,
    ) -> Result<u64> {
        Ok(self
            .model(account, model)
            .map_or(0, |m| m.held_at(now_ms, except)))
    }

    fn insert_reservation(&mut self, r: &ReservationRow) -> Result<i64> {
        let held = &mut self.model_mut(&r.account, &r.model).held;
        let mut id = r.id;
        while held.contains_key(&id) {
            id = super::fresh_id();
        }
        held.insert(
            id,
            Held {
                kind: r.kind,
                thinking: r.thinking,
                input_tokens: r.input_tokens,
                worst: r.worst,
                free_part: r.free_part,
                created_ms: r.created_ms,
                expires_ms: r.expires_ms,
            },
        );
        Ok(id)
    }

    fn take_reservation(&mut self, account: &str, model: &str, id: i64) -> Result<Option<Lease>> {
        let Some(m) = self.models.get_mut(account).and_then(|m| m.get_mut(model)) else {
            return Ok(None);
        };
        Ok(m.held.remove(&id).map(|h| Lease {
            kind: h.kind,
            worst: h.worst,
            expires_ms: h.expires_ms,
        }))
    }

    fn account(&mut self, account: &str) -> Result<AccountRow> {
        Ok(self.accounts.get(account).copied().unwrap_or_default())
    }

    fn blocked(&mut self, account: &str) -> Result<Option<String>> {
        Ok(self.blocked.get(account).cloned())
    }

    fn set_blocked(&mut self, account: &str, reason: Option<&str>, _now_ms: i64) -> Result<()> {
        match reason {
            Some(r) => self.blocked.insert(account.to_string(), r.to_string()),
            None => self.blocked.remove(account),
        };
        Ok(())
    }

    fn put_account(&mut self, account: &str, a: &AccountRow) -> Result<()> {
        match self.accounts.get_mut(account) {
            Some(row) => *row = *a,
            None => {
                self.accounts.insert(account.to_string(), *a);
            }
        }
        Ok(())
    }

    fn append_record(&mut self, r: &mut UsageRecord, stats: &StatsDelta) -> Result<()> {
        let day = cst_day(r.time_ms);
        let hour_ms = crate::clock::hour_start(r.time_ms);
        let m = self.model_mut(&r.account, &r.model);
        let d = m
            .daily
            .entry((day, r.kind))
            .or_insert_with(|| DailyRow::new(day, r.model.clone(), r.kind, r.currency));
        d.calls += 1;
        d.input_tokens += r.input_tokens;
        d.output_tokens += r.output_tokens;
        d.free_tokens += r.free_tokens;
        d.billable_input_tokens += r.billable_input_tokens;
        d.billable_output_tokens += r.billable_output_tokens;
        d.cost += i128::from(r.cost.unwrap_or(0));
        d.unpriced_calls += u64::from(r.cost_type == CostType::Unpriced);
        bump(&mut m.hourly, &r.model, hour_ms, stats);
        let stored = Stored {
            id: r.id,
            time_ms: r.time_ms,
            account: self.name(&r.account),
            user: self.name(&r.user),
            workspace: r.workspace.as_deref().map(|w| self.name(w)),
            model: self.name(&r.model),
            kind: r.kind,
            request_id: r.request_id.as_deref().map(Box::from),
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            cached_tokens: r.cached_tokens,
            free_tokens: r.free_tokens,
            billable_input_tokens: r.billable_input_tokens,
            billable_output_tokens: r.billable_output_tokens,
            cost: r.cost,
            currency: r.currency,
            cost_type: r.cost_type,
            thinking: r.thinking,
            in_doubt: r.in_doubt,
        };
        self.records.push(stored);
        Ok(())
    }

    fn bump_hour(
        &mut self,
        account: &str,
        model: &str,
        _kind: Kind,
        hour_ms: i64,
        d: &StatsDelta,
    ) -> Result<()> {
        bump(
            &mut self.model_mut(account, model).hourly,
            model,
            hour_ms,
            d,
        );
        Ok(())
    }

    fn fire_once(&mut self, account: &str, key: &str, now_ms: i64) -> Result<bool> {
        let k = (account.to_string(), key.to_string());
        if self.alerts.contains_key(&k) {
            return Ok(false);
        }
        self.alerts.insert(k, now_ms);
        Ok(true)
    }

    fn day_cost(&mut self, account: &str, day: NaiveDate, model: Option<&str>) -> Result<i128> {
        let Some(models) = self.models.get(account) else {
            return Ok(0);
        };
        Ok(models
            .iter()
            .filter(|(m, _)| model.is_none_or(|x| x == m.as_str()))
            .flat_map(|(_, m)| m.daily.range((day, Kind::Realtime)..=(day, Kind::Custom)))
            .map(|(_, row)| row.cost)
            .sum())
    }

    fn records(&mut self, q: &RecordQuery) -> Result<Vec<UsageRecord>> {
        let it = self
            .records
            .iter()
            .filter(|r| r.matches(q))
            .map(Stored::record);
        Ok(match q.limit {
            Some(n) => it.take(n as usize).collect(),
            None => it.collect(),
        })
    }

    fn daily(&mut self, account: &str, from: NaiveDate, to: NaiveDate) -> Result<Vec<DailyRow>> {
        let mut rows: Vec<DailyRow> = self
            .models
            .get(account)
            .into_iter()
            .flat_map(|models| models.values())
            .flat_map(|m| m.daily.range((from, Kind::Realtime)..(to, Kind::Realtime)))
            .map(|(_, row)| row.clone())
            .collect();
        rows.sort_by(|a, b| (a.day, &a.model, a.kind).cmp(&(b.day, &b.model, b.kind)));
        Ok(rows)
    }

    fn hourly(
        &mut self,
        account: &str,
        model: Option<&str>,
        since_ms: Option<i64>,
    ) -> Result<Vec<HourRow>> {
        let since = since_ms.map_or(i64::MIN, super::super::clock::hour_start);
        let mut rows: Vec<HourRow> = self
            .models
            .get(account)
            .into_iter()
            .flat_map(|models| models.iter())
            .filter(|(m, _)| model.is_none_or(|x| x == m.as_str()))
            .flat_map(|(_, m)| m.hourly.range(since..))
            .map(|(_, row)| row.clone())
            .collect();
        rows.sort_by(|a, b| (a.hour_ms, &a.model).cmp(&(b.hour_ms, &b.model)));
        Ok(rows)
    }

    fn compact(&mut self, account: &str, before_ms: i64) -> Result<u64> {
        let n = self.records.len();
        self.records
            .retain(|r| &*r.account != account || r.time_ms >= before_ms);
        let at = self
            .compacted
            .entry(account.to_string())
            .or_insert(before_ms);
        *at = (*at).max(before_ms);
        Ok((n - self.records.len()) as u64)
    }

    fn adjust(&mut self, account: &str, model: &str, delta: i64) -> Result<()> {
        let a = self.model_mut(account, model).adjusted.get_or_insert(0);
        *a = a.saturating_add(delta);
        Ok(())
    }

    fn adjustments(&mut self, account: &str) -> Result<BTreeMap<String, i64>> {
        Ok(self
            .models
            .get(account)
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(|(_, m)| m.adjusted.is_some() || m.quota.is_some())
            .map(|(name, m)| (name.clone(), m.adjusted.unwrap_or(0)))
            .collect())
    }

    fn compacted_before(&mut self, account: &str) -> Result<Option<i64>> {
        Ok(self.compacted.get(account).copied())
    }

    fn reservations(&mut self, account: &str) -> Result<Vec<ReservationRow>> {
        let mut out: Vec<ReservationRow> = self
            .models
            .get(account)
            .into_iter()
            .flat_map(|m| m.iter())
            .flat_map(|(model, m)| {
                m.held.iter().map(move |(id, h)| ReservationRow {
                    id: *id,
                    account: account.to_string(),
                    model: model.clone(),
                    kind: h.kind,
                    thinking: h.thinking,
                    input_tokens: h.input_tokens,
                    worst: h.worst,
                    free_part: h.free_part,
                    created_ms: h.created_ms,
                    expires_ms: h.expires_ms,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.model, a.id).cmp(&(&b.model, b.id)));
        Ok(out)
    }
}

/// Adds a call's statistics to its hour.
fn bump(hourly: &mut BTreeMap<i64, HourRow>, model: &str, hour_ms: i64, d: &StatsDelta) {
    let h = hourly.entry(hour_ms).or_insert_with(|| HourRow {
        hour_ms,
        model: model.to_string(),
        ..Default::default()
    });
    h.calls += d.calls;
    h.refusals += d.refusals;
    h.failures += d.failures;
    h.input_tokens += d.input_tokens;
    h.output_tokens += d.output_tokens;
}
