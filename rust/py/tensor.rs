//! Borrowing torch tensors for the length of one call, without numpy.
//!
//! A kernel argument is a `torch.Tensor` on the CPU, C-contiguous, of the element type the
//! kernel takes. The wrappers read `data_ptr()` and `numel()` and hand the kernel a slice over
//! the tensor's own memory. Going through numpy instead (`tensor.numpy()`) marks the tensor's
//! storage as never resizable again, which breaks FSDP2 (it frees and re-gathers parameters by
//! resizing their storage); reading the pointer leaves the tensor exactly as it was.
//!
//! Slices handed out for writing never overlap any other slice of the same call: [`Borrows`]
//! keeps the byte ranges it gave out and refuses an aliasing pair with a ValueError.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

use crate::error::FgError;

/// An element type a kernel reads or writes, with the name of its torch dtype.
pub(crate) trait Element: Copy + Send + Sync + 'static {
    const DTYPE: &'static str;
}

macro_rules! elements {
    ($($t:ty => $name:literal),* $(,)?) => {$(
        impl Element for $t {
            const DTYPE: &'static str = $name;
        }
    )*};
}

elements!(f32 => "float32", f64 => "float64", i8 => "int8", u8 => "uint8", i64 => "int64");

/// torch.Tensor, imported once.
fn tensor_type(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    static TENSOR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    TENSOR.import(py, "torch", "Tensor")
}

/// torch.<name> (a dtype object), imported once per name.
fn torch_dtype<'py>(py: Python<'py>, name: &'static str) -> PyResult<Bound<'py, PyAny>> {
    static DTYPES: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let torch = DTYPES.get_or_try_init(py, || py.import("torch").map(|m| m.into_any().unbind()))?;
    torch.bind(py).getattr(name)
}

/// The byte ranges handed out during one call, to refuse a written slice that aliases another.
pub(crate) struct Borrows<'op> {
    op: &'op str,
    ranges: Vec<(usize, usize, bool, String)>,
}

impl<'op> Borrows<'op> {
    pub(crate) fn new(op: &'op str) -> Self {
        Borrows {
            op,
            ranges: Vec::new(),
        }
    }

    /// The elements of tensor `t` (argument `name`) for reading.
    pub(crate) fn read<'a, T: Element>(
        &mut self,
        name: &str,
        t: &'a Bound<'_, PyAny>,
    ) -> PyResult<&'a [T]> {
        let (ptr, len) = self.claim::<T>(name, t, false)?;
        // SAFETY: `claim` checked that `t` is a contiguous CPU tensor of `len` elements of T,
        // aligned, starting at `ptr`; no slice written in this call overlaps it. The tensor is
        // kept alive by the caller's reference for 'a.
        Ok(unsafe { slice_at(ptr, len) })
    }

    /// [`read`](Self::read) for an optional argument.
    pub(crate) fn read_opt<'a, T: Element>(
        &mut self,
        name: &str,
        t: &'a Option<Bound<'_, PyAny>>,
    ) -> PyResult<Option<&'a [T]>> {
        t.as_ref().map(|t| self.read(name, t)).transpose()
    }

    /// The elements of tensor `t` (argument `name`) for writing.
    #[allow(clippy::mut_from_ref)]
    pub(crate) fn write<'a, T: Element>(
        &mut self,
        name: &str,
        t: &'a Bound<'_, PyAny>,
    ) -> PyResult<&'a mut [T]> {
        let (ptr, len) = self.claim::<T>(name, t, true)?;
        // SAFETY: as in `read`, and no other slice of this call overlaps this one.
        Ok(unsafe { slice_at_mut(ptr, len) })
    }

    /// [`write`](Self::write) for an optional argument.
    pub(crate) fn write_opt<'a, T: Element>(
        &mut self,
        name: &str,
        t: &'a Option<Bound<'_, PyAny>>,
    ) -> PyResult<Option<&'a mut [T]>> {
        t.as_ref().map(|t| self.write(name, t)).transpose()
    }

    /// Checks `t` and records its byte range; returns its data pointer and element count.
    fn claim<T: Element>(
        &mut self,
        name: &str,
        t: &Bound<'_, PyAny>,
        writable: bool,
    ) -> PyResult<(usize, usize)> {
        let op = self.op;
        let py = t.py();
        if !t.is_instance(tensor_type(py)?)? {
            let kind = t.get_type().name()?;
            return Err(FgError::Type(format!(
                "{op}: {name} must be a torch.Tensor, got {kind}"
            ))
            .into());
        }
        let dtype = t.getattr("dtype")?;
        if !dtype.is(&torch_dtype(py, T::DTYPE)?) {
            return Err(FgError::Type(format!(
                "{op}: {name} must be a torch.{} tensor, got {}",
                T::DTYPE,
                dtype.str()?
            ))
            .into());
        }
        if !t.getattr("is_cpu")?.extract::<bool>()? {
            return Err(FgError::Value(format!("{op}: {name} must be a CPU tensor")).into());
        }
        if !t.call_method0("is_contiguous")?.extract::<bool>()?
            || t.call_method0("is_neg")?.extract::<bool>()?
        {
            return Err(FgError::Value(format!(
                "{op}: {name} must be a contiguous tensor (call .contiguous() first)"
            ))
            .into());
        }
        let len: usize = t.call_method0("numel")?.extract()?;
        let ptr: usize = t.call_method0("data_ptr")?.extract()?;
        if len > 0 && (ptr == 0 || ptr % std::mem::align_of::<T>() != 0) {
            return Err(FgError::Value(format!(
                "{op}: {name}'s data is not aligned for {}",
                T::DTYPE
            ))
            .into());
        }
        let bytes = len * std::mem::size_of::<T>();
        if bytes > 0 {
            let (start, end) = (ptr, ptr + bytes);
            for (s, e, w, other) in &self.ranges {
                if (writable || *w) && start < *e && *s < end {
                    return Err(FgError::Value(format!(
                        "{op}: {name} overlaps {other} in memory; pass separate tensors"
                    ))
                    .into());
                }
            }
            self.ranges.push((start, end, writable, name.to_string()));
        }
        Ok((ptr, len))
    }
}

/// # Safety
/// `ptr` must point at `len` initialized, aligned elements of T that stay valid for 'a.
unsafe fn slice_at<'a, T>(ptr: usize, len: usize) -> &'a [T] {
    if len == 0 {
        return &[];
    }
    std::slice::from_raw_parts(ptr as *const T, len)
}

/// # Safety
/// As [`slice_at`], and nothing else may access the elements for 'a.
unsafe fn slice_at_mut<'a, T>(ptr: usize, len: usize) -> &'a mut [T] {
    if len == 0 {
        return &mut [];
    }
    std::slice::from_raw_parts_mut(ptr as *mut T, len)
}
