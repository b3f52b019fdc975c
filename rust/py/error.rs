//! The single mapping of the crate's errors to Python exceptions.

use pyo3::exceptions::{PyIndexError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::PyErr;

use crate::error::FgError;

impl From<FgError> for PyErr {
    fn from(err: FgError) -> PyErr {
        match err {
            FgError::Value(m) => PyValueError::new_err(m),
            FgError::Type(m) => PyTypeError::new_err(m),
            FgError::Index(m) => PyIndexError::new_err(m),
            FgError::Runtime(m) => PyRuntimeError::new_err(m),
        }
    }
}
