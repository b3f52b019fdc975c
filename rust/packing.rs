//! Packing: documents are cut into pieces of at most `seq_len` tokens, the pieces are packed
//! into rows by best-fit decreasing, and the training arrays are written row by row in parallel.
//!
//! Tokens come from bytes (`id = byte + offset`, the tokenizer-free scheme: PAD 0, BOS 1, EOS 2,
//! 3 reserved) or from ready-made ids (a tokenizer's), with optional labels that replace the ids
//! as targets. A piece's target for its token i is the label of the token that follows it in
//! the same document (even across a cut into pieces), or -100 where none follows; padding
//! carries -100 targets and -1 document ids.

use std::collections::BTreeMap;

use crate::error::{FgError, FgResult};
use crate::threads::{self, Disjoint};

pub const PAD: i64 = 0;
pub const BOS: i64 = 1;
pub const EOS: i64 = 2;
pub const IGNORE: i64 = -100;
/// Tokens written by one parallel task (whole rows, at least one): a batch under this runs on
/// the calling thread, where waking a thread team would cost more than the writing.
const TOKENS_PER_TASK: usize = 1 << 16;

/// A sequence of token ids, read by index.
pub trait Tokens: Sync {
    fn id(&self, i: usize) -> i64;
    /// Writes the ids of tokens `start..start + out.len()` into `out`.
    fn write(&self, start: usize, out: &mut [i64]);
}

/// Bytes as tokens: `id = byte + offset`.
pub struct Bytes<'a> {
    pub data: &'a [u8],
    pub offset: i64,
}

impl Tokens for Bytes<'_> {
    fn id(&self, i: usize) -> i64 {
        self.data[i] as i64 + self.offset
    }

    fn write(&self, start: usize, out: &mut [i64]) {
        let bytes = &self.data[start..start + out.len()];
        for (slot, &b) in out.iter_mut().zip(bytes) {
            *slot = b as i64 + self.offset;
        }
    }
}

impl Tokens for [i64] {
    fn id(&self, i: usize) -> i64 {
        self[i]
    }

    fn write(&self, start: usize, out: &mut [i64]) {
        out.copy_from_slice(&self[start..start + out.len()]);
    }
}

/// The ids of padding and of the BOS / EOS a piece may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Specials {
    pub pad: i64,
    pub bos: i64,
    pub eos: i64,
}

/// The byte scheme's special ids.
pub const BYTE_SPECIALS: Specials = Specials {
    pad: PAD,
    bos: BOS,
    eos: EOS,
};

/// The documents' tokens: ids from `tokens`, targets from `labels` (the ids when `None`, else
/// as long as `tokens`), and the special ids.
pub struct Source<'a, T: Tokens + ?Sized> {
    pub tokens: &'a T,
    pub labels: Option<&'a [i64]>,
    pub specials: Specials,
}

impl<T: Tokens + ?Sized> Source<'_, T> {
    /// The label of source token `i` (what is trained on where that token is the next one).
    fn label(&self, i: usize) -> i64 {
        self.labels.map_or_else(|| self.tokens.id(i), |l| l[i])
    }
}

/// A run of at most `seq_len` tokens of one document: `len` tokens of the source from `start`,
/// optionally led by BOS and closed by EOS, and the label that follows it (or -100).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub start: usize,
    pub len: usize,
    pub bos: bool,
    pub eos: bool,
    pub next: i64,
}

impl Piece {
    pub fn tokens(&self) -> usize {
        self.len + self.bos as usize + self.eos as usize
    }
}

#[derive(Clone, Copy, Debug)]
pub struct SplitOptions {
    pub seq_len: usize,
    pub add_bos: bool,
    pub add_eos: bool,
    pub split_long: bool,
}

/// Cuts each document (source tokens `offsets[d]..offsets[d + 1]`) into pieces of at most
/// `seq_len` tokens; without `split_long` only the first piece of a document is kept.
pub fn split_documents<T: Tokens + ?Sized>(
    source: &Source<'_, T>,
    offsets: &[usize],
    opts: &SplitOptions,
) -> Vec<Piece> {
    let mut pieces = Vec::with_capacity(offsets.len().saturating_sub(1));
    for doc in offsets.windows(2) {
        let (start, end) = (doc[0], doc[1]);
        let total = end - start + opts.add_bos as usize + opts.add_eos as usize;
        // The label of token k >= 1 of the document (the source tokens, EOS).
        let label = |k: usize| -> i64 {
            if opts.add_eos && k == total - 1 {
                source.specials.eos
            } else {
                source.label(start + k - opts.add_bos as usize)
            }
        };
        let mut k = 0;
        while k < total {
            let len = opts.seq_len.min(total - k);
            let bos = opts.add_bos && k == 0;
            let eos = opts.add_eos && k + len == total;
            pieces.push(Piece {
                // token k + bos is a source token (or the closing EOS), at this index
                start: start + k + bos as usize - opts.add_bos as usize,
                len: len - bos as usize - eos as usize,
                bos,
                eos,
                next: if k + len < total {
                    label(k + len)
                } else {
                    IGNORE
                },
            });
            k += len;
            if !opts.split_long {
                break;
            }
        }
    }
    pieces
}

