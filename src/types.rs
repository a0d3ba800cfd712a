//! Frozen value classes handed to Python: they hold plain core data and build
//! Python objects only when a field is read. How they look (`repr`, `str`, the notebook's
//! HTML) is `quotaguard._format`'s business: one renderer per object, shared with the
//! command line.
use chrono::{DateTime, Utc};
use pyo3::prelude::*;
use rust_decimal::Decimal;

use quotaguard_core::clock::to_utc;
use quotaguard_core::guard::{Bill, BillLine, Forecast, QuotaView};
use quotaguard_core::ledger::{Alert, HourRow, UsageRecord};
use quotaguard_core::money::{to_decimal, Currency};
use quotaguard_core::quota::format_console_figure;

/// `obj` as `quotaguard._format.render` writes it: `how` is `"repr"`, `"str"` or `"html"`.
pub(crate) fn render<T: pyo3::PyTypeInfo>(obj: &Bound<'_, T>, how: &str) -> PyResult<String> {
    obj.py()
        .import("quotaguard._format")?
        .getattr("render")?
        .call1((obj, how))?
        .extract()
}

/// Where a model's free quota is heading at its recent burn rate (R17).
#[pyclass(frozen, module = "quotaguard", name = "Forecast")]
pub struct PyForecast(pub Forecast);

#[pymethods]
impl PyForecast {
    #[getter]
    fn model(&self) -> &str {
        &self.0.model
    }
    /// Free tokens left now.
    #[getter]
    fn remaining(&self) -> u64 {
        self.0.remaining
    }
    /// Free tokens used per hour over the window.
    #[getter]
    fn burn_per_hour(&self) -> f64 {
        self.0.burn_per_hour
    }
    /// When the quota runs out at that rate, if it does before it expires.
    #[getter]
    fn runs_out_at(&self) -> Option<DateTime<Utc>> {
        self.0.runs_out_ms.map(to_utc)
    }
    /// When the quota expires (`None`: no quota).
    #[getter]
    fn expires_at(&self) -> Option<DateTime<Utc>> {
        self.0.expires_ms.map(to_utc)
    }
    /// Free tokens that will expire unused at that rate.
    #[getter]
    fn unused_at_expiry(&self) -> u64 {
        self.0.unused_at_expiry
    }
    /// The window the rate was measured over, in hours.
    #[getter]
    fn window_hours(&self) -> f64 {
        self.0.window_ms as f64 / 3_600_000.0
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        render(slf, "repr")
    }
}

/// A model's free quota at one moment.
#[pyclass(frozen, module = "quotaguard", name = "Quota")]
pub struct PyQuota(pub QuotaView);

#[pymethods]
impl PyQuota {
    #[getter]
    fn model(&self) -> &str {
        &self.0.model
    }
    #[getter]
    fn total(&self) -> u64 {
        self.0.total
    }
    #[getter]
    fn used(&self) -> u64 {
        self.0.used
    }
    #[getter]
    fn reserved(&self) -> u64 {
        self.0.reserved
    }
    #[getter]
    fn remaining(&self) -> u64 {
        self.0.remaining
    }
    #[getter]
    fn activated_at(&self) -> DateTime<Utc> {
        to_utc(self.0.activated_ms)
    }
    #[getter]
    fn expires_at(&self) -> DateTime<Utc> {
        to_utc(self.0.expires_ms)
    }
    #[getter]
    fn expired(&self) -> bool {
        self.0.expired
    }
    #[getter]
    fn free_only(&self) -> bool {
        self.0.free_only
    }
    /// Remaining as a fraction of the total (0.0 when there is none).
    #[getter]
    fn fraction_left(&self) -> f64 {
        if self.0.total == 0 {
            0.0
        } else {
            self.0.remaining as f64 / self.0.total as f64
        }
    }
    /// The console's way of writing it: `"362,917/1,000,000"`.
    #[getter]
    fn console(&self) -> String {
        format_console_figure(self.0.remaining, self.0.total)
    }
    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        render(slf, "repr")
    }
    fn __str__(slf: &Bound<'_, Self>) -> PyResult<String> {
        render(slf, "str")
    }
    fn _repr_html_(slf: &Bound<'_, Self>) -> PyResult<String> {
        render(slf, "html")
    }
}

