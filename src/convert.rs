//! Reading Python arguments into checked core values, with CPython-style messages.
use chrono::{DateTime, FixedOffset};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyFloat, PyInt, PyString};
use rust_decimal::Decimal;

use crate::errors::{type_error, PyQuotaError};
use quotaguard_core::clock::{milliseconds_hint, parse_instant, SHOWN_MAX_MS, SHOWN_MIN_MS};
use quotaguard_core::guard::check_tokens;
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
