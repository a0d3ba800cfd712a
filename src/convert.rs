//! Reading Python arguments into checked core values, with CPython-style messages.
use chrono::{DateTime, FixedOffset};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyFloat, PyInt, PyString};
use rust_decimal::Decimal;

use crate::errors::{type_error, PyQuotaError};
use quotaguard_core::clock::parse_instant;
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
    if obj.is_exact_instance_of::<PyInt>() {
        if let Ok(n) = obj.extract::<i64>() {
            return check_tokens(what, n.into()).map_err(|e| PyQuotaError(e).into());
        }
    }
    if obj.is_instance_of::<PyBool>() {
        return Err(type_error(format!(
            "{what} must be an int, not bool {}",
            shown(obj)
        )));
    }
    if obj.is_instance_of::<PyInt>() {
        // i64 first: the common case, and a direct C call even under abi3.
        let n: i128 = match obj.extract::<i64>() {
            Ok(n) => n.into(),
            Err(_) => {
                return Err(PyValueError::new_err(format!(
                    "{what} {} is too large (at most 1,000,000,000 per call)",
                    shown(obj)
                )))
            }
        };
        return check_tokens(what, n).map_err(|e| PyQuotaError(e).into());
    }
    if let Ok(idx) = obj.call_method0("__index__") {
        return tokens(&idx, what);
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

/// An instant: an aware datetime, an ISO-8601 string with an offset, or epoch seconds.
pub fn instant(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<i64> {
    if obj.is_instance_of::<PyString>() {
        let s: String = obj.extract()?;
        return parse_instant(&s).map_err(|e| PyQuotaError(e).into());
    }
    if obj.is_instance_of::<PyInt>() || obj.is_instance_of::<PyFloat>() {
        if obj.is_instance_of::<PyBool>() {
            return Err(type_error(format!("{what} must be a datetime, not bool")));
        }
        let secs: f64 = obj.extract()?;
        if !secs.is_finite() {
            return Err(PyValueError::new_err(format!(
                "{what} {secs} is not a finite time"
            )));
        }
        return Ok((secs * 1000.0).round() as i64);
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
        return Ok((secs * 1000.0).round() as i64);
    }
    Err(type_error(format!(
        "{what} must be an aware datetime, an ISO-8601 string or epoch seconds, not {} {}",
        type_name(obj),
        shown(obj)
    )))
}

pub fn opt_instant(obj: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<Option<i64>> {
    match obj {
        None => Ok(None),
        Some(o) if o.is_none() => Ok(None),
        Some(o) => instant(o, what).map(Some),
    }
}
