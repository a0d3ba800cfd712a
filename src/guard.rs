//! `QuotaGuard` and `Reservation`: thin adapters from Python calls to `core::guard::Guard`.
use std::collections::HashSet;
use std::ffi::CString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use std::time::Duration;

use parking_lot::Mutex;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyMapping, PySequence, PyString};
use rust_decimal::Decimal;

use crate::convert::{amount, instant, number, opt_instant, opt_tokens, tokens};
use crate::errors::{
    type_error, LeaseExpiredWarning, LedgerPermissionWarning, NoFreeQuotaWarning, PyQuotaError,
    QuotaGuardError,
};
use crate::fork;
use crate::types::{PyAlert, PyBill, PyForecast, PyHourStats, PyQuota, PyUsageRecord};
use quotaguard_core::catalog::{Catalog, Site};
use quotaguard_core::clock::{check_time, cst_day, month_of, system_now_ms};
use quotaguard_core::config::{self, SpendRule};
use quotaguard_core::error::{QuotaError, RefusalReason, Result as QResult};
use quotaguard_core::guard::{BudgetHold, Config, FreeOnlyTarget, Guard, Usage};
use quotaguard_core::interrupt;
use quotaguard_core::ledger::{self, AccountOp, Alert, Now, RecordQuery, ReservationRow};
use quotaguard_core::money::to_decimal;
use quotaguard_core::rules::{CostType, Kind};
use quotaguard_core::tokens::{self, ChatMessage, Vocabulary};

static BUNDLED: OnceLock<Arc<Catalog>> = OnceLock::new();

/// Runs `f` with the interpreter detached, inside the fork gate ([`crate::fork`]).
fn gated<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> T {
    py.detach(|| {
        let _pass = fork::enter();
        f()
    })
}

/// Runs blocking core work (ledger I/O) detached and inside the fork gate; a wait in
/// it (a SQLite ledger locked by another process) runs the interpreter's signal
/// handlers between short slices, so Ctrl-C raises `KeyboardInterrupt` at once, with
/// nothing recorded. No lock of the core is held while they run.
pub(crate) fn blocking<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> QResult<T> + Send,
) -> PyResult<T> {
    let caught: Arc<Mutex<Option<PyErr>>> = Arc::new(Mutex::new(None));
    let sink = Arc::clone(&caught);
    let out = gated(py, move || {
        let check = move || {
            Python::attach(|py| match py.check_signals() {
                Ok(()) => false,
                Err(e) => {
                    *sink.lock() = Some(e);
                    true
                }
            })
        };
        interrupt::with_check(check, f)
    });
    match out {
        Err(e @ QuotaError::Interrupted(_)) => match caught.lock().take() {
            Some(signal) => Err(signal),
            None => Err(PyQuotaError(e).into()),
        },
        other => q(other),
    }
}

/// Before `os.fork()` (registered by `quotaguard`): waits (a minute at most) until no
/// thread is inside detached core work, and keeps new work out across the fork.
#[pyfunction]
pub fn _fork_prepare(py: Python<'_>) {
    py.detach(|| fork::close(Duration::from_secs(60)));
}

/// After `os.fork()`, in the parent: lets work in again.
#[pyfunction]
pub fn _fork_parent() {
    fork::open();
}

/// After `os.fork()`, in the child: lets work in again; the threads that were inside
/// in the parent do not exist here.
#[pyfunction]
pub fn _fork_child() {
    fork::reset_in_child();
}

/// Hides the password of every URL in `text` (messages shown on a terminal).
#[pyfunction]
pub fn _redact(text: &str) -> String {
    config::redact_text(text)
}

/// The Qwen vocabulary, loaded on first use with the interpreter detached.
fn vocabulary(py: Python<'_>) -> Option<Arc<Vocabulary>> {
    match tokens::loaded_vocabulary() {
        Some(ready) => ready,
        None => gated(py, tokens::vocabulary),
    }
}

/// The input bound of chat messages (`(role, content)` pairs), with the interpreter
/// detached for long texts.
fn chat_tokens(py: Python<'_>, pairs: &[(String, String)]) -> u64 {
    let vocab = vocabulary(py);
    let v = vocab.as_deref();
    let work = || {
        let msgs: Vec<ChatMessage<'_>> = pairs
            .iter()
            .map(|(r, c)| ChatMessage {
                role: r,
                content: c,
            })
            .collect();
        tokens::chat_bound(v, &msgs)
    };
    let size: usize = pairs.iter().map(|(_, c)| c.len()).sum();
    if size > 4096 {
        gated(py, work)
    } else {
        work()
    }
}

/// Points the input bound at a `qwen.tiktoken` vocabulary file, and starts loading it
/// in the background.
#[pyfunction]
pub fn set_vocabulary(path: Option<PathBuf>) {
    let load = path.is_some();
    tokens::set_vocabulary_path(path);
    if load {
        // Parse it now in a thread of its own (inside the fork gate, so that a fork
        // waits for it and the child, without this thread, loads on its first call):
        // the first call then finds it loaded, or waits on the load under way.
        let _ = std::thread::Builder::new()
            .name("quotaguard-vocabulary".into())
            .spawn(|| {
                let _pass = fork::enter();
                tokens::vocabulary();
            });
    }
}

/// The exact Qwen token count of `text`, or `None` without the vocabulary.
#[pyfunction]
pub fn count_tokens(py: Python<'_>, text: &str) -> Option<u64> {
    let v = vocabulary(py)?;
    Some(if text.len() > 4096 {
        gated(py, || v.count(text))
    } else {
        v.count(text)
    })
}

/// The path of the vocabulary the input bound uses, if any.
#[pyfunction]
pub fn vocabulary_path() -> Option<PathBuf> {
    tokens::vocabulary_path()
}

fn q<T>(r: QResult<T>) -> PyResult<T> {
    r.map_err(|e| PyQuotaError(e).into())
}

/// The free-quota guard. The Python class `quotaguard.QuotaGuard` extends it.
#[pyclass(frozen, subclass, module = "quotaguard._core", name = "QuotaGuard")]
pub struct PyQuotaGuard {
    inner: Arc<Guard>,
    clock: Option<Py<PyAny>>,
    /// SQLite or network I/O: detach from the interpreter around ledger calls.
    blocking: bool,
    alert_sink: Mutex<Option<Py<PyAny>>>,
    warned_unpriced: Mutex<HashSet<String>>,
    /// Models whose first paid call was checked for a missing free quota.
    warned_no_free: Mutex<HashSet<String>>,
}

impl PyQuotaGuard {
    /// Now: the test clock's reading, or the system clock's (which a ledger with a
    /// clock of its own, a Redis server, may replace with its own).
    fn now_ms(&self, py: Python<'_>) -> PyResult<Now> {
        match &self.clock {
            None => Ok(Now::System(system_now_ms())),
            Some(c) => {
                let ms = instant(&c.bind(py).call0()?, "clock()")?;
                Ok(Now::Caller(q(check_time("clock()", ms))?))
            }
        }
    }

