//! The one place core errors become Python exceptions.
use pyo3::exceptions::{PyKeyboardInterrupt, PyTypeError, PyValueError};
use pyo3::prelude::*;

use quotaguard_core::error::{QuotaError, RefusalReason};

pyo3::import_exception!(quotaguard.exceptions, QuotaGuardError);
pyo3::import_exception!(quotaguard.exceptions, FreeTierOnly);
pyo3::import_exception!(quotaguard.exceptions, AccountOverdue);
pyo3::import_exception!(quotaguard.exceptions, BudgetExceeded);
pyo3::import_exception!(quotaguard.exceptions, LedgerError);
pyo3::import_exception!(quotaguard.exceptions, Blocked);
pyo3::import_exception!(quotaguard.exceptions, LeaseExpiredWarning);
pyo3::import_exception!(quotaguard.exceptions, LedgerPermissionWarning);
pyo3::import_exception!(quotaguard.exceptions, NoFreeQuotaWarning);

/// Core errors cross into Python here and nowhere else.
pub struct PyQuotaError(pub QuotaError);

impl From<QuotaError> for PyQuotaError {
    fn from(e: QuotaError) -> Self {
        Self(e)
    }
}

impl From<PyQuotaError> for PyErr {
    fn from(PyQuotaError(e): PyQuotaError) -> PyErr {
        let msg = e.to_string();
        match e {
            QuotaError::Invalid(_) => PyValueError::new_err(msg),
            QuotaError::Refused(r) if r.reason == RefusalReason::Overdue => {
                AccountOverdue::new_err((msg, r.model, r.remaining, r.requested, r.reason.as_str()))
            }
            QuotaError::Refused(r) => {
                FreeTierOnly::new_err((msg, r.model, r.remaining, r.requested, r.reason.as_str()))
            }
            QuotaError::Budget(_) => BudgetExceeded::new_err(msg),
            QuotaError::Rejected(_) => QuotaGuardError::new_err(msg),
            QuotaError::Ledger { ledger, .. } => LedgerError::new_err((msg, ledger)),
            QuotaError::Blocked(reason) => Blocked::new_err((msg, reason)),
            QuotaError::Interrupted(_) => PyKeyboardInterrupt::new_err(msg),
        }
    }
}

pub fn type_error(msg: impl Into<String>) -> PyErr {
    PyTypeError::new_err(msg.into())
}
