//! The only place that imports pyo3: thin adapters over `crate::core`.
mod convert;
mod errors;
mod guard;
mod types;

use pyo3::prelude::*;

/// quotaguard's compiled core. Import from `quotaguard`, not from here.
#[pymodule]
mod _core {
    #[pymodule_export]
    use super::guard::{
        count_tokens, set_vocabulary, vocabulary_path, PyQuotaGuard, PyReservation,
    };
    #[pymodule_export]
    use super::types::{PyAlert, PyBill, PyBillLine, PyHourStats, PyQuota, PyUsageRecord};

    use pyo3::prelude::*;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        m.add(
            "SCHEMA_VERSION",
            crate::core::ledger::sqlite::SCHEMA_VERSION,
        )?;
        m.add("MAX_TOKENS", crate::core::guard::MAX_TOKENS)?;
        Ok(())
    }
}

#[allow(unused_imports)]
use _core as _;
