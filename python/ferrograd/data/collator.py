"""PackingCollator: transformers' Trainer batches packed padding-free by the Rust packer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .. import _core
from ..ops._checks import check_bool, check_int
from .packing import IGNORE_INDEX, _is_integer, byte_buffer

_OP = "PackingCollator"
_LAYOUTS = ("flat", "rows")
_TEXT = (str, bytes, bytearray, memoryview)
_IDS = (list, tuple, torch.Tensor, np.ndarray)  # an example that is its token ids
# The largest byte offset whose ids (offset + 255) stay in int32, as the packer checks.
_MAX_OFFSET = 2**31 - 1 - 256


class PackingCollator:
    """A ``data_collator`` for transformers' ``Trainer``: the examples of a batch packed by the
    Rust packer (best-fit decreasing) into a padding-free batch.

    Examples are token ids (a list, 1-d tensor or array of non-negative ints) or a mapping
    with ``input_ids`` (as a tokenized dataset gives) and optionally ``labels`` (as long, -100
    where not trained, e.g. a masked prompt; other keys are ignored), or raw text for
    byte-level models: ``str`` / ``bytes`` or a mapping with ``text_key``, turned into byte
    ids (``byte + offset``, BOS 1 / EOS 2 added per ``add_bos`` / ``add_eos``, as
    :func:`pack_documents`). A batch holds one kind or the other.

    ``bos_id`` / ``eos_id`` (token examples): an id put before / after every document (None:
    nothing added, e.g. ``eos_id=tokenizer.eos_token_id`` separates documents a tokenizer does
    not end). A document longer than ``seq_len`` tokens is cut into pieces of ``seq_len``
    (``split_long=True``) or cut to its first ``seq_len`` tokens (``False``).

    The batch: ``input_ids``, ``labels`` and ``position_ids`` (int64). ``layout="flat"`` gives
    ``[1, total]``, every piece back to back (as ``DataCollatorWithFlattening``);
    ``layout="rows"`` gives ``[rows, seq_len]``, pieces packed into rows padded with ``pad_id``
    (token examples; raw text pads with PAD 0), each padding tail its own segment with labels
    -100. ``labels`` are unshifted (the model shifts them): the example's labels (or ids), -100
    on the first token of every piece, so no token is trained across a document boundary.
    ``position_ids`` restart at 0 on every piece.
    ``return_flash_attn_kwargs`` adds ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32 segment
    boundaries over the flattened batch) and ``max_length_q`` / ``max_length_k`` (int), which
    transformers' flash-attention path reads. ``use_cache`` (when not None) goes into the batch
    as the model's ``use_cache``: transformers 5.x's sdpa / eager attention builds its
    block-diagonal mask from ``position_ids`` only without a cache, and models default to
    ``use_cache=True``.

    With a ``datasets.Dataset`` of raw text, pass ``remove_unused_columns=False`` to the
    TrainingArguments (else the Trainer drops the text column).
    """

    def __init__(
        self,
        seq_len: int,
        *,
        layout: str = "flat",
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int = 0,
        offset: int = 4,
        add_bos: bool = True,
        add_eos: bool = True,
        split_long: bool = True,
        return_flash_attn_kwargs: bool = True,
        use_cache: bool | None = False,
        text_key: str = "text",
    ) -> None:
        seq_len = check_int(_OP, "seq_len", seq_len, 1)
        if layout not in _LAYOUTS:
            raise ValueError(f"{_OP}: layout must be one of {_LAYOUTS}, got {layout!r}")
        bos_id, eos_id = (
            None if value is None else check_int(_OP, name, value, 0)
            for name, value in (("bos_id", bos_id), ("eos_id", eos_id))
        )
        pad_id = check_int(_OP, "pad_id", pad_id, 0)
        offset = check_int(_OP, "offset", offset, 3, _MAX_OFFSET)
        for name, value in (
            ("add_bos", add_bos),
            ("add_eos", add_eos),
            ("split_long", split_long),
            ("return_flash_attn_kwargs", return_flash_attn_kwargs),
        ):
            check_bool(_OP, name, value)
        if use_cache is not None:
            check_bool(_OP, "use_cache", use_cache)
        if not isinstance(text_key, str):
            raise TypeError(f"{_OP}: text_key must be a str, got {type(text_key).__name__}")
        self.seq_len, self.layout = seq_len, layout
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.offset, self.add_bos, self.add_eos = offset, add_bos, add_eos
        self.split_long = split_long
        self.return_flash_attn_kwargs = return_flash_attn_kwargs
        self.use_cache, self.text_key = use_cache, text_key

    def __repr__(self) -> str:
        return (
            f"{_OP}(seq_len={self.seq_len}, layout={self.layout!r}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id})"
        )

    def __call__(self, features: Sequence[object]) -> dict[str, object]:
        if isinstance(features, (*_TEXT, Mapping)) or not isinstance(features, Sequence):
            raise TypeError(
                f"{_OP}: features must be a sequence of examples, got {type(features).__name__}"
            )
        if not features:
            raise ValueError(f"{_OP}: features is empty")
        texts = [self._text(f) for f in features]
        if all(t is not None for t in texts):
            buffer, offsets = byte_buffer(_OP, texts)
            arrays = _core.pack_documents(
                buffer, offsets, self.seq_len, None, self.offset, self.add_bos, self.add_eos,
                self.split_long,
            )  # fmt: skip
        elif any(t is not None for t in texts):
            raise TypeError(f"{_OP}: a batch must be all token examples or all raw text")
        else:
            ids, labels, offsets = self._token_buffers(features)
            arrays = _core.pack_tokens(
                ids, offsets, self.seq_len, labels, self.pad_id, self.bos_id, self.eos_id,
                self.split_long,
            )  # fmt: skip
        return self._batch(arrays)

    def _text(self, feature: object) -> object:
        """The example's raw text, or None for a token example."""
        if isinstance(feature, _TEXT):
            return feature
        if isinstance(feature, Mapping) and "input_ids" not in feature and self.text_key in feature:
            text = feature[self.text_key]
            if not isinstance(text, _TEXT):
                raise TypeError(
                    f"{_OP}: example[{self.text_key!r}] must be str or bytes, "
                    f"got {type(text).__name__}"
                )
            return text
        if isinstance(feature, _IDS):
            return None
        if not isinstance(feature, Mapping):
            raise TypeError(
                f"{_OP}: an example must be a mapping with 'input_ids', a sequence of ids, "
                f"str or bytes, got {type(feature).__name__}"
            )
        if "input_ids" not in feature:
            raise ValueError(
                f"{_OP}: an example has neither 'input_ids' nor {self.text_key!r} "
                f"(keys: {sorted(map(str, feature))})"
            )
        return None

    def _token_buffers(self, features: Sequence[object]) -> tuple[np.ndarray, ...]:
        """All examples' ids (and labels, or None when no example has any) back to back."""
        features = [f if isinstance(f, Mapping) else {"input_ids": f} for f in features]
        ids = [_int_array("input_ids", f["input_ids"]) for f in features]
        for i, x in enumerate(ids):
            if x.size and x.min() < 0:
                raise ValueError(f"{_OP}: input_ids of example {i} hold a negative id")
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in ids], out=offsets[1:])
        if not any("labels" in f for f in features):
            return np.concatenate(ids), None, offsets
        labels = []
        for i, (f, x) in enumerate(zip(features, ids, strict=True)):
            y = _int_array("labels", f["labels"]) if "labels" in f else x
            if len(y) != len(x):
                raise ValueError(
                    f"{_OP}: labels of example {i} hold {len(y)} tokens, input_ids {len(x)}"
                )
            labels.append(y)
        return np.concatenate(ids), np.concatenate(labels), offsets

    def _batch(self, arrays: dict) -> dict[str, object]:
        ids, targets, positions = (arrays[k] for k in ("input_ids", "targets", "position_ids"))
        # unshifted labels: token i's label is what token i - 1 targets, none on a piece start
        labels = np.full_like(targets, IGNORE_INDEX)
        labels[:, 1:] = targets[:, :-1]
        labels[positions == 0] = IGNORE_INDEX
        if self.layout == "flat":  # (numpy: torch's boolean indexing is far slower on CPU)
            keep = arrays["document_ids"] >= 0
            ids, labels, positions = (a[keep][None] for a in (ids, labels, positions))
        if ids.size == 0:
            raise ValueError(f"{_OP}: every example in the batch is empty")
        batch: dict[str, object] = {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(positions),
        }
        if self.return_flash_attn_kwargs:
            if self.layout == "flat":
                starts = np.flatnonzero(positions[0] == 0)
                cu = np.append(starts, ids.shape[1]).astype(np.int32)
                longest = int(np.diff(cu).max())
            else:
                cu, longest = arrays["cu_seqlens"], int(arrays["max_seqlen"])
            cu_t = torch.from_numpy(cu)
            batch.update(
                cu_seq_lens_q=cu_t, cu_seq_lens_k=cu_t, max_length_q=longest, max_length_k=longest
            )
        if self.use_cache is not None:
            batch["use_cache"] = self.use_cache
        return batch


def _int_array(name: str, value: object) -> np.ndarray:
    """A 1-d int64 array from a list, tensor or array of ints (floats and bools refused)."""
    if isinstance(value, torch.Tensor):
        if not _is_integer(value.dtype):
            raise TypeError(f"{_OP}: {name} must hold integers, got {value.dtype}")
        array = value.detach().cpu().numpy()
    elif isinstance(value, (*_TEXT, Mapping)) or value is None:
        raise TypeError(f"{_OP}: {name} must be a sequence of ints, got {type(value).__name__}")
    else:
        try:
            array = np.asarray(value)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{_OP}: {name} must be a sequence of ints ({err})") from None
        if array.size == 0:
            array = array.astype(np.int64)
        if array.dtype.kind not in "iu":
            raise TypeError(f"{_OP}: {name} must hold integers, got {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"{_OP}: {name} must be 1-d (one example), got shape {array.shape}")
    return array.astype(np.int64, copy=False)
