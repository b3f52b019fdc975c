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

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

use crate::error::FgError;
use crate::simd::{Bf16, F16};

/// An element type a kernel reads or writes, with its torch dtype.
pub(crate) trait Element: Copy + Send + Sync + 'static {
    /// The dtype's name in torch (`torch.<DTYPE>`).
    const DTYPE: &'static str;
    /// Its slot in [`DTYPES`].
    const SLOT: usize;
}

macro_rules! elements {
    ($($t:ty => $slot:literal $name:literal),* $(,)?) => {
        $(impl Element for $t {
            const DTYPE: &'static str = $name;
            const SLOT: usize = $slot;
        })*
        const DTYPE_NAMES: [&str; [$($name),*].len()] = [$($name),*];
    };
}

elements!(
    f32 => 0 "float32",
    f64 => 1 "float64",
    i8 => 2 "int8",
    u8 => 3 "uint8",
    i64 => 4 "int64",
    Bf16 => 5 "bfloat16",
    F16 => 6 "float16",
);

/// torch.Tensor and the dtype objects of [`DTYPE_NAMES`], imported once (a call checks every
/// argument, so the lookups must cost next to nothing).
struct Torch {
    tensor: Py<PyType>,
    dtypes: Vec<Py<PyAny>>,
}

fn torch(py: Python<'_>) -> PyResult<&Torch> {
    static TORCH: PyOnceLock<Torch> = PyOnceLock::new();
    TORCH.get_or_try_init(py, || {
        let module = py.import("torch")?;
        Ok(Torch {
            tensor: module.getattr("Tensor")?.cast_into::<PyType>()?.unbind(),
            dtypes: DTYPE_NAMES
                .iter()
                .map(|name| module.getattr(*name).map(Bound::unbind))
                .collect::<PyResult<_>>()?,
        })
    })
}

/// Whether `t` has T's dtype (false for anything without one): picks the kernel of a call that
/// takes several element types; the borrow itself then checks the rest.
pub(crate) fn has_dtype<T: Element>(t: &Bound<'_, PyAny>) -> PyResult<bool> {
    let py = t.py();
    let want = torch(py)?.dtypes[T::SLOT].bind(py);
    Ok(matches!(t.getattr(intern!(py, "dtype")), Ok(d) if d.is(want)))
}

/// The float element type of a kernel that takes float32, bfloat16 and float16, from a tensor's
/// dtype (anything else is float32's to refuse, when the tensor is borrowed).
#[derive(Clone, Copy)]
pub(crate) enum Float {
    F32,
    Bf16,
    F16,
}

impl Float {
    /// One read of the dtype (a float32 tensor took two through [`has_dtype`]).
    pub(crate) fn of(t: &Bound<'_, PyAny>) -> PyResult<Self> {
        let py = t.py();
        let dtypes = &torch(py)?.dtypes;
        let Ok(dtype) = t.getattr(intern!(py, "dtype")) else {
            return Ok(Float::F32);
        };
        Ok(if dtype.is(dtypes[Bf16::SLOT].bind(py)) {
            Float::Bf16
        } else if dtype.is(dtypes[F16::SLOT].bind(py)) {
            Float::F16
        } else {
            Float::F32
        })
    }
}

/// Runs `$body` with the type alias `$E` bound to the element type of tensor `$x`
/// ([`Float::of`]): f32, [`Bf16`] or [`F16`].
macro_rules! with_float {
    ($x:expr, $E:ident => $body:expr) => {
        match $crate::py::tensor::Float::of($x)? {
            $crate::py::tensor::Float::F32 => {
                type $E = f32;
                $body
            }
            $crate::py::tensor::Float::Bf16 => {
                type $E = $crate::simd::Bf16;
                $body
            }
            $crate::py::tensor::Float::F16 => {
                type $E = $crate::simd::F16;
                $body
            }
        }
    };
}
pub(crate) use with_float;

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

    /// Refuses a range written in one of `sets` that overlaps a range of another (each set
    /// refused its own as it went), by one sort of all the ranges instead of a comparison of
    /// every pair: a step over a model's hundreds of tensors borrows four or five each.
    pub(crate) fn check_apart(op: &str, sets: &[Borrows<'_>]) -> PyResult<()> {
        let mut all: Vec<_> = sets.iter().flat_map(|b| &b.ranges).collect();
        // Stable: of two ranges at one address, the one borrowed first is named second.
        all.sort_by_key(|r| r.0);
        // The furthest-reaching range so far, and the furthest-reaching written one.
        let mut reach: Option<&(usize, usize, bool, String)> = None;
        let mut written = reach;
        for r in all {
            let (start, end, writable, name) = r;
            let hit = written
                .filter(|w| *start < w.1)
                .or(reach.filter(|a| *writable && *start < a.1));
            if let Some(other) = hit {
                return Err(FgError::Value(format!(
                    "{op}: {name} overlaps {} in memory; pass separate tensors",
                    other.3
                ))
                .into());
            }
            if reach.is_none_or(|a| *end > a.1) {
                reach = Some(r);
            }
            if *writable && written.is_none_or(|w| *end > w.1) {
                written = Some(r);
            }
        }
        Ok(())
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
        let torch = torch(py)?;
        if !t.is_instance(torch.tensor.bind(py))? {
            let kind = t.get_type().name()?;
            return Err(
                FgError::Type(format!("{op}: {name} must be a torch.Tensor, got {kind}")).into(),
            );
        }
        let dtype = t.getattr(intern!(py, "dtype"))?;
        if !dtype.is(torch.dtypes[T::SLOT].bind(py)) {
            return Err(FgError::Type(format!(
                "{op}: {name} must be a torch.{} tensor, got {}",
                T::DTYPE,
                dtype.str()?
            ))
            .into());
        }
        if !t.getattr(intern!(py, "is_cpu"))?.extract::<bool>()? {
            return Err(FgError::Value(format!("{op}: {name} must be a CPU tensor")).into());
        }
        // A negative view (the imaginary part of a conjugate) stores -x: reading it raw would
        // be silently wrong.
        if !t
            .call_method0(intern!(py, "is_contiguous"))?
            .extract::<bool>()?
            || t.call_method0(intern!(py, "is_neg"))?.extract::<bool>()?
        {
            return Err(FgError::Value(format!(
                "{op}: {name} must be a contiguous tensor (call .contiguous() first)"
            ))
            .into());
        }
        let len: usize = t.call_method0(intern!(py, "numel"))?.extract()?;
        let ptr: usize = t.call_method0(intern!(py, "data_ptr"))?.extract()?;
        if len > 0 && (ptr == 0 || !ptr.is_multiple_of(std::mem::align_of::<T>())) {
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