/// One settled call (R11).
#[pyclass(frozen, module = "quotaguard", name = "UsageRecord")]
pub struct PyUsageRecord(pub UsageRecord);

#[pymethods]
impl PyUsageRecord {
    #[getter]
    fn id(&self) -> i64 {
        self.0.id
    }
    #[getter]
    fn time(&self) -> DateTime<Utc> {
        to_utc(self.0.time_ms)
    }
    #[getter]
    fn account(&self) -> &str {
        &self.0.account
    }
    #[getter]
    fn user(&self) -> &str {
        &self.0.user
    }
    #[getter]
    fn workspace(&self) -> Option<&str> {
        self.0.workspace.as_deref()
    }
    #[getter]
    fn model(&self) -> &str {
        &self.0.model
    }
    #[getter]
    fn kind(&self) -> &'static str {
        self.0.kind.as_str()
    }
    #[getter]
    fn request_id(&self) -> Option<&str> {
        self.0.request_id.as_deref()
    }
    #[getter]
    fn input_tokens(&self) -> u64 {
        self.0.input_tokens
    }
    #[getter]
    fn output_tokens(&self) -> u64 {
        self.0.output_tokens
    }
    #[getter]
    fn cached_tokens(&self) -> u64 {
        self.0.cached_tokens
    }
    #[getter]
    fn thinking(&self) -> bool {
        self.0.thinking
    }
    #[getter]
    fn free_tokens(&self) -> u64 {
        self.0.free_tokens
    }
    #[getter]
    fn billable_input_tokens(&self) -> u64 {
        self.0.billable_input_tokens
    }
    #[getter]
    fn billable_output_tokens(&self) -> u64 {
        self.0.billable_output_tokens
    }
    /// Exact cost; `None` when the model has no known price.
    #[getter]
    fn cost(&self) -> Option<Decimal> {
        self.0.cost.map(to_decimal)
    }
    #[getter]
    fn currency(&self) -> &'static str {
        self.0.currency.code()
    }
    #[getter]
    fn cost_type(&self) -> &'static str {
        self.0.cost_type.as_str()
    }
    /// The request may have reached the service with an unknown outcome: settled at
    /// its worst case (R9).
    #[getter]
    fn in_doubt(&self) -> bool {
        self.0.in_doubt
    }
    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        render(slf, "repr")
    }
    fn _repr_html_(slf: &Bound<'_, Self>) -> PyResult<String> {
        render(slf, "html")
    }
}

/// One model's line of a bill.
#[pyclass(frozen, module = "quotaguard", name = "BillLine")]
pub struct PyBillLine(pub BillLine, pub Currency);

#[pymethods]
impl PyBillLine {
    #[getter]
    fn model(&self) -> &str {
        &self.0.model
    }
    #[getter]
    fn calls(&self) -> u64 {
        self.0.calls
    }
    /// Tokens covered by free quota (the console's "Deducted Usage").
    #[getter]
    fn free_tokens(&self) -> u64 {
        self.0.free_tokens
    }
    #[getter]
    fn billable_input_tokens(&self) -> u64 {
        self.0.billable_input_tokens
    }
    #[getter]
    fn billable_output_tokens(&self) -> u64 {
        self.0.billable_output_tokens
    }
    #[getter]
    fn billable_tokens(&self) -> u64 {
        self.0.billable_input_tokens + self.0.billable_output_tokens
    }
    #[getter]
    fn cost(&self) -> Decimal {
        to_decimal(self.0.cost)
    }
    /// Calls whose billable tokens had no known price (not in `cost`).
    #[getter]
    fn unpriced_calls(&self) -> u64 {
        self.0.unpriced_calls
    }
    #[getter]
    fn currency(&self) -> &'static str {
        self.1.code()
    }
    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        render(slf, "repr")
    }
}

