//! `memory://`: a ledger private to one guard, held in this process.
use std::collections::{BTreeMap, HashMap};

use chrono::NaiveDate;
use parking_lot::Mutex;

use super::{
    AccountRow, Backend, DailyRow, HourRow, RecordQuery, ReservationRow, StatsDelta, Tx,
    UsageRecord,
};
use crate::core::clock::cst_day;
use crate::core::error::Result;
use crate::core::quota::QuotaRow;
use crate::core::rules::{CostType, Kind};

#[derive(Default)]
struct State {
    quotas: HashMap<String, BTreeMap<String, QuotaRow>>,
    accounts: HashMap<String, AccountRow>,
    reservations: HashMap<i64, ReservationRow>,
    next_reservation: i64,
    records: Vec<UsageRecord>,
    next_record: i64,
    daily: BTreeMap<(String, NaiveDate, String, Kind), DailyRow>,
    hourly: BTreeMap<(String, String, i64), HourRow>,
    alerts: HashMap<(String, String), i64>,
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
            .values()
            .filter(|r| {
                r.expires_ms > now_ms
                    && Some(r.id) != except
                    && r.model == model
                    && r.account == account
            })
            .map(|r| r.free_part)
            .sum())
    }

    fn insert_reservation(&mut self, r: &ReservationRow) -> Result<i64> {
        self.next_reservation += 1;
        let id = self.next_reservation;
        self.reservations
            .insert(id, ReservationRow { id, ..r.clone() });
        Ok(id)
    }

    fn reservation(
        &mut self,
        _account: &str,
        _model: &str,
        id: i64,
    ) -> Result<Option<ReservationRow>> {
        Ok(self.reservations.get(&id).cloned())
    }

    fn delete_reservation(&mut self, _account: &str, _model: &str, id: i64) -> Result<()> {
        self.reservations.remove(&id);
        Ok(())
    }

    fn account(&mut self, account: &str) -> Result<AccountRow> {
        Ok(self.accounts.get(account).copied().unwrap_or_default())
    }

    fn put_account(&mut self, account: &str, a: &AccountRow) -> Result<()> {
        self.accounts.insert(account.to_string(), *a);
        Ok(())
    }

    fn append_record(&mut self, r: &mut UsageRecord) -> Result<()> {
        self.next_record += 1;
        r.id = self.next_record;
        let day = cst_day(r.time_ms);
        let d = self
            .daily
            .entry((r.account.clone(), day, r.model.clone(), r.kind))
            .or_insert_with(|| DailyRow {
                day,
                model: r.model.clone(),
                kind: r.kind,
                calls: 0,
                input_tokens: 0,
                output_tokens: 0,
                free_tokens: 0,
                billable_input_tokens: 0,
                billable_output_tokens: 0,
                cost: 0,
                unpriced_calls: 0,
                currency: r.currency,
            });
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
        let h = self
            .hourly
            .entry((account.to_string(), model.to_string(), hour_ms))
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
        Ok(self
            .daily
            .iter()
            .filter(|((a, d, m, _), _)| a == account && *d == day && model.is_none_or(|x| x == m))
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
        Ok(self
            .daily
            .iter()
            .filter(|((a, d, _, _), _)| a == account && *d >= from && *d < to)
            .map(|(_, row)| row.clone())
            .collect())
    }

    fn hourly(
        &mut self,
        account: &str,
        model: Option<&str>,
        since_ms: Option<i64>,
    ) -> Result<Vec<HourRow>> {
        let mut rows: Vec<HourRow> = self
            .hourly
            .iter()
            .filter(|((a, m, h), _)| {
                a == account
                    && model.is_none_or(|x| x == m)
                    && since_ms.is_none_or(|s| *h >= super::super::clock::hour_start(s))
            })
            .map(|(_, row)| row.clone())
            .collect();
        rows.sort_by(|a, b| (a.hour_ms, &a.model).cmp(&(b.hour_ms, &b.model)));
        Ok(rows)
    }

    fn compact(&mut self, account: &str, before_ms: i64) -> Result<u64> {
        let n = self.records.len();
        self.records
            .retain(|r| r.account != account || r.time_ms >= before_ms);
        Ok((n - self.records.len()) as u64)
    }
}
