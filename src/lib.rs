//! quotaguard's Python extension, `quotaguard._core`: conversions between
//! Python values and the pure Rust core (`quotaguard-core`), and nothing else.
mod convert;
mod errors;
mod fork;
mod guard;
mod types;

use pyo3::prelude::*;

/// quotaguard's compiled core. Import from `quotaguard`, not from here.
#[pymodule]
mod _core {
    #[pymodule_export]
    use super::guard::{
        _fork_child, _fork_parent, _fork_prepare, _redact, count_tokens, set_vocabulary,
        vocabulary_path, PyQuotaGuard, PyReservation,
    };
    #[pymodule_export]
    use super::types::{
        PyAlert, PyBill, PyBillLine, PyForecast, PyHourStats, PyQuota, PyUsageRecord,
    };

    use pyo3::prelude::*;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        m.add(
            "SCHEMA_VERSION",
            quotaguard_core::ledger::sqlite::SCHEMA_VERSION,
        )?;
        m.add("MAX_TOKENS", quotaguard_core::guard::MAX_TOKENS)?;
        Ok(())
    }
}

#[allow(unused_imports)]
use _core as _;