    fn run<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&Guard) -> QResult<T> + Send,
    ) -> PyResult<T> {
        let g = &*self.inner;
        if self.blocking {
            blocking(py, || f(g))
        } else {
            q(f(g))
        }
    }

    fn dispatch(&self, py: Python<'_>, alerts: Vec<Alert>) -> PyResult<()> {
        if alerts.is_empty() {
            return Ok(());
        }
        let sink = self.alert_sink.lock().as_ref().map(|s| s.clone_ref(py));
        let cur = self.inner.currency();
        let objs: Vec<PyAlert> = alerts.into_iter().map(|a| PyAlert(a, cur)).collect();
        match sink {
            Some(s) => {
                s.bind(py).call1((objs,))?;
            }
            None => {
                let log = py
                    .import("logging")?
                    .call_method1("getLogger", ("quotaguard",))?;
                for a in objs {
                    let text = Bound::new(py, a)?.str()?;
                    log.call_method1("warning", ("%s", text))?;
                }
            }
        }
        Ok(())
    }

    fn warn_unpriced(&self, py: Python<'_>, model: &str) -> PyResult<()> {
        if !self.warned_unpriced.lock().insert(model.to_string()) {
            return Ok(());
        }
        let log = py
            .import("logging")?
            .call_method1("getLogger", ("quotaguard",))?;
        log.call_method1(
            "warning",
            (
                "%r has no known price on the %s site in %s: its billable tokens are recorded as unpriced, \
                 not as free; add its prices with QuotaGuard(catalog=...)",
                model,
                self.inner.config.site.name(),
                &self.inner.config.region,
            ),
        )?;
        Ok(())
    }
}

impl PyQuotaGuard {
    /// After a hold: `warn_no_free_quota` when the call is not wholly covered by free
    /// quota. A warning turned into an error releases the hold: the call is not made.
    fn warn_if_not_free(
        &self,
        py: Python<'_>,
        model: &str,
        row: &ReservationRow,
        hold: &BudgetHold,
        now: Now,
    ) -> PyResult<()> {
        if row.free_part < row.worst {
            if let Err(e) = self.warn_no_free_quota(py, model, now) {
                let _ = self.run(py, |g| g.release(row, hold, true, now));
                return Err(e);
            }
        }
        Ok(())
    }

    /// The first call to `model` that free quota does not cover in full: a
    /// `NoFreeQuotaWarning` (once per guard and model) when the model has no free quota
    /// here at all: never granted (a name the catalogue does not know gets the closest
    /// ones), or the guard's region has none. Pointed at the caller's line.
    fn warn_no_free_quota(&self, py: Python<'_>, model: &str, now: Now) -> PyResult<()> {
        if !self.warned_no_free.lock().insert(model.to_string()) {
            return Ok(());
        }
        let cfg = &self.inner.config;
        let free_region = cfg.site.free_region();
        let catalog = self.inner.catalog();
        let msg = if cfg.region != free_region {
            format!(
                "calls to {model:?}{} are charged: this guard's region {} has no free quota (on the \
                 {} site only {free_region} has). If the calls go to {free_region}, say so: \
                 QuotaGuard(region={free_region:?})",
                catalog.did_you_mean(model),
                cfg.region,
                cfg.site.name(),
            )
        } else {
            let total = self.run(py, |g| g.quota(model, now))?.total;
            if total > 0 {
                return Ok(());
            }
            if catalog.model(model).is_some() {
                format!(
                    "calls to {model:?} are charged: it has no free quota in the ledger (never \
                     granted). If the console shows a free quota for it, record it: \
                     guard.grant({model:?}) (`quotaguard grant {model}`)"
                )
            } else {
                format!(
                    "calls to {model:?} are charged: it has no free quota in the ledger, and the \
                     catalogue does not know the name{}. Check the model name; a model with a \
                     free quota needs guard.grant(model) (`quotaguard grant MODEL`)",
                    catalog.did_you_mean(model)
                )
            }
        };
        py.import("quotaguard.exceptions")?
            .getattr("_warn_outside")?
            .call1((msg, py.get_type::<NoFreeQuotaWarning>()))?;
        Ok(())
    }
}

