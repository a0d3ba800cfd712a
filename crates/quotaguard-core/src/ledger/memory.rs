//! `memory://`: a ledger private to one guard, held in this process.
use std::collections::BTreeMap;

use rustc_hash::FxHashMap as HashMap;

use chrono::NaiveDate;
use parking_lot::Mutex;

use super::{
    AccountRow, Backend, DailyRow, HourRow, RecordQuery, ReservationRow, StatsDelta, Tx,
    UsageRecord,
};
use crate::clock::cst_day;
use crate::error::Result;
use crate::quota::QuotaRow;
use crate::rules::{CostType, Kind};

/// account -> model -> `T`
type PerModel<T> = HashMap<String, HashMap<String, T>>;

#[derive(Default)]
struct State {
    quotas: HashMap<String, BTreeMap<String, QuotaRow>>,
    accounts: HashMap<String, AccountRow>,
    blocked: HashMap<String, String>,
    /// account -> model -> id -> reservation, as SQLite keys them.
    reservations: PerModel<HashMap<i64, ReservationRow>>,
    records: Vec<UsageRecord>,
    /// account -> model -> (day, kind) -> totals
    daily: PerModel<BTreeMap<(NaiveDate, Kind), DailyRow>>,
    /// account -> model -> hour -> statistics
    hourly: PerModel<BTreeMap<i64, HourRow>>,
    alerts: HashMap<(String, String), i64>,
    /// account -> model -> free tokens reconciliation put into `used`
    adjusted: HashMap<String, BTreeMap<String, i64>>,
    /// account -> the latest compaction point
    compacted: HashMap<String, i64>,
}