/// Rows of piece indices and the pieces that did not fit in `max_rows` rows.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Packing {
    pub rows: Vec<Vec<usize>>,
    pub leftover: Vec<usize>,
}

/// Best-fit decreasing: longest piece first, each into the open row with the least room that
/// still holds it, a new row when none does (while fewer than `max_rows`). O(n log n).
pub fn best_fit_decreasing(lengths: &[usize], seq_len: usize, max_rows: Option<usize>) -> Packing {
    let mut order: Vec<usize> = (0..lengths.len()).filter(|&i| lengths[i] > 0).collect();
    // Stable on index, so equal lengths keep document order and the result is deterministic.
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut packing = Packing::default();
    // room -> rows with exactly that much room left (a multiset ordered by room)
    let mut by_room: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in order {
        let len = lengths[i];
        let found = by_room.range_mut(len..).next().map(|(&room, rows)| {
            let row = rows.pop().expect("no empty buckets are kept");
            (room, row, rows.is_empty())
        });
        let (row, room) = match found {
            Some((room, row, now_empty)) => {
                if now_empty {
                    by_room.remove(&room);
                }
                (row, room)
            }
            None if max_rows.is_none_or(|m| packing.rows.len() < m) => {
                packing.rows.push(Vec::new());
                (packing.rows.len() - 1, seq_len)
            }
            None => {
                packing.leftover.push(i);
                continue;
            }
        };
        packing.rows[row].push(i);
        by_room.entry(room - len).or_default().push(row);
    }
    packing
}

/// The arrays of a packed batch, row-major `[rows, seq_len]`.
pub struct BatchArrays<'a> {
    pub input_ids: &'a mut [i64],
    pub targets: &'a mut [i64],
    pub position_ids: &'a mut [i64],
    pub document_ids: &'a mut [i64],
}

/// Writes every row of `rows` (piece indices) into `out`, rows in parallel; rows beyond
/// `rows.len()` are all padding.
pub fn fill_rows<T: Tokens + ?Sized>(
    source: &Source<'_, T>,
    pieces: &[Piece],
    rows: &[Vec<usize>],
    seq_len: usize,
    out: BatchArrays<'_>,
) {
    let n_rows = out.input_ids.len() / seq_len;
    let arrays = [
        out.input_ids,
        out.targets,
        out.position_ids,
        out.document_ids,
    ]
    .map(Disjoint::new);
    threads::for_each_chunk(n_rows, TOKENS_PER_TASK / seq_len, |_, rows_here| {
        for r in rows_here {
            let span = r * seq_len..(r + 1) * seq_len;
            // SAFETY: every row is written by one part only.
            let [ids, tgt, pos, doc] = arrays.each_ref().map(|a| unsafe { a.piece(span.clone()) });
            let row = rows.get(r).map_or(&[][..], Vec::as_slice);
            let row_out = BatchArrays {
                input_ids: ids,
                targets: tgt,
                position_ids: pos,
                document_ids: doc,
            };
            fill_row(source, pieces, row, row_out)
        }
    });
}

/// Writes a piece's tokens (BOS, `values` from `piece.start`, EOS) into `out`.
fn write_piece<V: Tokens + ?Sized>(
    values: &V,
    piece: &Piece,
    specials: &Specials,
    out: &mut [i64],
) {
    let (body, n) = (piece.bos as usize, out.len());
    if piece.bos {
        out[0] = specials.bos;
    }
    if piece.eos {
        out[n - 1] = specials.eos;
    }
    values.write(piece.start, &mut out[body..body + piece.len]);
}