fn ledger_arg(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<String>> {
    match obj {
        None => Ok(None),
        Some(o) if o.is_none() => Ok(None),
        Some(o) if o.is_instance_of::<PyString>() => Ok(Some(o.extract()?)),
        Some(o) if o.hasattr("__fspath__")? => Ok(Some(o.call_method0("__fspath__")?.extract()?)),
        Some(o) => Err(type_error(format!(
            "ledger must be a str or path, not {}",
            o.get_type().name()?
        ))),
    }
}

fn spend_rules(obj: &Bound<'_, PyAny>) -> PyResult<Vec<SpendRule>> {
    if obj.is_none() {
        return Ok(Vec::new());
    }
    if let Ok(map) = obj.cast::<PyMapping>() {
        let mut out = Vec::new();
        for item in map.items()?.iter() {
            let (k, v): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item.extract()?;
            let model: Option<String> = if k.is_none() {
                None
            } else {
                Some(k.extract()?)
            };
            let limit = amount(&v, "daily_spend_alert amount")?;
            out.push(q(SpendRule::new(model, limit, "daily_spend_alert amount"))?);
        }
        return Ok(out);
    }
    let limit = amount(obj, "daily_spend_alert")?;
    Ok(vec![q(SpendRule::new(None, limit, "daily_spend_alert"))?])
}

/// A quota alert threshold: a number in [0, 1] (not a bool), as parts per million.
fn threshold(v: &Bound<'_, PyAny>, what: &str) -> PyResult<u32> {
    if v.is_instance_of::<pyo3::types::PyBool>() {
        return Err(type_error(format!(
            "{what} must be a number in [0, 1] or None, not bool"
        )));
    }
    let f: f64 = v
        .extract()
        .map_err(|_| type_error(format!("{what} must be a number in [0, 1] or None")))?;
    q(config::threshold_ppm(f)
        .map_err(|_| quotaguard_core::error::invalid(format!("{what} {f} is outside [0, 1]"))))
}

fn text_of(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<String> {
    if obj.is_none() {
        return Ok(String::new());
    }
    match obj.cast::<PyString>() {
        // Lone surrogates cannot be UTF-8: count them as U+FFFD, as the tokenizer does.
        Ok(s) => Ok(s.to_string_lossy().into_owned()),
        Err(_) => Err(type_error(format!(
            "{what} must be a str, not {}",
            obj.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))),
    }
}

/// The keys of a chat request body the fast path reads, or knows not to bear on what
/// the call may bill. Any other key sends the body to the full reading.
const FAST_CHAT_KEYS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "enable_thinking",
    "thinking_budget",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logprobs",
    "top_logprobs",
    "response_format",
    "user",
];

/// A chat request read by the fast path: exactly what the full reading finds for it.
struct FastChat {
    model: String,
    pairs: Vec<(String, String)>,
    max_tokens: u64,
    thinking_tokens: u64,
    choices: u64,
    thinking: bool,
}

/// A whole-number option as the full reading takes it: `Ok(None)` when absent or not an
/// int (a bool is not one), `Err(())` for one the fast path leaves to the full reading
/// (negative, or beyond any token count).
fn fast_int(v: Option<Bound<'_, PyAny>>) -> Result<Option<u64>, ()> {
    let Some(v) = v else { return Ok(None) };
    if !v.is_instance_of::<pyo3::types::PyInt>() || v.is_instance_of::<pyo3::types::PyBool>() {
        return Ok(None);
    }
    match v.extract::<u64>() {
        Ok(n) if n <= 1_000_000_000 => Ok(Some(n)),
        _ => Err(()),
    }
}

impl FastChat {
    fn read(body: &Bound<'_, PyDict>, guard: &Guard) -> PyResult<Option<Self>> {
        for key in body.keys() {
            let key = key.cast_into::<PyString>().map_err(PyErr::from)?;
            if !FAST_CHAT_KEYS.contains(&key.to_str()?) {
                return Ok(None);
            }
        }
        let model = match body.get_item("model")? {
            Some(m) => match m.cast::<PyString>() {
                Ok(m) if !m.to_str()?.is_empty() => m.to_str()?.to_string(),
                _ => return Ok(None),
            },
            None => return Ok(None),
        };
        let Some(messages) = body.get_item("messages")? else {
            return Ok(None);
        };
        let Ok(messages) = messages.cast::<PyList>() else {
            return Ok(None);
        };
        let mut pairs = Vec::with_capacity(messages.len());
        for m in messages.iter() {
            let Ok(m) = m.cast::<PyDict>() else {
                return Ok(None);
            };
            let mut role = String::from("user");
            let mut content = String::new();
            for (k, v) in m.iter() {
                let Ok(k) = k.cast::<PyString>() else {
                    return Ok(None);
                };
                match k.to_str()? {
                    "role" if v.is_none() => {}
                    "role" => match v.cast::<PyString>() {
                        Ok(r) => {
                            let r = r.to_string_lossy();
                            if r == "tool" || r == "function" {
                                return Ok(None); // framed as a tool result
                            }
                            if !r.is_empty() {
                                role = r.into_owned();
                            }
                        }
                        Err(_) => return Ok(None),
                    },
                    "content" if v.is_none() => {}
                    "content" => match v.cast::<PyString>() {
                        Ok(c) => {
                            let c = c.to_string_lossy();
                            if c.contains("fileid://") {
                                return Ok(None); // unbounded: the full reading decides
                            }
                            content = c.into_owned();
                        }
                        Err(_) => return Ok(None),
                    },
                    _ => return Ok(None),
                }
            }
            pairs.push((role, content));
        }
        let catalog = guard.catalog();
        let known = catalog.model(&model);
        let Ok(max_tokens) = fast_int(body.get_item("max_tokens")?) else {
            return Ok(None);
        };
        let max_tokens = match max_tokens {
            Some(n) => n,
            None => match fast_int(body.get_item("max_completion_tokens")?) {
                Ok(Some(n)) => n,
                Ok(None) => catalog.default_max_output(&model),
                Err(()) => return Ok(None),
            },
        };
        let mode = known.map_or(quotaguard_core::catalog::Thinking::None, |m| m.thinking);
        let thinking = match mode {
            quotaguard_core::catalog::Thinking::Always => true,
            _ => match body.get_item("enable_thinking")? {
                Some(v) if !v.is_none() => match v.cast::<pyo3::types::PyBool>() {
                    Ok(b) => b.is_true(),
                    Err(_) => return Ok(None),
                },
                _ => mode == quotaguard_core::catalog::Thinking::Default,
            },
        };
        let thinking_tokens = if thinking {
            match fast_int(body.get_item("thinking_budget")?) {
                Ok(Some(n)) => n,
                Ok(None) => known.map_or(catalog.defaults.max_reasoning_tokens, |m| {
                    m.max_reasoning_tokens
                }),
                Err(()) => return Ok(None),
            }
        } else {
            0
        };
        let choices = match fast_int(body.get_item("n")?) {
            Ok(n) => n.unwrap_or(1).max(1),
            Err(()) => return Ok(None),
        };
        Ok(Some(Self {
            model,
            pairs,
            max_tokens,
            thinking_tokens,
            choices,
            thinking,
        }))
    }
}

#[pymethods]
impl PyQuotaGuard {
    #[new]
    #[pyo3(signature = (
        ledger=None, account="default", user="root", workspace=None,
        region="cn-beijing", site="china", verified=true, catalog=None,
        lease_seconds=None, clock=None
    ))]
    #[pyo3(
        text_signature = "(ledger=None, account='default', user='root', workspace=None, \
        region='cn-beijing', site='china', verified=True, catalog=None, lease_seconds=600.0, \
        clock=None)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn py_new(
        py: Python<'_>,
        ledger: Option<&Bound<'_, PyAny>>,
        account: &str,
        user: &str,
        workspace: Option<String>,
        region: &str,
        site: &str,
        verified: bool,
        catalog: Option<PathBuf>,
        lease_seconds: Option<&Bound<'_, PyAny>>,
        clock: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        let lease_seconds = match lease_seconds {
            Some(v) if !v.is_none() => number(v, "lease_seconds", "seconds")?,
            _ => 600.0,
        };
        let config = Config {
            account: account.to_string(),
            user: user.to_string(),
            workspace,
            region: region.to_string(),
            site: q(Site::parse(site))?,
            verified,
            lease_ms: q(config::lease_ms(lease_seconds))?,
        };
        q(config.validate())?;
        let catalog = match catalog {
            None => BUNDLED.get_or_init(|| Arc::new(Catalog::bundled())).clone(),
            Some(p) => Arc::new(q(Catalog::with_overrides(&p))?),
        };
        let given = ledger_arg(ledger)?;
        let (url, default_dir) = q(config::resolve_ledger(given.as_deref()))?;
        let blocking = !matches!(url, config::LedgerUrl::Memory);
        let guard = self::blocking(py, || {
            let g = Guard::new(config, ledger::open(&url, default_dir.as_deref())?, catalog)?;
            // Settles a crash or an outage left half-way are completed before the first call.
            g.recover()?;
            Ok(g)
        })?;
        let warn = py.get_type::<LedgerPermissionWarning>();
        for w in guard.ledger_warnings() {
            let msg = format!("ledger {}: {w}", config::redacted(guard.ledger_name()));
            // Level 2: the user's line that made the guard, not quotaguard's own.
            PyErr::warn(py, warn.as_any(), &CString::new(msg).unwrap_or_default(), 2)?;
        }
        Ok(Self {
            inner: Arc::new(guard),
            clock,
            blocking,
            alert_sink: Mutex::new(None),
            warned_unpriced: Mutex::new(HashSet::new()),
            warned_no_free: Mutex::new(HashSet::new()),
        })
    }

    // ---- configuration ----

    /// Where the ledger lives (a path or URL without secrets).
    #[getter]
    fn ledger(&self) -> String {
        config::redacted(self.inner.ledger_name())
    }
    #[getter]
    fn account(&self) -> &str {
        &self.inner.config.account
    }
    #[getter]
    fn user(&self) -> &str {
        &self.inner.config.user
    }
    #[getter]
    fn workspace(&self) -> Option<&str> {
        self.inner.config.workspace.as_deref()
    }
    #[getter]
    fn region(&self) -> &str {
        &self.inner.config.region
    }
    #[getter]
    fn site(&self) -> &'static str {
        self.inner.config.site.name()
    }
    #[getter]
    fn verified(&self) -> bool {
        self.inner.config.verified
    }
    #[getter]
    fn lease_seconds(&self) -> f64 {
        self.inner.config.lease_ms as f64 / 1000.0
    }
    /// `"CNY"` on the China site, `"USD"` on the international site.
    #[getter]
    fn currency(&self) -> &'static str {
        self.inner.currency().code()
    }

    /// The current time as the guard sees it (its clock), an aware UTC datetime.
    fn now(&self, py: Python<'_>) -> PyResult<chrono::DateTime<chrono::Utc>> {
        Ok(quotaguard_core::clock::to_utc(self.now_ms(py)?.ms()))
    }

    // ---- quota ----

    #[pyo3(signature = (model, tokens=None, activated_at=None, valid_days=None))]
    fn grant(
        &self,
        py: Python<'_>,
        model: &str,
        tokens: Option<&Bound<'_, PyAny>>,
        activated_at: Option<&Bound<'_, PyAny>>,
        valid_days: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyQuota> {
        let total = opt_tokens(tokens, "tokens")?;
        let activated = opt_instant(activated_at, "activated_at")?;
        let days: Option<i64> = match valid_days {
            None => None,
            Some(v) if v.is_none() => None,
            Some(v) => Some(tokens_i64(v, "valid_days")?),
        };
        let now = self.now_ms(py)?;
        self.run(py, |g| g.grant(model, total, activated, days, now))
            .map(PyQuota)
    }

    fn remaining(&self, py: Python<'_>, model: &str) -> PyResult<u64> {
        let now = self.now_ms(py)?;
        self.run(py, |g| g.remaining(model, now))
    }

    fn quota(&self, py: Python<'_>, model: &str) -> PyResult<PyQuota> {
        let now = self.now_ms(py)?;
        self.run(py, |g| g.quota(model, now)).map(PyQuota)
    }

    fn quotas(&self, py: Python<'_>) -> PyResult<Vec<PyQuota>> {
        let now = self.now_ms(py)?;
        Ok(self
            .run(py, |g| g.quotas(now))?
            .into_iter()
            .map(PyQuota)
            .collect())
    }

    /// R5. `models`: a name, a list of names, or `"all"` (enable for all eligible
    /// models not yet configured). Returns the models changed.
    #[pyo3(signature = (models, enabled=true))]
    fn set_free_only(
        &self,
        py: Python<'_>,
        models: &Bound<'_, PyAny>,
        enabled: bool,
    ) -> PyResult<Vec<String>> {
        let target = if let Ok(s) = models.extract::<String>() {
            if s == "all" {
                FreeOnlyTarget::AllEligible
            } else {
                FreeOnlyTarget::Models(vec![s])
            }
        } else if let Ok(seq) = models.cast::<PySequence>() {
            let mut v = Vec::new();
            for item in seq.try_iter()? {
                let item = item?;
                v.push(item.extract::<String>().map_err(|_| {
                    type_error(format!(
                        "models must hold model names (str), not {}",
                        item.repr().map(|r| r.to_string()).unwrap_or_default()
                    ))
                })?);
            }
            FreeOnlyTarget::Models(v)
        } else {
            return Err(type_error(
                "models must be a model name, a list of names, or \"all\"",
            ));
        };
        let now = self.now_ms(py)?;
        self.run(py, |g| g.set_free_only(target, enabled, now))
    }

    /// R12: the console's figure, e.g. `"362,917/1,000,000"`: sets the total and lowers the
    /// remaining, never raising it above the ledger's own (the console lags), unless `force`.
    #[pyo3(signature = (model, console_text, force=false))]
    fn sync(
        &self,
        py: Python<'_>,
        model: &str,
        console_text: &str,
        force: bool,
    ) -> PyResult<PyQuota> {
        let now = self.now_ms(py)?;
        let (q, alerts) = self.run(py, |g| g.sync(model, console_text, force, now))?;
        self.dispatch(py, alerts)?;
        Ok(PyQuota(q))
    }

    /// R12: the service answered `AllocationQuota.FreeTierOnly` for `model`.
    fn _mark_depleted(&self, py: Python<'_>, model: &str) -> PyResult<PyQuota> {
        let now = self.now_ms(py)?;
        let (q, alerts) = self.run(py, |g| g.mark_depleted(model, now))?;
        self.dispatch(py, alerts)?;
        Ok(PyQuota(q))
    }

    // ---- calls ----

    /// The output limit assumed for a call that states no `max_tokens`.
    fn default_max_output(&self, model: &str) -> u64 {
        self.inner.default_max_output(model)
    }

    /// R8: an upper bound of the input tokens the service bills for a request.
    #[pyo3(signature = (*, messages=None, prompt=None, input=None, extra_tokens=None))]
    fn input_bound(
        &self,
        py: Python<'_>,
        messages: Option<&Bound<'_, PyAny>>,
        prompt: Option<&Bound<'_, PyAny>>,
        input: Option<&Bound<'_, PyAny>>,
        extra_tokens: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<u64> {
        let extra = opt_tokens(extra_tokens, "extra_tokens")?.unwrap_or(0);
        let vocab = vocabulary(py);
        let mut pairs: Vec<(String, String)> = Vec::new();
        let mut chat = false;
        if let Some(ms) = messages.filter(|m| !m.is_none()) {
            chat = true;
            for (i, m) in ms.try_iter()?.enumerate() {
                let m = m?;
                let (role, content) = if let Ok(d) = m.cast::<PyDict>() {
                    (d.get_item("role")?, d.get_item("content")?)
                } else {
                    (m.getattr("role").ok(), m.getattr("content").ok())
                };
                let role = match role {
                    Some(r) => text_of(&r, &format!("messages[{i}][\"role\"]"))?,
                    None => {
                        return Err(PyValueError::new_err(format!(
                            "messages[{i}] has no \"role\""
                        )))
                    }
                };
                let content = match content {
                    Some(c) => text_of(&c, &format!("messages[{i}][\"content\"]"))?,
                    None => String::new(),
                };
                pairs.push((role, content));
            }
        }
        if let Some(p) = prompt.filter(|p| !p.is_none()) {
            chat = true;
            pairs.push(("user".into(), text_of(p, "prompt")?));
        }
        let mut texts: Vec<String> = Vec::new();
        if let Some(inp) = input.filter(|i| !i.is_none()) {
            if inp.is_instance_of::<PyString>() {
                texts.push(inp.extract()?);
            } else {
                for (i, t) in inp.try_iter()?.enumerate() {
                    texts.push(text_of(&t?, &format!("input[{i}]"))?);
                }
            }
        }
        let v = vocab.as_deref();
        let work = || {
            let mut n = 0u64;
            if chat {
                let msgs: Vec<ChatMessage<'_>> = pairs
                    .iter()
                    .map(|(r, c)| ChatMessage {
                        role: r,
                        content: c,
                    })
                    .collect();
                n += tokens::chat_bound(v, &msgs);
            }
            n += texts.iter().map(|t| tokens::text_bound(v, t)).sum::<u64>();
            n
        };
        let size: usize = pairs.iter().map(|(_, c)| c.len()).sum::<usize>()
            + texts.iter().map(String::len).sum::<usize>();
        let n = if size > 4096 { gated(py, work) } else { work() };
        Ok(n + extra)
    }

    /// R8/R9: hold the worst case of a call before sending it. `thinking`: the call
    /// runs in thinking mode, so its output is priced (and settled) as reasoning.
    #[pyo3(signature = (model, input_tokens, max_output_tokens, kind="realtime", *, thinking=false))]
    fn reserve(
        slf: &Bound<'_, Self>,
        model: &str,
        input_tokens: &Bound<'_, PyAny>,
        max_output_tokens: &Bound<'_, PyAny>,
        kind: &str,
        thinking: bool,
    ) -> PyResult<PyReservation> {
        let py = slf.py();
        let me = slf.get();
        let input = tokens(input_tokens, "input_tokens")?;
        let max_out = tokens(max_output_tokens, "max_output_tokens")?;
        let kind = q(Kind::parse(kind))?;
        let now = me.now_ms(py)?;
        let (row, hold) = me.run(py, |g| {
            g.reserve(model, input, max_out, kind, thinking, now)
        })?;
        me.warn_if_not_free(py, model, &row, &hold, now)?;
        Ok(PyReservation {
            guard: slf.clone().unbind(),
            row,
            hold,
            max_output_tokens: max_out,
            done: AtomicBool::new(false),
        })
    }

    /// The fast path of a guarded chat call: from its request body as it is (a dict),
    /// counts the input and reserves the worst case in one step. `None` when the body
    /// holds anything this path does not read exactly as the full reading does (tools,
    /// content parts, nested options, another endpoint's fields): nothing is held then,
    /// and the caller reads the request in full. Returns `(reservation, model,
    /// input_tokens, max_tokens, thinking_tokens, choices, thinking)`.
    #[pyo3(signature = (body, kind="realtime"))]
    #[allow(clippy::type_complexity)]
    fn _reserve_chat(
        slf: &Bound<'_, Self>,
        body: &Bound<'_, PyDict>,
        kind: &str,
    ) -> PyResult<Option<(PyReservation, String, u64, u64, u64, u64, bool)>> {
        let py = slf.py();
        let me = slf.get();
        let Some(chat) = FastChat::read(body, &me.inner)? else {
            return Ok(None);
        };
        let input = chat_tokens(py, &chat.pairs);
        let max_out = chat
            .max_tokens
            .saturating_add(chat.thinking_tokens)
            .saturating_mul(chat.choices);
        let kind = q(Kind::parse(kind))?;
        let now = me.now_ms(py)?;
        let (model, thinking) = (chat.model.as_str(), chat.thinking);
        let (row, hold) = me.run(py, |g| {
            g.reserve(model, input, max_out, kind, thinking, now)
        })?;
        me.warn_if_not_free(py, model, &row, &hold, now)?;
        let reservation = PyReservation {
            guard: slf.clone().unbind(),
            row,
            hold,
            max_output_tokens: max_out,
            done: AtomicBool::new(false),
        };
        Ok(Some((
            reservation,
            chat.model,
            input,
            chat.max_tokens,
            chat.thinking_tokens,
            chat.choices,
            chat.thinking,
        )))
    }

    /// R6-R8 for a call whose cost is not known before it is sent: `reason` is
    /// `"unbounded"` (input that cannot be bounded) or `"unguarded"` (a method the
    /// wrapper cannot guard); `detail` says what. Raises `FreeTierOnly` (or
    /// `AccountOverdue`) where a chargeable call would be refused.
    #[pyo3(signature = (model, reason, detail))]
    fn _check_uncounted(
        &self,
        py: Python<'_>,
        model: Option<&str>,
        reason: &str,
        detail: &str,
    ) -> PyResult<()> {
        let reason = match reason {
            "unbounded" => RefusalReason::Unbounded,
            "unguarded" => RefusalReason::Unguarded,
            other => {
                return Err(PyValueError::new_err(format!(
                    "reason {other:?} is not \"unbounded\" or \"unguarded\""
                )))
            }
        };
        let now = self.now_ms(py)?;
        self.run(py, |g| g.check_uncounted(model, reason, detail, now))
    }

    /// R9/R11: records usage that had no reservation (an application's models, a
    /// batch's other models).
    #[pyo3(signature = (model, input_tokens, output_tokens, request_id=None, *, kind="realtime", cached_tokens=None, thinking=false))]
    #[allow(clippy::too_many_arguments)]
    fn _record_usage(
        &self,
        py: Python<'_>,
        model: &str,
        input_tokens: &Bound<'_, PyAny>,
        output_tokens: &Bound<'_, PyAny>,
        request_id: Option<String>,
        kind: &str,
        cached_tokens: Option<&Bound<'_, PyAny>>,
        thinking: bool,
    ) -> PyResult<PyUsageRecord> {
        let usage = Usage {
            input_tokens: tokens(input_tokens, "input_tokens")?,
            output_tokens: tokens(output_tokens, "output_tokens")?,
            cached_tokens: opt_tokens(cached_tokens, "cached_tokens")?.unwrap_or(0),
            thinking,
            ..Default::default()
        };
        let kind = q(Kind::parse(kind))?;
        let now = self.now_ms(py)?;
        let rid = request_id.as_deref();
        let out = self.run(py, |g| g.record_usage(model, kind, &usage, rid, now))?;
        self.dispatch(py, out.alerts)?;
        if out.record.cost_type == CostType::Unpriced {
            self.warn_unpriced(py, model)?;
        }
        Ok(PyUsageRecord(out.record))
    }

    /// What the catalogue says of a model's reasoning and output (its defaults when the
    /// catalogue does not know it): `{"known", "thinking", "max_reasoning_tokens",
    /// "max_output_tokens", "default_max_output_tokens", "max_image_tokens"}`.
    fn model_info<'py>(&self, py: Python<'py>, model: &str) -> PyResult<Bound<'py, PyDict>> {
        let c = self.inner.catalog();
        let d = PyDict::new(py);
        let m = c.model(model);
        d.set_item("known", m.is_some())?;
        d.set_item("closest", c.closest(model))?;
        d.set_item(
            "thinking",
            m.map_or(quotaguard_core::catalog::Thinking::None, |m| m.thinking)
                .as_str(),
        )?;
        d.set_item(
            "max_reasoning_tokens",
            m.map_or(c.defaults.max_reasoning_tokens, |m| m.max_reasoning_tokens),
        )?;
        d.set_item(
            "max_output_tokens",
            m.map_or(c.defaults.max_output_tokens, |m| m.max_output_tokens),
        )?;
        d.set_item("default_max_output_tokens", c.default_max_output(model))?;
        d.set_item(
            "max_image_tokens",
            m.map_or(c.defaults.max_image_tokens, |m| m.max_image_tokens),
        )?;
        Ok(d)
    }

    // ---- money ----

    /// The tracked balance (R7), or `None` until one is stated.
    #[getter]
    fn balance(&self, py: Python<'_>) -> PyResult<Option<Decimal>> {
        Ok(self.run(py, |g| g.account_state())?.balance.map(to_decimal))
    }

    #[getter]
    fn overdue(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.run(py, |g| g.account_state())?.overdue)
    }

    /// Adds to the balance (starting to track it); a balance of zero or more clears overdue.
    fn top_up(&self, py: Python<'_>, amount: &Bound<'_, PyAny>) -> PyResult<Option<Decimal>> {
        let a = self::amount(amount, "amount")?;
        Ok(self
            .run(py, |g| g.update_account(AccountOp::TopUp(a)))?
            .balance
            .map(to_decimal))
    }

    fn set_balance(&self, py: Python<'_>, amount: &Bound<'_, PyAny>) -> PyResult<Option<Decimal>> {
        let a = self::amount(amount, "balance")?;
        Ok(self
            .run(py, |g| g.update_account(AccountOp::SetBalance(a)))?
            .balance
            .map(to_decimal))
    }

    fn mark_overdue(&self, py: Python<'_>) -> PyResult<()> {
        self.run(py, |g| g.update_account(AccountOp::MarkOverdue))
            .map(|_| ())
    }

    // ---- alerts ----

    /// Quota alerts fire at or below this fraction of a model's total; `None`: off.
    #[getter]
    fn get_alert_threshold(&self) -> Option<f64> {
        self.inner.threshold_ppm().map(|p| p as f64 / 1_000_000.0)
    }

    #[setter]
    fn set_alert_threshold(&self, value: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let ppm = match value {
            None => None,
            Some(v) if v.is_none() => None,
            Some(v) => Some(threshold(v, "alert_threshold")?),
        };
        self.inner.set_threshold_ppm(ppm);
        Ok(())
    }

    /// High-spending alert: an amount (whole account) or `{model: amount}`; `None`: off.
    #[getter]
    fn get_daily_spend_alert(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let rules_ = self.inner.spend_rules();
        if rules_.is_empty() {
            return Ok(py.None());
        }
        if rules_.len() == 1 && rules_[0].model.is_none() {
            return Ok(to_decimal(rules_[0].limit)
                .into_pyobject(py)?
                .into_any()
                .unbind());
        }
        let d = PyDict::new(py);
        for r in rules_.iter() {
            d.set_item(r.model.clone(), to_decimal(r.limit))?;
        }
        Ok(d.into_any().unbind())
    }

    #[setter]
    fn set_daily_spend_alert(&self, value: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let rules_ = match value {
            None => Vec::new(),
            Some(v) => spend_rules(v)?,
        };
        self.inner.set_spend_rules(rules_);
        Ok(())
    }

    /// Evaluates the alerts that come with time rather than with a call now (the
    /// high-spending alert, expiry, and quota marks already reached), for processes that
    /// make no calls. Each still fires once across every process.
    fn check_alerts(&self, py: Python<'_>) -> PyResult<Vec<PyAlert>> {
        let now = self.now_ms(py)?;
        let alerts = self.run(py, |g| {
            let mut a = g.check_quota_alerts(now)?;
            a.extend(g.check_spend(now)?);
            Ok(a)
        })?;
        let cur = self.inner.currency();
        let out = alerts.iter().cloned().map(|a| PyAlert(a, cur)).collect();
        self.dispatch(py, alerts)?;
        Ok(out)
    }

    /// Quota alert thresholds, each a fraction in [0, 1] firing once per model; `[]`: off.
    #[getter]
    fn get_alert_thresholds(&self) -> Vec<f64> {
        self.inner
            .thresholds()
            .iter()
            .map(|p| f64::from(*p) / 1_000_000.0)
            .collect()
    }

    #[setter]
    fn set_alert_thresholds(&self, value: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let mut ppm = Vec::new();
        if let Some(v) = value.filter(|v| !v.is_none()) {
            if v.is_instance_of::<PyString>() || v.is_instance_of::<pyo3::types::PyBool>() {
                return Err(type_error(
                    "alert_thresholds must be a list of numbers in [0, 1] or None",
                ));
            }
            for item in v.try_iter().map_err(|_| {
                type_error("alert_thresholds must be a list of numbers in [0, 1] or None")
            })? {
                let item = item?;
                ppm.push(threshold(&item, "alert_thresholds")?);
            }
        }
        self.inner.set_thresholds(ppm);
        Ok(())
    }

    /// Days before expiry at which a model with free quota left alerts once; `None`: off.
    #[getter]
    fn get_expiry_alert_days(&self) -> Option<u32> {
        self.inner.expiry_alert_days()
    }

    #[setter]
    fn set_expiry_alert_days(&self, value: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let days = match value.filter(|v| !v.is_none()) {
            None => None,
            Some(v) => {
                if !v.is_exact_instance_of::<pyo3::types::PyInt>() {
                    return Err(type_error(format!(
                        "expiry_alert_days must be a whole number of days or None, not {}",
                        v.repr()?
                    )));
                }
                Some(v.extract::<u32>().map_err(|_| {
                    PyValueError::new_err(format!(
                        "expiry_alert_days {} must be 0 or more",
                        v.repr().map(|r| r.to_string()).unwrap_or_default()
                    ))
                })?)
            }
        };
        q(self.inner.set_expiry_alert_days(days))
    }

    // ---- the kill switch (R15) ----

    /// Refuses every call of every guard on this ledger (and account) with `Blocked`, from
    /// each guard's next call on, until `unblock()`.
    fn block(&self, py: Python<'_>, reason: &str) -> PyResult<()> {
        self.run(py, |g| g.block(reason))
    }

    fn unblock(&self, py: Python<'_>) -> PyResult<()> {
        self.run(py, |g| g.unblock())
    }

    /// The reason of the block while the ledger is blocked, else `None`.
    #[getter]
    fn blocked(&self, py: Python<'_>) -> PyResult<Option<String>> {
        self.run(py, |g| g.blocked())
    }

    // ---- beyond the console (R16, R17) ----

    /// The first of `models` whose free quota covers the worst case `input_tokens` +
    /// `max_output_tokens` (each model's default output when `None`) now, else `None`.
    #[pyo3(signature = (models, input_tokens=None, max_output_tokens=None))]
    fn first_free(
        &self,
        py: Python<'_>,
        models: Vec<String>,
        input_tokens: Option<&Bound<'_, PyAny>>,
        max_output_tokens: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Option<String>> {
        let input = opt_tokens(input_tokens, "input_tokens")?.unwrap_or(0);
        let max_out = opt_tokens(max_output_tokens, "max_output_tokens")?;
        let now = self.now_ms(py)?;
        self.run(py, |g| g.first_free(&models, input, max_out, now))
    }

    /// R17: the burn rate of `model`'s free quota over the last `window_hours`, when it
    /// runs out at that rate and what will expire unused.
    #[pyo3(signature = (model, window_hours=None))]
    #[pyo3(text_signature = "($self, model, window_hours=24.0)")]
    fn forecast(
        &self,
        py: Python<'_>,
        model: &str,
        window_hours: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyForecast> {
        let window_hours = window(window_hours)?;
        let now = self.now_ms(py)?;
        self.run(py, |g| g.forecast(model, window_hours, now))
            .map(PyForecast)
    }

    /// `forecast()` of every granted model.
    #[pyo3(signature = (window_hours=None))]
    #[pyo3(text_signature = "($self, window_hours=24.0)")]
    fn forecasts(
        &self,
        py: Python<'_>,
        window_hours: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Vec<PyForecast>> {
        let window_hours = window(window_hours)?;
        let now = self.now_ms(py)?;
        Ok(self
            .run(py, |g| g.forecasts(window_hours, now))?
            .into_iter()
            .map(PyForecast)
            .collect())
    }

    /// Where alerts go: a callable taking a list of `Alert`s (set by `quotaguard.QuotaGuard`).
    fn _set_alert_sink(&self, sink: Option<Py<PyAny>>) {
        *self.alert_sink.lock() = sink;
    }

    // ---- records, bills, statistics ----

    #[pyo3(signature = (model=None, user=None, since=None, until=None, *, workspace=None, kind=None, limit=None))]
    #[allow(clippy::too_many_arguments)]
    fn records(
        &self,
        py: Python<'_>,
        model: Option<String>,
        user: Option<String>,
        since: Option<&Bound<'_, PyAny>>,
        until: Option<&Bound<'_, PyAny>>,
        workspace: Option<String>,
        kind: Option<&str>,
        limit: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Vec<PyUsageRecord>> {
        let query = RecordQuery {
            account: String::new(),
            model,
            user,
            workspace,
            kind: kind.map(Kind::parse).transpose().map_err(PyQuotaError)?,
            since_ms: opt_instant(since, "since")?,
            until_ms: opt_instant(until, "until")?,
            limit: opt_tokens(limit, "limit")?,
        };
        Ok(self
            .run(py, |g| g.records(query))?
            .into_iter()
            .map(PyUsageRecord)
            .collect())
    }

    /// R14: the bill of a CST month (`"2026-11"`, default: this month) or day (`"2026-11-26"`).
    #[pyo3(signature = (month=None, *, day=None))]
    fn bill(&self, py: Python<'_>, month: Option<String>, day: Option<String>) -> PyResult<PyBill> {
        let bill = match (month, day) {
            (Some(_), Some(_)) => return Err(PyValueError::new_err("pass month or day, not both")),
            (None, Some(d)) => self.run(py, |g| g.bill_day(&d))?,
            (m, None) => {
                let m = match m {
                    Some(m) => m,
                    None => month_of(cst_day(self.now_ms(py)?.ms())),
                };
                self.run(py, |g| g.bill_month(&m))?
            }
        };
        Ok(PyBill(bill))
    }

    /// R14: calls, refusals, failures and tokens per model per hour.
    #[pyo3(signature = (model=None, since=None))]
    fn stats(
        &self,
        py: Python<'_>,
        model: Option<String>,
        since: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Vec<PyHourStats>> {
        let since = opt_instant(since, "since")?;
        Ok(self
            .run(py, |g| g.stats(model.as_deref(), since))?
            .into_iter()
            .map(PyHourStats)
            .collect())
    }

    /// The ledger's integrity and invariants: what does not hold, one line each (an
    /// empty list when all hold).
    fn check(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        Ok(self
            ._check_all(py)?
            .into_iter()
            .filter(|(problem, _)| *problem)
            .map(|(_, text)| text)
            .collect())
    }

    /// Every finding of the check, as `(problem, text)`: what `quotaguard doctor` prints.
    fn _check_all(&self, py: Python<'_>) -> PyResult<Vec<(bool, String)>> {
        let now = self.now_ms(py)?;
        let found = self.run(py, |g| g.check(now))?;
        Ok(found.into_iter().map(|f| (f.problem, f.text)).collect())
    }

    /// Deletes records before `before`; bills and statistics are unchanged. Returns how many.
    fn compact(&self, py: Python<'_>, before: &Bound<'_, PyAny>) -> PyResult<u64> {
        let before = instant(before, "before")?;
        self.run(py, |g| g.compact(before))
    }

    // ---- budgets (used by quotaguard.Budget) ----

    #[pyo3(signature = (tokens=None, cost=None, name=None))]
    fn _open_budget(
        &self,
        tokens: Option<&Bound<'_, PyAny>>,
        cost: Option<&Bound<'_, PyAny>>,
        name: Option<String>,
    ) -> PyResult<u64> {
        let t = opt_tokens(tokens, "tokens")?;
        let c = match cost {
            None => None,
            Some(c) if c.is_none() => None,
            Some(c) => Some(amount(c, "cost")?),
        };
        q(self.inner.open_budget(name, t, c))
    }

    fn _close_budget(&self, id: u64) {
        self.inner.close_budget(id);
    }

    fn _drop_budget(&self, id: u64) {
        self.inner.drop_budget(id);
    }

    /// `(tokens_used, cost_spent, tokens_left, cost_left)` of a budget.
    fn _budget_state(&self, id: u64) -> PyResult<(u64, Decimal, Option<u64>, Option<Decimal>)> {
        let b = self
            .inner
            .budget(id)
            .ok_or_else(|| PyValueError::new_err(format!("no budget {id}")))?;
        Ok((
            b.used,
            to_decimal(b.spent),
            b.tokens_left(),
            b.cost_left().map(to_decimal),
        ))
    }

    // ---- catalogue ----

    /// The model catalogue as plain data: `{"prices_read", "source", "models": {...}}`.
    fn catalog_info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = self.inner.catalog();
        let out = PyDict::new(py);
        out.set_item("prices_read", &c.prices_read)?;
        out.set_item("source", &c.source)?;
        let models = PyDict::new(py);
        for (name, m) in &c.models {
            let d = PyDict::new(py);
            d.set_item("free_tokens", m.free_tokens)?;
            d.set_item("valid_days", m.valid_days)?;
            d.set_item("max_input_tokens", m.max_input_tokens)?;
            d.set_item("max_output_tokens", m.max_output_tokens)?;
            d.set_item("default_max_output_tokens", m.default_max_output_tokens)?;
            d.set_item("thinking", m.thinking.as_str())?;
            d.set_item("max_reasoning_tokens", m.max_reasoning_tokens)?;
            d.set_item("max_image_tokens", m.max_image_tokens)?;
            let prices = PyDict::new(py);
            for (site, sp) in &m.prices {
                let t = price_dict(py, &sp.home)?;
                t.set_item("prices_read", sp.prices_read.as_deref())?;
                let regions = PyDict::new(py);
                for (region, table) in &sp.regions {
                    regions.set_item(region, price_dict(py, table)?)?;
                }
                t.set_item("regions", regions)?;
                prices.set_item(*site, t)?;
            }
            d.set_item("prices", prices)?;
            models.set_item(name, d)?;
        }
        out.set_item("models", models)?;
        Ok(out)
    }
}

/// A forecast's window in hours: a number (24 when not given).
fn window(obj: Option<&Bound<'_, PyAny>>) -> PyResult<f64> {
    match obj {
        Some(v) if !v.is_none() => number(v, "window_hours", "hours"),
        _ => Ok(24.0),
    }
}

/// One price table as plain data (prices per million tokens, as decimals).
fn price_dict<'py>(
    py: Python<'py>,
    table: &quotaguard_core::money::PriceTable,
) -> PyResult<Bound<'py, PyDict>> {
    let t = PyDict::new(py);
    t.set_item("currency", table.currency.code())?;
    t.set_item("cache_hit_percent", table.cache_hit_percent)?;
    t.set_item(
        "explicit_cache_hit_percent",
        table.explicit_cache_hit_percent,
    )?;
    t.set_item("cache_write_percent", table.cache_write_percent)?;
    t.set_item("batch_percent", table.batch_percent)?;
    let tiers = PyList::empty(py);
    for tier in &table.tiers {
        let td = PyDict::new(py);
        td.set_item("up_to", tier.up_to)?;
        td.set_item("input", to_decimal(tier.input * 1_000_000))?;
        td.set_item("output", to_decimal(tier.output * 1_000_000))?;
        td.set_item(
            "thinking_output",
            tier.thinking_output.map(|p| to_decimal(p * 1_000_000)),
        )?;
        tiers.append(td)?;
    }
    t.set_item("tiers", tiers)?;
    Ok(t)
}

fn tokens_i64(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<i64> {
    if obj.is_instance_of::<pyo3::types::PyBool>() || !obj.is_instance_of::<pyo3::types::PyInt>() {
        return Err(type_error(format!(
            "{what} must be an int, not {}",
            obj.repr()?
        )));
    }
    obj.extract::<i64>().map_err(|_| {
        PyValueError::new_err(format!(
            "{what} {} is outside 30..90",
            obj.repr().map(|r| r.to_string()).unwrap_or_default()
        ))
    })
}

/// A call's worst case, held until settled or released (R9). One-shot and thread-safe.
#[pyclass(frozen, module = "quotaguard._core", name = "Reservation")]
pub struct PyReservation {
    guard: Py<PyQuotaGuard>,
    row: ReservationRow,
    hold: BudgetHold,
    max_output_tokens: u64,
    done: AtomicBool,
}

impl PyReservation {
    fn take(&self) -> PyResult<()> {
        if self.done.swap(true, Ordering::AcqRel) {
            return Err(QuotaGuardError::new_err(format!(
                "reservation {} for {:?} is already settled or released",
                self.row.id, self.row.model
            )));
        }
        Ok(())
    }

    /// Runs a settle of the core and turns its outcome into a record, its alerts and
    /// warnings. A settle that failed recorded nothing: the reservation stays open.
    fn settle_with(
        &self,
        py: Python<'_>,
        settle: impl FnOnce(&Guard, Now) -> QResult<quotaguard_core::ledger::Settled> + Send,
    ) -> PyResult<PyUsageRecord> {
        self.take()?;
        let g = self.guard.get();
        let out = g.now_ms(py).and_then(|now| g.run(py, |gg| settle(gg, now)));
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                self.done.store(false, Ordering::Release);
                return Err(e);
            }
        };
        // Alerts first: a warning turned into an error must not swallow them.
        let record = out.record;
        g.dispatch(py, out.alerts)?;
        if record.cost_type == CostType::Unpriced {
            g.warn_unpriced(py, &self.row.model)?;
        }
        if out.lease_expired {
            let msg = format!(
                "reservation {} for {:?} was settled after its lease of {} s had ended; its usage was recorded \
                 anyway (raise lease_seconds for calls this long)",
                self.row.id,
                self.row.model,
                g.inner.config.lease_ms as f64 / 1000.0
            );
            let cat = py.get_type::<LeaseExpiredWarning>();
            PyErr::warn(py, cat.as_any(), &CString::new(msg).unwrap_or_default(), 1)?;
        }
        Ok(PyUsageRecord(record))
    }
}