/// The entry for `key`, allocating the key only when it is new.
fn slot<'a, V: Default>(map: &'a mut HashMap<String, V>, key: &str) -> &'a mut V {
    if !map.contains_key(key) {
        map.insert(key.to_string(), V::default());
    }
    map.get_mut(key).expect("inserted above")
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
        Ok(self.quotas.get(account).and_then(|m| m.get(model)).copied())
    }

    fn put_quota(&mut self, account: &str, model: &str, q: &QuotaRow) -> Result<()> {
        // The hot path updates a row that exists: no key to allocate.
        if let Some(row) = self.quotas.get_mut(account).and_then(|m| m.get_mut(model)) {
            *row = *q;
            return Ok(());
        }
        self.quotas
            .entry(account.to_string())
            .or_default()
            .insert(model.to_string(), *q);
        Ok(())
    }

    fn quota_models(&mut self, account: &str) -> Result<Vec<String>> {
        Ok(self
            .quotas
            .get(account)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default())
    }

    fn reserved(
        &mut self,
        account: &str,
        model: &str,
        now_ms: i64,
        except: Option<i64>,
    ) -> Result<u64> {
        Ok(self
            .reservations
            .get(account)
            .and_then(|m| m.get(model))
            .map_or(0, |held| {
                held.values()
                    .filter(|r| r.expires_ms > now_ms && Some(r.id) != except)
                    .map(|r| r.free_part)
                    .sum()
            }))
    }

    fn insert_reservation(&mut self, r: &ReservationRow) -> Result<i64> {
        let held = slot(slot(&mut self.reservations, &r.account), &r.model);
        let mut id = r.id;
        while held.contains_key(&id) {
            id = super::fresh_id();
        }
        held.insert(id, ReservationRow { id, ..r.clone() });
        Ok(id)
    }

    fn reservation(
        &mut self,
        account: &str,
        model: &str,
        id: i64,
    ) -> Result<Option<ReservationRow>> {
        Ok(self
            .reservations
            .get(account)
            .and_then(|m| m.get(model))
            .and_then(|held| held.get(&id))
            .cloned())
    }

    fn delete_reservation(&mut self, account: &str, model: &str, id: i64) -> Result<()> {
        if let Some(held) = self
            .reservations
            .get_mut(account)
            .and_then(|m| m.get_mut(model))
        {
            held.remove(&id);
        }
        Ok(())
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
        self.accounts.insert(account.to_string(), *a);
        Ok(())
    }

    fn append_record(&mut self, r: &mut UsageRecord) -> Result<()> {
        let day = cst_day(r.time_ms);
        let d = slot(slot(&mut self.daily, &r.account), &r.model)
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
        self.records.push(r.clone());
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
        let h = slot(slot(&mut self.hourly, account), model)
            .entry(hour_ms)
            .or_insert_with(|| HourRow {
                hour_ms,
                model: model.to_string(),
                ..Default::default()
            });
        h.calls += d.calls;
        h.refusals += d.refusals;
        h.failures += d.failures;
        h.input_tokens += d.input_tokens;
        h.output_tokens += d.output_tokens;
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
        let Some(models) = self.daily.get(account) else {
            return Ok(0);
        };
        Ok(models
            .iter()
            .filter(|(m, _)| model.is_none_or(|x| x == m.as_str()))
            .flat_map(|(_, days)| days.range((day, Kind::Realtime)..=(day, Kind::Custom)))
            .map(|(_, row)| row.cost)
            .sum())
    }

    fn records(&mut self, q: &RecordQuery) -> Result<Vec<UsageRecord>> {
        let it = self.records.iter().filter(|r| q.matches(r)).cloned();
        Ok(match q.limit {
            Some(n) => it.take(n as usize).collect(),
            None => it.collect(),
        })
    }

    fn daily(&mut self, account: &str, from: NaiveDate, to: NaiveDate) -> Result<Vec<DailyRow>> {
        let mut rows: Vec<DailyRow> = self
            .daily
            .get(account)
            .into_iter()
            .flat_map(|models| models.values())
            .flat_map(|days| days.range((from, Kind::Realtime)..(to, Kind::Realtime)))
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
            .hourly
            .get(account)
            .into_iter()
            .flat_map(|models| models.iter())
            .filter(|(m, _)| model.is_none_or(|x| x == m.as_str()))
            .flat_map(|(_, hours)| hours.range(since..))
            .map(|(_, row)| row.clone())
            .collect();
        rows.sort_by(|a, b| (a.hour_ms, &a.model).cmp(&(b.hour_ms, &b.model)));
        Ok(rows)
    }

    fn compact(&mut self, account: &str, before_ms: i64) -> Result<u64> {
        let n = self.records.len();
        self.records
            .retain(|r| r.account != account || r.time_ms >= before_ms);
        let at = self
            .compacted
            .entry(account.to_string())
            .or_insert(before_ms);
        *at = (*at).max(before_ms);
        Ok((n - self.records.len()) as u64)
    }

    fn adjust(&mut self, account: &str, model: &str, delta: i64) -> Result<()> {
        let a = slot(&mut self.adjusted, account)
            .entry(model.to_string())
            .or_insert(0);
        *a = a.saturating_add(delta);
        Ok(())
    }

    fn adjustments(&mut self, account: &str) -> Result<BTreeMap<String, i64>> {
        let mut out = self.adjusted.get(account).cloned().unwrap_or_default();
        for m in self.quotas.get(account).into_iter().flat_map(|q| q.keys()) {
            out.entry(m.clone()).or_insert(0);
        }
        Ok(out)
    }

    fn compacted_before(&mut self, account: &str) -> Result<Option<i64>> {
        Ok(self.compacted.get(account).copied())
    }

    fn reservations(&mut self, account: &str) -> Result<Vec<ReservationRow>> {
        let mut out: Vec<ReservationRow> = self
            .reservations
            .get(account)
            .into_iter()
            .flat_map(|m| m.values())
            .flat_map(|held| held.values().cloned())
            .collect();
        out.sort_by(|a, b| (&a.model, a.id).cmp(&(&b.model, b.id)));
        Ok(out)
    }
}
