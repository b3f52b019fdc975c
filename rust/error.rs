//! The one error type of the crate (py/error.rs maps it to Python exceptions).

use std::any::Any;
use std::fmt;

/// Every failure the Rust core can report. Messages always start with the op name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FgError {
    /// A bad value: wrong shape, length, option or setting (Python `ValueError`).
    Value(String),
    /// A bad kind of argument: dtype, layout (Python `TypeError`).
    Type(String),
    /// A dimension out of range (Python `IndexError`).
    Index(String),
    /// An internal failure, including a panic caught at the FFI boundary (Python `RuntimeError`).
    Runtime(String),
}

pub type FgResult<T> = Result<T, FgError>;

impl fmt::Display for FgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FgError::Value(m) | FgError::Type(m) | FgError::Index(m) | FgError::Runtime(m) => {
                f.write_str(m)
            }
        }
    }
}

impl std::error::Error for FgError {}

impl FgError {
    /// Turns the payload of a caught panic into a `Runtime` error naming the op.
    pub fn from_panic(op: &str, payload: Box<dyn Any + Send>) -> Self {
        let detail = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic payload".to_string());
        FgError::Runtime(format!("{op}: internal error (Rust panic: {detail})"))
    }
}
