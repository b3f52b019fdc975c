//! Packing wrappers (bytes and token ids): the arrays are allocated here and filled without the
//! GIL.

use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArrayDyn};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::run_detached;
use crate::error::{FgError, FgResult};
use crate::packing::{
    self, BatchArrays, Bytes, Piece, Source, Specials, SplitOptions, Tokens, BOS, BYTE_SPECIALS,
    EOS,
};
use crate::rng::SplitMix64;

/// The elements of a C-contiguous numpy array, or a ValueError naming `op` and the argument.
fn contiguous<'a, T: numpy::Element>(
    op: &str,
    name: &str,
    a: &'a PyReadonlyArrayDyn<'_, T>,
) -> FgResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| FgError::Value(format!("{op}: {name} must be a C-contiguous array")))
}

fn to_usize(op: &str, name: &str, values: &[i64]) -> FgResult<Vec<usize>> {
    values
        .iter()
        .map(|&v| usize::try_from(v))
        .collect::<Result<_, _>>()
        .map_err(|_| FgError::Value(format!("{op}: {name} must not be negative")))
}

/// Allocates the batch arrays, fills them from `rows` (shuffled by `seed`), returns a dict.
#[allow(clippy::too_many_arguments)]
fn build_batch<'py, T: Tokens + ?Sized>(
    py: Python<'py>,
    op: &str,
    source: &Source<'_, T>,
    pieces: &[Piece],
    mut rows: Vec<Vec<usize>>,
    n_rows: usize,
    seq_len: usize,
    seed: Option<u64>,
) -> PyResult<Bound<'py, PyDict>> {
    if n_rows
        .checked_mul(seq_len)
        .is_none_or(|n| n > i32::MAX as usize)
    {
        return Err(FgError::Value(format!(
            "{op}: {n_rows} rows of {seq_len} tokens exceed the int32 range of cu_seqlens"
        ))
        .into());
    }
    if let Some(seed) = seed {
        rows.resize(n_rows, Vec::new());
        SplitMix64::new(seed).shuffle(&mut rows);
    }
    // SAFETY: every element is written by `fill_rows` before Python sees the arrays.
    let arrays: [Bound<'py, PyArray2<i64>>; 4] =
        std::array::from_fn(|_| unsafe { PyArray2::new(py, [n_rows, seq_len], false) });
    {
        let mut views: Vec<_> = arrays.iter().map(|a| a.readwrite()).collect();
        let mut slices = views
            .iter_mut()
            .map(|v| v.as_slice_mut().expect("fresh C array"));
        let out = BatchArrays {
            input_ids: slices.next().unwrap(),
            targets: slices.next().unwrap(),
            position_ids: slices.next().unwrap(),
            document_ids: slices.next().unwrap(),
        };
        let rows_ref = &rows;
        run_detached(py, op, move || {
            packing::fill_rows(source, pieces, rows_ref, seq_len, out);
            Ok(())
        })?;
    }
    let (cu, longest) = packing::cu_seqlens(pieces, &rows, n_rows, seq_len);
    let dict = PyDict::new(py);
    for (name, array) in ["input_ids", "targets", "position_ids", "document_ids"]
        .into_iter()
        .zip(arrays)
    {
        dict.set_item(name, array)?;
    }
    dict.set_item("cu_seqlens", PyArray1::from_vec(py, cu))?;
    dict.set_item("max_seqlen", longest)?;
    Ok(dict)
}

/// Packs whole documents (`buffer[offsets[d]..offsets[d+1]]`) into rows of `seq_len` tokens.
#[pyfunction]
#[pyo3(signature = (buffer, offsets, seq_len, batch_size=None, offset=4, add_bos=true, add_eos=true, split_long=true, seed=None))]
#[allow(clippy::too_many_arguments)]
fn pack_documents<'py>(
    py: Python<'py>,
    buffer: PyReadonlyArrayDyn<'py, u8>,
    offsets: PyReadonlyArrayDyn<'py, i64>,
    seq_len: usize,
    batch_size: Option<usize>,
    offset: i64,
    add_bos: bool,
    add_eos: bool,
    split_long: bool,
    seed: Option<u64>,
) -> PyResult<Bound<'py, PyDict>> {
    let op = "pack_documents";
    packing::validate(op, seq_len, offset)?;
    let buffer = contiguous(op, "buffer", &buffer)?;
    let offsets = to_usize(op, "offsets", contiguous(op, "offsets", &offsets)?)?;
    packing::validate_offsets(op, &offsets, buffer.len())?;
    let bytes = Bytes {
        data: buffer,
        offset,
    };
    let source = Source {
        tokens: &bytes,
        labels: None,
        specials: BYTE_SPECIALS,
    };
    let opts = SplitOptions {
        seq_len,
        add_bos,
        add_eos,
        split_long,
    };
    pack_all(py, op, &source, &offsets, &opts, batch_size, seed)
}

/// Splits the documents, packs all pieces (into exactly `batch_size` rows when given) and
/// builds the batch.
fn pack_all<'py, T: Tokens + ?Sized>(
    py: Python<'py>,
    op: &str,
    source: &Source<'_, T>,
    offsets: &[usize],
    opts: &SplitOptions,
    batch_size: Option<usize>,
    seed: Option<u64>,
) -> PyResult<Bound<'py, PyDict>> {
    let seq_len = opts.seq_len;
    let (pieces, packing) = run_detached(py, op, || {
        let pieces = packing::split_documents(source, offsets, opts);
        let lengths: Vec<usize> = pieces.iter().map(Piece::tokens).collect();
        Ok((
            pieces,
            packing::best_fit_decreasing(&lengths, seq_len, None),
        ))
    })?;
    let needed = packing.rows.len();
    let n_rows = match batch_size {
        Some(b) if b < needed => {
            return Err(FgError::Value(format!(
                "{op}: the documents need {needed} rows of {seq_len} tokens but batch_size is {b}"
            ))
            .into())
        }
        Some(b) => b,
        None => needed,
    };
    build_batch(py, op, source, &pieces, packing.rows, n_rows, seq_len, seed)
}