/// One row: its pieces back to back, then padding.
fn fill_row<T: Tokens + ?Sized>(
    source: &Source<'_, T>,
    pieces: &[Piece],
    row: &[usize],
    out: BatchArrays<'_>,
) {
    let BatchArrays {
        input_ids: ids,
        targets: tgt,
        position_ids: pos,
        document_ids: doc,
    } = out;
    let mut at = 0;
    for (d, &p) in row.iter().enumerate() {
        let piece = &pieces[p];
        let span = at..at + piece.tokens();
        write_piece(
            source.tokens,
            piece,
            &source.specials,
            &mut ids[span.clone()],
        );
        match source.labels {
            None => tgt[span.start..span.end - 1].copy_from_slice(&ids[span.start + 1..span.end]),
            Some(labels) => {
                // the labels of the piece's tokens, moved one left: token i targets i + 1's
                write_piece(labels, piece, &source.specials, &mut tgt[span.clone()]);
                tgt[span.clone()].rotate_left(1);
            }
        }
        tgt[span.end - 1] = piece.next;
        for (i, slot) in pos[span.clone()].iter_mut().enumerate() {
            *slot = i as i64;
        }
        doc[span.clone()].fill(d as i64);
        at = span.end;
    }
    ids[at..].fill(source.specials.pad);
    tgt[at..].fill(IGNORE);
    for (i, slot) in pos[at..].iter_mut().enumerate() {
        *slot = i as i64;
    }
    doc[at..].fill(-1);
}

/// flash-attention's `cu_seqlens` over the flattened batch: one segment per piece and one per
/// row's padding tail; and the longest segment.
pub fn cu_seqlens(
    pieces: &[Piece],
    rows: &[Vec<usize>],
    n_rows: usize,
    seq_len: usize,
) -> (Vec<i32>, usize) {
    let mut segments = Vec::new();
    for r in 0..n_rows {
        let lens: Vec<usize> = rows
            .get(r)
            .into_iter()
            .flatten()
            .map(|&p| pieces[p].tokens())
            .collect();
        let used: usize = lens.iter().sum();
        segments.extend(lens);
        if used < seq_len {
            segments.push(seq_len - used);
        }
    }
    let longest = segments.iter().copied().max().unwrap_or(0);
    let mut cu = Vec::with_capacity(segments.len() + 1);
    cu.push(0i32);
    let mut total = 0usize;
    for len in segments {
        total += len;
        cu.push(total as i32);
    }
    (cu, longest)
}

/// Checks `seq_len`, shared by the packing entry points.
pub fn validate_seq_len(op: &str, seq_len: usize) -> FgResult<()> {
    if seq_len == 0 {
        return Err(FgError::Value(format!("{op}: seq_len must be at least 1")));
    }
    Ok(())
}

/// Checks the byte entry points' `seq_len` and byte `offset`.
pub fn validate(op: &str, seq_len: usize, offset: i64) -> FgResult<()> {
    validate_seq_len(op, seq_len)?;
    if !(3..=i64::from(i32::MAX) - 256).contains(&offset) {
        return Err(FgError::Value(format!(
            "{op}: offset must be at least 3 (ids 0, 1, 2 are PAD, BOS, EOS), got {offset}"
        )));
    }
    Ok(())
}

