"""Packing documents into dense rows: the Rust packer behind a small dataclass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .. import _core
from ..ops._checks import check_bool, check_int

#: Special ids; bytes start at ``offset`` (default 4, so the vocabulary is 260).
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
IGNORE_INDEX = -100
#: The largest byte offset: ids (offset + 255) stay within the Rust packer's int32 range.
MAX_OFFSET = 2**31 - 1 - 256


@dataclass
class PackedBatch:
    """A packed batch: rows of ``seq_len`` tokens holding whole or cut documents.

    ``input_ids``, ``targets``, ``position_ids``, ``document_ids`` are int64 ``[rows, seq_len]``.
    ``targets[r, i]`` is the id that follows ``input_ids[r, i]`` in the same document (even
    across a cut) or -100 (a document's last token, padding). ``position_ids`` restart at 0 for
    every piece (and count on through padding); ``document_ids`` number the pieces of a row
    from 0, -1 on padding. ``cu_seqlens`` (int32) are the boundaries of the pieces over the
    flattened batch, each row's padding tail being one more segment, as flash-attention's
    varlen API expects; ``max_seqlen`` is the longest segment.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    document_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    def to_hf(self) -> dict[str, object]:
        """transformers' padding-free keys: labels are unshifted (the model shifts them), with
        -100 on the first token of every piece and on padding."""
        labels = self.input_ids.clone()
        labels[self.position_ids == 0] = IGNORE_INDEX
        labels[self.document_ids < 0] = IGNORE_INDEX
        return {
            "input_ids": self.input_ids,
            "labels": labels,
            "position_ids": self.position_ids,
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen,
        }

    def attention_mask(self) -> torch.Tensor:
        """Dense block-diagonal causal mask ``[rows, seq_len, seq_len]`` (True = may attend)."""
        return document_mask(self.document_ids)


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask from document ids ``[..., seq_len]``: a token attends to the
    earlier tokens of its own piece; padding attends to itself only (keeps softmax finite).

    For long rows prefer flex-attention with a ``mask_mod`` comparing these document ids.
    """
    op = "document_mask"
    if not isinstance(document_ids, torch.Tensor):
        raise TypeError(f"{op}: document_ids must be a tensor, got {type(document_ids).__name__}")
    if not _is_integer(document_ids.dtype):
        raise TypeError(f"{op}: document_ids must be an integer tensor, got {document_ids.dtype}")
    if document_ids.dim() == 0:
        raise ValueError(f"{op}: document_ids must have shape [..., seq_len], got a 0-d tensor")
    n = document_ids.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=document_ids.device).tril()
    same = document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)
    pad = (document_ids < 0).unsqueeze(-1) & torch.eye(
        n, dtype=torch.bool, device=document_ids.device
    )
    return (same & causal & (document_ids >= 0).unsqueeze(-1)) | pad


def _as_bytes(op: str, doc: object, index: int) -> bytes:
    if isinstance(doc, str):
        return doc.encode("utf-8", "surrogatepass")
    if isinstance(doc, (bytes, bytearray, memoryview)):
        return bytes(doc)
    raise TypeError(f"{op}: docs[{index}] must be str or bytes, got {type(doc).__name__}")


def byte_buffer(op: str, docs: Sequence[object]) -> tuple[np.ndarray, np.ndarray]:
    """The documents' bytes back to back (uint8) and the int64 offsets where each starts."""
    encoded = [_as_bytes(op, d, i) for i, d in enumerate(docs)]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def batch_from_arrays(arrays: dict) -> PackedBatch:
    return PackedBatch(
        input_ids=torch.from_numpy(arrays["input_ids"]),
        targets=torch.from_numpy(arrays["targets"]),
        position_ids=torch.from_numpy(arrays["position_ids"]),
        document_ids=torch.from_numpy(arrays["document_ids"]),
        cu_seqlens=torch.from_numpy(arrays["cu_seqlens"]),
        max_seqlen=int(arrays["max_seqlen"]),
    )


def pack_documents(
    docs: Sequence[str | bytes],
    seq_len: int,
    *,
    batch_size: int | None = None,
    offset: int = 4,
    add_bos: bool = True,
    add_eos: bool = True,
    split_long: bool = True,
    seed: int | None = None,
) -> PackedBatch:
    """Packs documents into rows of ``seq_len`` byte tokens by best-fit decreasing.

    A document (with its BOS/EOS) longer than a row is cut into pieces of ``seq_len``
    (``split_long=True``) or cut to its first ``seq_len`` tokens (``False``). ``batch_size=None``
    makes as many rows as needed; an int gives exactly that many rows (padding rows added) and
    raises ValueError if the documents need more. ``seed`` shuffles the order of the rows.
    """
    op = "pack_documents"
    if isinstance(docs, (str, bytes)) or not isinstance(docs, Sequence):
        raise TypeError(f"{op}: docs must be a sequence of str or bytes, got {type(docs).__name__}")
    seq_len = check_int(op, "seq_len", seq_len, 1)
    if batch_size is not None:
        batch_size = check_int(op, "batch_size", batch_size, 1)
    offset = check_int(op, "offset", offset, 3, MAX_OFFSET)
    if seed is not None:
        seed = check_int(op, "seed", seed, 0, 2**64 - 1)
    for name, value in (("add_bos", add_bos), ("add_eos", add_eos), ("split_long", split_long)):
        check_bool(op, name, value)
    buffer, offsets = byte_buffer(op, docs)
    arrays = _core.pack_documents(
        buffer, offsets, seq_len, batch_size, offset, add_bos, add_eos, split_long, seed
    )
    return batch_from_arrays(arrays)


def decode_bytes(ids: torch.Tensor | Sequence[int], offset: int = 4) -> str:
    """Ids back to text: ids below ``offset`` (PAD, BOS, EOS, -100) are dropped, invalid UTF-8
    is replaced with U+FFFD; an id beyond the byte range raises ValueError."""
    op = "decode_bytes"
    offset = check_int(op, "offset", offset, 0, MAX_OFFSET)
    if isinstance(ids, torch.Tensor):
        t = ids
    elif isinstance(ids, (str, bytes)) or ids is None:
        raise TypeError(
            f"{op}: ids must be a tensor or a sequence of ints, got {type(ids).__name__}"
        )
    else:
        try:  # no dtype: floats must come out as floats and be refused, not truncated
            t = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:
            raise TypeError(f"{op}: ids must be a tensor or a sequence of ints ({err})") from None
        if t.numel() == 0:
            return ""
    if not _is_integer(t.dtype):
        raise TypeError(f"{op}: ids must be integers, got {t.dtype}")
    t = t.detach().reshape(-1).to("cpu", torch.int64)
    if t.numel() and int(t.max()) >= offset + 256:
        raise ValueError(
            f"{op}: id {int(t.max())} is beyond the byte range [{offset}, {offset + 256})"
        )
    return bytes((t[t >= offset] - offset).tolist()).decode("utf-8", "replace")