/// Packs documents of token ids (`ids[offsets[d]..offsets[d+1]]`) into rows of `seq_len`;
/// `labels` (as long as `ids`) replace the ids as targets; `bos_id` / `eos_id` are added to
/// every document when given; padding is `pad_id`.
#[pyfunction]
#[pyo3(signature = (ids, offsets, seq_len, labels=None, pad_id=0, bos_id=None, eos_id=None, split_long=true))]
#[allow(clippy::too_many_arguments)]
fn pack_tokens<'py>(
    py: Python<'py>,
    ids: PyReadonlyArrayDyn<'py, i64>,
    offsets: PyReadonlyArrayDyn<'py, i64>,
    seq_len: usize,
    labels: Option<PyReadonlyArrayDyn<'py, i64>>,
    pad_id: i64,
    bos_id: Option<i64>,
    eos_id: Option<i64>,
    split_long: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let op = "pack_tokens";
    packing::validate_seq_len(op, seq_len)?;
    let ids = contiguous(op, "ids", &ids)?;
    let offsets = to_usize(op, "offsets", contiguous(op, "offsets", &offsets)?)?;
    packing::validate_offsets(op, &offsets, ids.len())?;
    let labels = labels
        .as_ref()
        .map(|l| contiguous(op, "labels", l))
        .transpose()?;
    if labels.is_some_and(|l| l.len() != ids.len()) {
        return Err(FgError::Value(format!("{op}: labels and ids differ in length")).into());
    }
    let source = Source {
        tokens: ids,
        labels,
        specials: Specials {
            pad: pad_id,
            bos: bos_id.unwrap_or(BOS),
            eos: eos_id.unwrap_or(EOS),
        },
    };
    let opts = SplitOptions {
        seq_len,
        add_bos: bos_id.is_some(),
        add_eos: eos_id.is_some(),
        split_long,
    };
    pack_all(py, op, &source, &offsets, &opts, None, None)
}

/// Packs ready-cut pieces into at most `batch_size` rows; returns the batch and, under
/// `"leftover"`, the indices of the pieces that did not fit.
#[pyfunction]
#[pyo3(signature = (buffer, starts, lengths, flags, next_ids, seq_len, batch_size, offset=4, seed=None))]
#[allow(clippy::too_many_arguments)]
fn pack_pieces<'py>(
    py: Python<'py>,
    buffer: PyReadonlyArrayDyn<'py, u8>,
    starts: PyReadonlyArrayDyn<'py, i64>,
    lengths: PyReadonlyArrayDyn<'py, i64>,
    flags: PyReadonlyArrayDyn<'py, u8>,
    next_ids: PyReadonlyArrayDyn<'py, i64>,
    seq_len: usize,
    batch_size: usize,
    offset: i64,
    seed: Option<u64>,
) -> PyResult<Bound<'py, PyDict>> {
    let op = "pack_pieces";
    packing::validate(op, seq_len, offset)?;
    let buffer = contiguous(op, "buffer", &buffer)?;
    let starts = to_usize(op, "starts", contiguous(op, "starts", &starts)?)?;
    let lengths = to_usize(op, "lengths", contiguous(op, "lengths", &lengths)?)?;
    let flags = contiguous(op, "flags", &flags)?;
    let next_ids = contiguous(op, "next_ids", &next_ids)?;
    if [lengths.len(), flags.len(), next_ids.len()] != [starts.len(); 3] {
        return Err(FgError::Value(format!("{op}: piece arrays differ in length")).into());
    }
    let mut pieces = Vec::with_capacity(starts.len());
    for i in 0..starts.len() {
        let piece = Piece {
            start: starts[i],
            len: lengths[i],
            bos: flags[i] & 1 != 0,
            eos: flags[i] & 2 != 0,
            next: next_ids[i],
        };
        if piece
            .start
            .checked_add(piece.len)
            .is_none_or(|end| end > buffer.len())
        {
            return Err(FgError::Value(format!("{op}: piece {i} lies outside the buffer")).into());
        }
        if piece.tokens() > seq_len {
            return Err(FgError::Value(format!("{op}: piece {i} is longer than seq_len")).into());
        }
        pieces.push(piece);
    }
    let token_lengths: Vec<usize> = pieces.iter().map(Piece::tokens).collect();
    let packing = packing::best_fit_decreasing(&token_lengths, seq_len, Some(batch_size));
    let leftover: Vec<i64> = packing.leftover.iter().map(|&i| i as i64).collect();
    let bytes = Bytes {
        data: buffer,
        offset,
    };
    let source = Source {
        tokens: &bytes,
        labels: None,
        specials: BYTE_SPECIALS,
    };
    let dict = build_batch(
        py,
        op,
        &source,
        &pieces,
        packing.rows,
        batch_size,
        seq_len,
        seed,
    )?;
    dict.set_item("leftover", PyArray1::from_vec(py, leftover))?;
    Ok(dict)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(pack_documents, m)?)?;
    m.add_function(wrap_pyfunction!(pack_pieces, m)?)?;
    m.add_function(wrap_pyfunction!(pack_tokens, m)?)?;
    Ok(())
}