/// Checks that document offsets rise from 0 to the source length.
pub fn validate_offsets(op: &str, offsets: &[usize], buffer_len: usize) -> FgResult<()> {
    if offsets.first() != Some(&0)
        || offsets.last() != Some(&buffer_len)
        || offsets.windows(2).any(|w| w[0] > w[1])
    {
        return Err(FgError::Value(format!(
            "{op}: document offsets must rise from 0 to the buffer length {buffer_len}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(seq_len: usize, split_long: bool) -> SplitOptions {
        SplitOptions {
            seq_len,
            add_bos: true,
            add_eos: true,
            split_long,
        }
    }

    fn bytes(data: &[u8]) -> Bytes<'_> {
        Bytes { data, offset: 4 }
    }

    fn byte_source<'a>(data: &'a Bytes<'a>) -> Source<'a, Bytes<'a>> {
        Source {
            tokens: data,
            labels: None,
            specials: BYTE_SPECIALS,
        }
    }

    #[test]
    fn long_documents_split_with_next_token_targets() {
        // "abcde" -> BOS a b c d e EOS = 7 tokens, seq_len 3 -> [BOS a b] [c d e] [EOS]
        let data = bytes(b"abcde");
        let source = byte_source(&data);
        let pieces = split_documents(&source, &[0, 5], &opts(3, true));
        let tokens: Vec<usize> = pieces.iter().map(Piece::tokens).collect();
        assert_eq!(tokens, [3, 3, 1]);
        assert_eq!(pieces[0].next, b'c' as i64 + 4);
        assert_eq!(pieces[1].next, EOS);
        assert_eq!(pieces[2].next, IGNORE);
        assert_eq!((pieces[1].start, pieces[1].len), (2, 3));
        assert_eq!(
            (pieces[2].start, pieces[2].len, pieces[2].eos),
            (5, 0, true)
        );
        let kept = split_documents(&source, &[0, 5], &opts(3, false));
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].next, b'c' as i64 + 4);
    }

    #[test]
    fn best_fit_fills_the_tightest_row() {
        let packing = best_fit_decreasing(&[6, 5, 4, 3, 2], 8, None);
        assert_eq!(packing.rows, vec![vec![0, 4], vec![1, 3], vec![2]]);
        let capped = best_fit_decreasing(&[6, 5, 4, 3, 2], 8, Some(2));
        assert_eq!(capped.rows, vec![vec![0, 4], vec![1, 3]]);
        assert_eq!(capped.leftover, vec![2]);
    }

    /// Packs `source` (documents at `offsets`) into rows of `seq_len`: the four arrays.
    fn pack<T: Tokens + ?Sized>(
        source: &Source<'_, T>,
        offsets: &[usize],
        opts: &SplitOptions,
        seq_len: usize,
    ) -> (Vec<Piece>, Packing, [Vec<i64>; 4]) {
        let pieces = split_documents(source, offsets, opts);
        let lengths: Vec<usize> = pieces.iter().map(Piece::tokens).collect();
        let packing = best_fit_decreasing(&lengths, seq_len, None);
        let n = packing.rows.len() * seq_len;
        let mut arrays = [vec![0; n], vec![0; n], vec![0; n], vec![0; n]];
        let [ids, tgt, pos, doc] = &mut arrays;
        let out = BatchArrays {
            input_ids: ids,
            targets: tgt,
            position_ids: pos,
            document_ids: doc,
        };
        fill_rows(source, &pieces, &packing.rows, seq_len, out);
        (pieces, packing, arrays)
    }

    #[test]
    fn rows_hold_ids_targets_positions_and_document_ids() {
        let data = bytes(b"hiyo");
        let (pieces, packing, arrays) = pack(&byte_source(&data), &[0, 2, 4], &opts(8, true), 10);
        assert_eq!(packing.rows, vec![vec![0, 1]]);
        let (h, i, y, o) = (
            b'h' as i64 + 4,
            b'i' as i64 + 4,
            b'y' as i64 + 4,
            b'o' as i64 + 4,
        );
        assert_eq!(arrays[0], [1, h, i, 2, 1, y, o, 2, 0, 0]);
        assert_eq!(arrays[1], [h, i, 2, -100, y, o, 2, -100, -100, -100]);
        assert_eq!(arrays[2], [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]);
        assert_eq!(arrays[3], [0, 0, 0, 0, 1, 1, 1, 1, -1, -1]);
        let (cu, longest) = cu_seqlens(&pieces, &packing.rows, 2, 10);
        assert_eq!(cu, vec![0, 4, 8, 10, 20]);
        assert_eq!(longest, 10);
    }

    #[test]
    fn token_ids_with_labels_and_their_own_specials() {
        // documents [10 11 12] and [20 21]; labels mask 11; EOS 9, pad 7, no BOS
        let ids: &[i64] = &[10, 11, 12, 20, 21];
        let source = Source {
            tokens: ids,
            labels: Some(&[-100, -100, 12, 20, 21]),
            specials: Specials {
                pad: 7,
                bos: 8,
                eos: 9,
            },
        };
        let opts = SplitOptions {
            add_bos: false,
            ..opts(3, true)
        };
        // pieces [10 11 12] (cut: EOS follows), [EOS], [20 21 EOS]; rows of 3
        let (_, packing, arrays) = pack(&source, &[0, 3, 5], &opts, 3);
        assert_eq!(packing.rows, vec![vec![0], vec![2], vec![1]]);
        assert_eq!(arrays[0], [10, 11, 12, 20, 21, 9, 9, 7, 7]);
        assert_eq!(arrays[1], [-100, 12, 9, 21, 9, -100, -100, -100, -100]);
        assert_eq!(arrays[2], [0, 1, 2, 0, 1, 2, 0, 0, 1]);
        // without labels the targets are the ids
        let plain = Source {
            labels: None,
            ..source
        };
        let (_, _, arrays) = pack(&plain, &[0, 3, 5], &opts, 3);
        assert_eq!(arrays[1], [11, 12, 9, 21, 9, -100, -100, -100, -100]);
    }
}