/// A bill for a CST month or day (R14).
#[pyclass(frozen, module = "quotaguard", name = "Bill")]
pub struct PyBill(pub Bill);

#[pymethods]
impl PyBill {
    #[getter]
    fn period(&self) -> &str {
        &self.0.period
    }
    #[getter]
    fn currency(&self) -> &'static str {
        self.0.currency.code()
    }
    #[getter]
    fn lines(&self) -> Vec<PyBillLine> {
        self.0
            .lines
            .iter()
            .map(|l| PyBillLine(l.clone(), self.0.currency))
            .collect()
    }
    #[getter]
    fn total(&self) -> Decimal {
        to_decimal(self.0.total)
    }
    #[getter]
    fn charged_models(&self) -> Vec<String> {
        self.0.charged_models.clone()
    }
    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        render(slf, "repr")
    }
    fn __str__(slf: &Bound<'_, Self>) -> PyResult<String> {
        render(slf, "str")
    }
    fn _repr_html_(slf: &Bound<'_, Self>) -> PyResult<String> {
        render(slf, "html")
    }
}

/// Calls of one model in one hour (R14).
#[pyclass(frozen, module = "quotaguard", name = "HourStats")]
pub struct PyHourStats(pub HourRow);

#[pymethods]
impl PyHourStats {
    #[getter]
    fn hour(&self) -> DateTime<Utc> {
        to_utc(self.0.hour_ms)
    }
    #[getter]
    fn model(&self) -> &str {
        &self.0.model
    }
    #[getter]
    fn calls(&self) -> u64 {
        self.0.calls
    }
    #[getter]
    fn refusals(&self) -> u64 {
        self.0.refusals
    }
    #[getter]
    fn failures(&self) -> u64 {
        self.0.failures
    }
    #[getter]
    fn input_tokens(&self) -> u64 {
        self.0.input_tokens
    }
    #[getter]
    fn output_tokens(&self) -> u64 {
        self.0.output_tokens
    }
    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        render(slf, "repr")
    }
    fn _repr_html_(slf: &Bound<'_, Self>) -> PyResult<String> {
        render(slf, "html")
    }
}

/// An alert that fired (R10).
#[pyclass(frozen, module = "quotaguard", name = "Alert")]
pub struct PyAlert(pub Alert, pub Currency);

#[pymethods]
impl PyAlert {
    /// `"quota_low"`, `"quota_depleted"`, `"quota_expiring"` or `"daily_spend"`.
    #[getter]
    fn kind(&self) -> &'static str {
        self.0.kind.as_str()
    }
    #[getter]
    fn model(&self) -> Option<&str> {
        self.0.model.as_deref()
    }
    #[getter]
    fn remaining(&self) -> u64 {
        self.0.remaining
    }
    #[getter]
    fn total(&self) -> u64 {
        self.0.total
    }
    /// The quota threshold as a fraction (quota alerts), or the spend limit (daily_spend).
    #[getter]
    fn threshold(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(match (self.0.threshold_ppm, self.0.limit) {
            (Some(ppm), _) => (ppm as f64 / 1_000_000.0)
                .into_pyobject(py)?
                .into_any()
                .unbind(),
            (None, Some(l)) => to_decimal(l).into_pyobject(py)?.into_any().unbind(),
            _ => py.None(),
        })
    }
    /// For `daily_spend`: the previous CST day's bill.
    #[getter]
    fn amount(&self) -> Option<Decimal> {
        self.0.amount.map(to_decimal)
    }
    #[getter]
    fn currency(&self) -> &'static str {
        self.1.code()
    }
    /// For `daily_spend`: the CST day the bill was for, `"YYYY-MM-DD"`.
    #[getter]
    fn day(&self) -> Option<String> {
        self.0.day.map(|d| d.to_string())
    }
    #[getter]
    fn time(&self) -> DateTime<Utc> {
        to_utc(self.0.time_ms)
    }
    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        render(slf, "repr")
    }
    fn __str__(slf: &Bound<'_, Self>) -> PyResult<String> {
        render(slf, "str")
    }
}