#[pymethods]
impl PyReservation {
    #[getter]
    fn id(&self) -> i64 {
        self.row.id
    }
    #[getter]
    fn model(&self) -> &str {
        &self.row.model
    }
    #[getter]
    fn kind(&self) -> &'static str {
        self.row.kind.as_str()
    }
    #[getter]
    fn input_tokens(&self) -> u64 {
        self.row.input_tokens
    }
    #[getter]
    fn max_output_tokens(&self) -> u64 {
        self.max_output_tokens
    }
    #[getter]
    fn worst_case(&self) -> u64 {
        self.row.worst
    }
    /// The part of the worst case held from free quota.
    #[getter]
    fn free_tokens(&self) -> u64 {
        self.row.free_part
    }
    #[getter]
    fn expires_at(&self) -> chrono::DateTime<chrono::Utc> {
        quotaguard_core::clock::to_utc(self.row.expires_ms)
    }
    #[getter]
    fn done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Records the usage the service reported (R9, R11). `thinking` defaults to how
    /// the call was reserved. `cached_tokens`: input that hit a cache (an explicit one
    /// when `explicit_cache`); `cache_creation_tokens`: input that created an explicit
    /// cache.
    #[pyo3(signature = (input_tokens, output_tokens, request_id=None, *, cached_tokens=None, cache_creation_tokens=None, explicit_cache=false, thinking=None))]
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &self,
        py: Python<'_>,
        input_tokens: &Bound<'_, PyAny>,
        output_tokens: &Bound<'_, PyAny>,
        request_id: Option<String>,
        cached_tokens: Option<&Bound<'_, PyAny>>,
        cache_creation_tokens: Option<&Bound<'_, PyAny>>,
        explicit_cache: bool,
        thinking: Option<bool>,
    ) -> PyResult<PyUsageRecord> {
        let usage = Usage {
            input_tokens: tokens(input_tokens, "input_tokens")?,
            output_tokens: tokens(output_tokens, "output_tokens")?,
            cached_tokens: opt_tokens(cached_tokens, "cached_tokens")?.unwrap_or(0),
            cache_write_tokens: opt_tokens(cache_creation_tokens, "cache_creation_tokens")?
                .unwrap_or(0),
            explicit_cache,
            thinking: thinking.unwrap_or(self.row.thinking),
            in_doubt: false,
        };
        let (row, hold) = (&self.row, &self.hold);
        let rid = request_id.as_deref();
        self.settle_with(py, |g, now| g.settle(row, hold, &usage, rid, now))
    }

    /// Settles at the worst case, as it was held (thinking or not): for calls whose real
    /// usage never arrived. `in_doubt`: the request may have reached the service with an
    /// unknown outcome (R9).
    #[pyo3(signature = (*, in_doubt=false))]
    fn settle_worst_case(&self, py: Python<'_>, in_doubt: bool) -> PyResult<PyUsageRecord> {
        let (row, hold) = (&self.row, &self.hold);
        self.settle_with(py, |g, now| g.settle_worst_case(row, hold, in_doubt, now))
    }

    /// Settles from a response body as it is (a dict, e.g. a JSON answer): its `usage`
    /// read as the full reading does, in one step. `(record, True)` when it reported
    /// usage (or the call reserved nothing); `(record, False)` when it reported none:
    /// the worst case is then recorded (not in doubt). `None` when the body is of a
    /// shape this path does not read: nothing is settled then.
    fn _settle_from(
        &self,
        py: Python<'_>,
        body: &Bound<'_, PyAny>,
    ) -> PyResult<Option<(PyUsageRecord, bool)>> {
        let Some(read) = crate::convert::body_usage(body)? else {
            return Ok(None);
        };
        let (row, hold) = (&self.row, &self.hold);
        match read {
            Some(u) => {
                let usage = Usage {
                    input_tokens: u.input,
                    output_tokens: u.output,
                    cached_tokens: u.cached.min(u.input),
                    cache_write_tokens: u.created.min(u.input.saturating_sub(u.cached)),
                    explicit_cache: u.explicit,
                    thinking: row.thinking || u.reasoning > 0,
                    in_doubt: false,
                };
                let rid = u.request_id.as_deref();
                let record =
                    self.settle_with(py, |g, now| g.settle(row, hold, &usage, rid, now))?;
                Ok(Some((record, true)))
            }
            None if row.worst == 0 => {
                // Nothing was reserved (a batch): its id is recorded, at 0/0.
                let usage = Usage {
                    thinking: row.thinking,
                    ..Default::default()
                };
                let rid = crate::convert::request_id(body)?;
                let rid = rid.as_deref();
                let record =
                    self.settle_with(py, |g, now| g.settle(row, hold, &usage, rid, now))?;
                Ok(Some((record, true)))
            }
            None => {
                let record =
                    self.settle_with(py, |g, now| g.settle_worst_case(row, hold, false, now))?;
                Ok(Some((record, false)))
            }
        }
    }

    /// Whether the call was reserved in thinking mode.
    #[getter]
    fn thinking(&self) -> bool {
        self.row.thinking
    }

    /// Gives the reserved tokens back; `failed=True` counts a failed call in statistics.
    #[pyo3(signature = (*, failed=false))]
    fn release(&self, py: Python<'_>, failed: bool) -> PyResult<()> {
        self.take()?;
        let g = self.guard.get();
        let now = g.now_ms(py)?;
        let (row, hold) = (&self.row, &self.hold);
        g.run(py, |gg| gg.release(row, hold, failed, now))
            .map(|_| ())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// An exception releases; leaving without settling settles the worst case.
    #[pyo3(signature = (exc_type=None, _exc=None, _tb=None))]
    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: Option<&Bound<'_, PyAny>>,
        _exc: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        if self.done() {
            return Ok(false);
        }
        if exc_type.is_some_and(|t| !t.is_none()) {
            match self.release(py, true) {
                Ok(()) => {}
                Err(e) if e.is_instance_of::<QuotaGuardError>(py) => {}
                Err(e) => return Err(e),
            }
        } else {
            self.settle_worst_case(py, false)?;
        }
        Ok(false)
    }

    /// As `quotaguard._format` shows it: the worst case held, its free part, the lease's
    /// end in CST, and whether it is still open.
    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        crate::types::render(slf, "repr")
    }
}
