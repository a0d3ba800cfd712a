//! Reading Python arguments into checked core values, with CPython-style messages.
use chrono::{DateTime, FixedOffset};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyString};
use rust_decimal::Decimal;

use crate::errors::{type_error, PyQuotaError};
use quotaguard_core::clock::{milliseconds_hint, parse_instant, SHOWN_MAX_MS, SHOWN_MIN_MS};
use quotaguard_core::guard::{check_tokens, MAX_TOKENS};
use quotaguard_core::money::from_decimal;

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

fn shown(obj: &Bound<'_, PyAny>) -> String {
    obj.repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// A token count: a non-negative int no larger than one call can use.
pub fn tokens(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<u64> {
    if obj.is_instance_of::<PyBool>() {
        return Err(type_error(format!(
            "{what} must be an int, not bool {}",
            shown(obj)
        )));
    }
    if obj.is_instance_of::<PyInt>() {
        return int_tokens(obj, what);
    }
    // An object that says it is an integer: its type's `__index__` is asked once, and
    // the answer must be an int (one returning itself is refused, not followed).
    if let Ok(index) = obj.get_type().getattr("__index__") {
        let answer = index.call1((obj,))?;
        if answer.is_instance_of::<PyInt>() && !answer.is_instance_of::<PyBool>() {
            return int_tokens(&answer, what);
        }
        return Err(type_error(format!(
            "{what} must be an int, not {} {} (its __index__ returned {} {})",
            type_name(obj),
            shown(obj),
            type_name(&answer),
            shown(&answer)
        )));
    }
    if obj.is_instance_of::<PyFloat>() || obj.hasattr("as_integer_ratio").unwrap_or(false) {
        return Err(PyValueError::new_err(format!(
            "{what} must be a whole number of tokens (an int), not {} {}",
            type_name(obj),
            shown(obj)
        )));
    }
    Err(type_error(format!(
        "{what} must be an int, not {} {}",
        type_name(obj),
        shown(obj)
    )))
}

/// An int (or a subclass, read as its value) as a token count.
fn int_tokens(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<u64> {
    // i64 first: the common case, and a direct C call even under abi3.
    match obj.extract::<i64>() {
        Ok(n) => check_tokens(what, n.into()).map_err(|e| PyQuotaError(e).into()),
        Err(_) => Err(PyValueError::new_err(format!(
            "{what} {} is too large (at most 1,000,000,000 per call)",
            shown(obj)
        ))),
    }
}

/// A number of seconds or hours (a lease, a window): an int or a float, never a bool
/// or a str; an int too large for a float reads as infinite (and is refused as such).
pub fn number(obj: &Bound<'_, PyAny>, what: &str, unit: &str) -> PyResult<f64> {
    let wrong = || {
        type_error(format!(
            "{what} must be a number of {unit}, not {} {}",
            type_name(obj),
            shown(obj)
        ))
    };
    if obj.is_instance_of::<PyBool>() || obj.is_instance_of::<PyString>() {
        return Err(wrong());
    }
    if obj.is_instance_of::<PyInt>() {
        return Ok(obj.extract::<i64>().map_or(f64::INFINITY, |n| n as f64));
    }
    obj.extract::<f64>().map_err(|_| wrong())
}

pub fn opt_tokens(obj: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<Option<u64>> {
    match obj {
        None => Ok(None),
        Some(o) if o.is_none() => Ok(None),
        Some(o) => tokens(o, what).map(Some),
    }
}

/// An exact amount of money: a Decimal, an int or a decimal string (never a float).
pub fn amount(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<i64> {
    if obj.is_instance_of::<PyFloat>() {
        return Err(type_error(format!(
            "{what} must be a Decimal, int or str, not float {} (floats are inexact: write Decimal(\"{}\"))",
            shown(obj),
            shown(obj)
        )));
    }
    if obj.is_instance_of::<PyBool>() {
        return Err(type_error(format!(
            "{what} must be a Decimal, int or str, not bool"
        )));
    }
    let text = if obj.is_instance_of::<PyString>() || obj.is_instance_of::<PyInt>() {
        obj.str()?.to_string()
    } else if let Ok(d) = obj.extract::<Decimal>() {
        return from_decimal(d, what).map_err(|e| PyQuotaError(e).into());
    } else {
        return Err(type_error(format!(
            "{what} must be a Decimal, int or str, not {} {}",
            type_name(obj),
            shown(obj)
        )));
    };
    quotaguard_core::money::parse_amount(&text, what).map_err(|e| PyQuotaError(e).into())
}

/// An instant: an aware datetime, an ISO-8601 string with an offset, or epoch seconds;
/// in years 1..9999, what every reader can show.
pub fn instant(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<i64> {
    let ms = read_instant(obj, what)?;
    if !(SHOWN_MIN_MS..=SHOWN_MAX_MS).contains(&ms) {
        return Err(PyValueError::new_err(format!(
            "{what} {} is not a time between the years 1 and 9999{}",
            shown(obj),
            milliseconds_hint(ms)
        )));
    }
    Ok(ms)
}

fn read_instant(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<i64> {
    if obj.is_instance_of::<PyString>() {
        let s: String = obj.extract()?;
        return parse_instant(&s).map_err(|e| PyQuotaError(e).into());
    }
    if obj.is_instance_of::<PyBool>() {
        return Err(type_error(format!("{what} must be a datetime, not bool")));
    }
    let too_far = || {
        PyValueError::new_err(format!(
            "{what} {} is not a time between the years 1 and 9999 (epoch times are in seconds)",
            shown(obj)
        ))
    };
    if obj.is_instance_of::<PyInt>() {
        let secs: i64 = obj.extract().map_err(|_| too_far())?;
        return secs.checked_mul(1000).ok_or_else(too_far);
    }
    if obj.is_instance_of::<PyFloat>() {
        return seconds_to_ms(obj.extract()?, what);
    }
    if obj.hasattr("tzinfo").unwrap_or(false) && obj.hasattr("timestamp").unwrap_or(false) {
        if obj.getattr("tzinfo")?.is_none() || obj.call_method0("utcoffset")?.is_none() {
            return Err(PyValueError::new_err(format!(
                "{what} {} has no time zone; pass an aware datetime (for example with tzinfo=timezone.utc)",
                shown(obj)
            )));
        }
        if let Ok(dt) = obj.extract::<DateTime<FixedOffset>>() {
            return Ok(dt.timestamp_millis());
        }
        let secs: f64 = obj.call_method0("timestamp")?.extract()?;
        return seconds_to_ms(secs, what);
    }
    Err(type_error(format!(
        "{what} must be an aware datetime, an ISO-8601 string or epoch seconds, not {} {}",
        type_name(obj),
        shown(obj)
    )))
}

fn seconds_to_ms(secs: f64, what: &str) -> PyResult<i64> {
    let ms = (secs * 1000.0).round();
    // i64 holds every whole number of ms below 2^63; beyond, the saturating cast would lie.
    if !ms.is_finite() || ms.abs() >= 9.2e18 {
        return Err(PyValueError::new_err(format!(
            "{what} {secs} is not a finite time"
        )));
    }
    Ok(ms as i64)
}

pub fn opt_instant(obj: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<Option<i64>> {
    match obj {
        None => Ok(None),
        Some(o) if o.is_none() => Ok(None),
        Some(o) => instant(o, what).map(Some),
    }
}

/// Usage as a response body reports it, read as `quotaguard.wrap` reads it.
pub struct BodyUsage {
    pub input: u64,
    pub output: u64,
    pub cached: u64,
    pub created: u64,
    pub explicit: bool,
    pub reasoning: u64,
    pub request_id: Option<String>,
}

/// `obj[name]` of a dict; `None` when absent, or when `obj` is not a dict.
fn item<'py>(obj: Option<&Bound<'py, PyAny>>, name: &str) -> PyResult<Option<Bound<'py, PyAny>>> {
    match obj.map(|o| o.cast::<PyDict>()) {
        Some(Ok(d)) => Ok(d.get_item(name)?.filter(|v| !v.is_none())),
        _ => Ok(None),
    }
}

/// An int that is not a bool, as an i64; `Err(())` for one out of range.
fn int_of(v: Option<Bound<'_, PyAny>>) -> Result<Option<i64>, ()> {
    match v {
        Some(v) if v.is_instance_of::<PyInt>() && !v.is_instance_of::<PyBool>() => {
            v.extract::<i64>().map(Some).map_err(|_| ())
        }
        _ => Ok(None),
    }
}

/// The first non-zero `group.name` of `usage` over `groups`, else 0.
fn detail(usage: &Bound<'_, PyAny>, groups: &[&str], name: &str) -> PyResult<Result<i64, ()>> {
    for group in groups {
        let g = item(Some(usage), group)?;
        match int_of(item(g.as_ref(), name)?) {
            Ok(Some(n)) if n != 0 => return Ok(Ok(n)),
            Ok(_) => {}
            Err(()) => return Ok(Err(())),
        }
    }
    Ok(Ok(0))
}

/// The request id of a response body: `request_id`, else `id`, else `_request_id`.
pub fn request_id(body: &Bound<'_, PyAny>) -> PyResult<Option<String>> {
    for name in ["request_id", "id", "_request_id"] {
        if let Some(v) = item(Some(body), name)? {
            if let Ok(s) = v.cast::<PyString>() {
                let s = s.to_string_lossy();
                if !s.is_empty() {
                    return Ok(Some(s.into_owned()));
                }
            }
        }
    }
    Ok(None)
}

const INPUT_DETAILS: [&str; 2] = ["prompt_tokens_details", "input_tokens_details"];
const OUTPUT_DETAILS: [&str; 2] = ["completion_tokens_details", "output_tokens_details"];

/// The usage a response body (a dict) reports: `Some(Some(usage))`, `Some(None)` when it
/// reports none (no `usage`, or all zeros), `None` for a body this reading leaves to
/// Python's (not a dict, a `usage` that is not one, counts out of range).
pub fn body_usage(body: &Bound<'_, PyAny>) -> PyResult<Option<Option<BodyUsage>>> {
    if body.cast::<PyDict>().is_err() {
        return Ok(None);
    }
    let Some(usage) = item(Some(body), "usage")? else {
        return Ok(Some(None));
    };
    if usage.cast::<PyDict>().is_err() {
        return Ok(None);
    }
    let read = |name: &str| int_of(item(Some(&usage), name).ok().flatten());
    let (Ok(input_field), Ok(prompt), Ok(out_field), Ok(completion), Ok(total), Ok(images)) = (
        read("input_tokens"),
        read("prompt_tokens"),
        read("output_tokens"),
        read("completion_tokens"),
        read("total_tokens"),
        read("image_tokens"),
    ) else {
        return Ok(None);
    };
    let mut inp = input_field.or(prompt);
    let out = out_field.or(completion);
    if inp.is_none() {
        if let Some(t) = total {
            // DashScope embeddings report only the total.
            let Some(i) = t.checked_sub(out.unwrap_or(0)) else {
                return Ok(None);
            };
            inp = Some(i);
        }
    }
    if let Some(i) = images.filter(|i| *i != 0) {
        if input_field.is_none() && total.is_none() {
            // Multimodal embeddings: text tokens + image tokens.
            let Some(sum) = inp.unwrap_or(0).checked_add(i) else {
                return Ok(None);
            };
            inp = Some(sum);
        }
    }
    let (inp, out) = (inp.unwrap_or(0), out.unwrap_or(0));
    if inp == 0 && out == 0 {
        // DashScope fills an absent usage with zeros; a real call bills at least one token.
        return Ok(Some(None));
    }
    let mut cache_type = None;
    for group in INPUT_DETAILS {
        let g = item(Some(&usage), group)?;
        if let Some(v) = item(g.as_ref(), "cache_type")? {
            if let Ok(s) = v.cast::<PyString>() {
                cache_type = Some(s.to_string_lossy().into_owned());
            }
        }
    }
    let (Ok(created), Ok(cached), Ok(reasoning)) = (
        detail(&usage, &INPUT_DETAILS, "cache_creation_input_tokens")?,
        detail(&usage, &INPUT_DETAILS, "cached_tokens")?,
        detail(&usage, &OUTPUT_DETAILS, "reasoning_tokens")?,
    ) else {
        return Ok(None);
    };
    // Counts no call can have (negative, beyond a billion) are Python's to refuse, with
    // its message.
    let to_u = |n: i64| u64::try_from(n).ok().filter(|n| *n <= MAX_TOKENS);
    let (Some(input), Some(output), Some(cached_u), Some(created_u), Some(reasoning_u)) = (
        to_u(inp),
        to_u(out),
        to_u(cached),
        to_u(created),
        to_u(reasoning),
    ) else {
        return Ok(None);
    };
    Ok(Some(Some(BodyUsage {
        input,
        output,
        cached: cached_u,
        created: created_u,
        explicit: cache_type.as_deref() == Some("ephemeral") || created > 0,
        reasoning: reasoning_u,
        request_id: request_id(body)?,
    })))
}
