"""ByteStream: a streaming IterableDataset of packed byte-level batches."""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Generator, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .. import _core
from ..ops._checks import check_bool, check_int
from .packing import EOS_ID, IGNORE_INDEX, MAX_OFFSET, PackedBatch, batch_from_arrays

_OP = "ByteStream"

# A piece: (bytes, has_bos, has_eos, id that follows it or -100).
Piece = tuple[bytes, bool, bool, int]


def _files_under(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    if path.is_file():
        return [path]
    raise ValueError(f"{_OP}: source {str(path)!r} is neither a file nor a directory")


class ByteStream(IterableDataset):
    """Packed batches of byte tokens from files, directories (recursive) or documents.

    ``sources``: a path (``str`` or ``os.PathLike``: a file, or a directory read recursively in
    sorted order), or an iterable whose items are paths (``os.PathLike``) or documents (``str``
    or ``bytes``). Each file is one document, read in chunks of ``chunk_bytes``. Any bytes are
    accepted (invalid UTF-8, NUL, empty documents).

    Each epoch visits every document exactly once across DataLoader workers and
    torch.distributed ranks (document i goes to shard i mod (ranks x workers); with
    ``shard_ranks=False`` every rank reads every document, e.g. to split one global batch). With
    ``shuffle`` the documents of files and sequences are permuted (seeded by ``seed`` and the
    epoch, see :meth:`set_epoch`); a one-pass iterable goes through a seeded shuffle buffer.
    Documents are cut into pieces of at most ``seq_len`` tokens and packed by best-fit
    decreasing into ``batch_size`` rows; the last batch of an epoch may hold padding rows.

    :meth:`state_dict` / :meth:`load_state_dict` resume mid-epoch exactly (files and sequences
    of documents), per process: inside DataLoader workers each worker keeps its own state.
    """

    def __init__(
        self,
        sources: str | os.PathLike | Iterable[str | bytes | os.PathLike],
        seq_len: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        offset: int = 4,
        add_bos: bool = True,
        add_eos: bool = True,
        chunk_bytes: int = 1 << 20,
        shuffle_buffer: int = 1024,
        shard_ranks: bool = True,
    ) -> None:
        super().__init__()
        seq_len, batch_size, chunk_bytes, shuffle_buffer, seed = (
            check_int(_OP, name, value, minimum)
            for name, value, minimum in (
                ("seq_len", seq_len, 1),
                ("batch_size", batch_size, 1),
                ("chunk_bytes", chunk_bytes, 1),
                ("shuffle_buffer", shuffle_buffer, 1),
                ("seed", seed, 0),
            )
        )
        offset = check_int(_OP, "offset", offset, 3, MAX_OFFSET)
        flags = {"shuffle": shuffle, "add_bos": add_bos, "add_eos": add_eos}
        for name, value in {**flags, "shard_ranks": shard_ranks}.items():
            check_bool(_OP, name, value)
        if isinstance(sources, (str, os.PathLike)):
            self._docs: Sequence | Iterable = _files_under(Path(sources))
        elif isinstance(sources, Sequence):
            self._docs = [
                _files_under(Path(s)) if isinstance(s, os.PathLike) else [s] for s in sources
            ]
            self._docs = [d for group in self._docs for d in group]
        elif isinstance(sources, Iterable):
            self._docs = sources  # one pass, read lazily
        else:
            raise TypeError(
                f"{_OP}: sources must be a path or an iterable, got {type(sources).__name__}"
            )
        self.seq_len, self.batch_size, self.offset = seq_len, batch_size, offset
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.add_bos, self.add_eos = add_bos, add_eos
        self.chunk_bytes, self.shuffle_buffer = chunk_bytes, shuffle_buffer
        self.shard_ranks = shard_ranks
        self._resume: dict | None = None
        self._state: dict = self._fresh_state()

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch's shuffle (as DistributedSampler.set_epoch) and restarts it."""
        self.epoch = check_int(f"{_OP}.set_epoch", "epoch", epoch, 0)
        self._resume = None

    def _fresh_state(self) -> dict:
        return {"epoch": self.epoch, "doc": 0, "token": 0, "pool": [], "batches": 0}

    def state_dict(self) -> dict:
        """Where the last yielded batch left this process's shard: resume with load_state_dict.

        Made of ints and tensors only (``torch.load(weights_only=True)`` reads it back)."""
        if not isinstance(self._docs, Sequence):
            raise TypeError(f"{_OP}: exact resume needs files or a sequence of documents")
        state = dict(self._state)
        state["pool"] = _pool_tensors(state["pool"])
        return state

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"{_OP}: state must be a dict, got {type(state).__name__}")
        missing = {"epoch", "doc", "token", "pool", "batches"} - set(state)
        if missing:
            raise ValueError(f"{_OP}: state is missing {sorted(missing)}")
        for key in ("epoch", "doc", "token", "batches"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{_OP}: state[{key!r}] must be an int, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{_OP}: state[{key!r}] must be >= 0, got {value}")
        self.epoch = state["epoch"]
        self._state = {**state, "pool": _pool_pieces(state["pool"])}
        self._resume = copy.deepcopy(self._state)

    # -- documents of this shard ------------------------------------------------------------

    def _shard(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rank, world = 0, 1
        if (
            self.shard_ranks
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return rank * workers + worker, world * workers

    def _my_documents(self) -> Iterator:
        shard, shards = self._shard()
        if isinstance(self._docs, Sequence):
            order = np.arange(len(self._docs))
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self._docs))
            return (self._docs[i] for i in order[shard::shards])
        mine = (d for i, d in enumerate(self._docs) if i % shards == shard)
        return self._buffered_shuffle(mine) if self.shuffle else mine

    def _buffered_shuffle(self, docs: Iterator) -> Iterator:
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        buffer: list = []
        for doc in docs:
            buffer.append(doc)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(int(rng.integers(len(buffer))))
        rng.shuffle(buffer)
        yield from buffer

    def _chunks(self, doc: object, start: int) -> Iterator[bytes]:
        if isinstance(doc, Path):
            with open(doc, "rb") as f:
                f.seek(start)
                while chunk := f.read(self.chunk_bytes):
                    yield chunk
        elif isinstance(doc, str):
            yield doc.encode("utf-8", "surrogatepass")[start:]
        elif isinstance(doc, (bytes, bytearray, memoryview)):
            yield bytes(doc)[start:]
        else:
            raise TypeError(
                f"{_OP}: a document must be str, bytes or a path, got {type(doc).__name__}"
            )

    def _pieces(self, doc: object, token: int) -> Iterator[tuple[Piece, int]]:
        """Pieces of one document from token ``token`` on (BOS counts as token 0), each with
        the token position after it."""
        first = token == 0
        chunks = self._chunks(doc, token - (self.add_bos and not first))
        buf, eof = bytearray(), False
        while True:
            bos = self.add_bos and first
            room = self.seq_len - bos
            while not eof and len(buf) <= room:  # one byte of lookahead past a full piece
                chunk = next(chunks, None)
                eof = chunk is None
                buf += chunk or b""
            if eof and len(buf) + self.add_eos <= room:  # the rest, EOS included, fits
                if bos or buf or self.add_eos:
                    piece = (bytes(buf), bos, self.add_eos, IGNORE_INDEX)
                    yield piece, token + bos + len(buf) + self.add_eos
                return
            take = min(room, len(buf))
            nxt = buf[take] + self.offset if take < len(buf) else EOS_ID
            token += bos + take
            yield (bytes(buf[:take]), bos, False, nxt), token
            del buf[:take]
            first = False

    # -- packing -----------------------------------------------------------------------------

    def _pack(self, pool: list[Piece]) -> tuple[PackedBatch, list[Piece]]:
        lengths = np.array([len(p[0]) for p in pool], dtype=np.int64)
        starts = np.zeros(len(pool), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        flags = np.array([p[1] | (p[2] << 1) for p in pool], dtype=np.uint8)
        next_ids = np.array([p[3] for p in pool], dtype=np.int64)
        buffer = np.frombuffer(b"".join(p[0] for p in pool), dtype=np.uint8)
        arrays = _core.pack_pieces(
            buffer, starts, lengths, flags, next_ids, self.seq_len, self.batch_size, self.offset
        )
        return batch_from_arrays(arrays), [pool[i] for i in arrays["leftover"].tolist()]

    def __iter__(self) -> Iterator[PackedBatch]:
        state = self._resume or self._fresh_state()
        self._resume = None
        state["epoch"] = self.epoch
        pool: list[Piece] = list(state["pool"])
        target = 2 * self.batch_size * self.seq_len  # a wider pool packs tighter
        # A save between two batches packed from one pool: pack on before reading further.
        tokens = yield from self._pack_while(state, pool, target)
        docs = self._my_documents()
        for index, doc in enumerate(docs):
            if index < state["doc"]:
                continue
            start = state["token"] if index == state["doc"] else 0
            for piece, after in self._pieces(doc, start):
                pool.append(piece)
                tokens += _size(piece)
                # After a document's last piece resume at the next one: its EOS is out.
                last = piece[3] == IGNORE_INDEX
                state["doc"], state["token"] = (index + 1, 0) if last else (index, after)
                if tokens >= target:
                    tokens = yield from self._pack_while(state, pool, target)
            state["doc"], state["token"] = index + 1, 0
        yield from self._pack_while(state, pool, 1)
        self._state = self._fresh_state()

    def _pack_while(
        self, state: dict, pool: list[Piece], minimum: int
    ) -> Generator[PackedBatch, None, int]:
        """Packs batches out of ``pool`` (in place) while it holds ``minimum`` tokens or more;
        returns the tokens left."""
        tokens = sum(map(_size, pool))
        while tokens >= minimum:
            batch, pool[:] = self._pack(pool)
            tokens = sum(map(_size, pool))
            state["pool"] = list(pool)
            state["batches"] += 1
            self._state = copy.deepcopy(state)
            yield batch
        return tokens


def _size(piece: Piece) -> int:
    """Tokens of a piece: its bytes, BOS and EOS."""
    return len(piece[0]) + piece[1] + piece[2]


def _pool_tensors(pool: list[Piece]) -> dict[str, torch.Tensor]:
    """The pieces as tensors (a state that torch.load(weights_only=True) reads)."""
    data = b"".join(p[0] for p in pool)
    return {
        "bytes": torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.zeros(0, dtype=torch.uint8),
        "lengths": torch.tensor([len(p[0]) for p in pool], dtype=torch.int64),
        "flags": torch.tensor([p[1] | (p[2] << 1) for p in pool], dtype=torch.uint8),
        "next_ids": torch.tensor([p[3] for p in pool], dtype=torch.int64),
    }


def _pool_pieces(pool: object) -> list[Piece]:
    """Inverse of :func:`_pool_tensors`, checked."""
    keys = {
        "bytes": torch.uint8,
        "lengths": torch.int64,
        "flags": torch.uint8,
        "next_ids": torch.int64,
    }
    if not isinstance(pool, dict) or set(pool) != set(keys):
        raise ValueError(f"{_OP}: state['pool'] must be a dict of tensors {sorted(keys)}")
    for key, dtype in keys.items():
        t = pool[key]
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != dtype:
            raise ValueError(f"{_OP}: state['pool'][{key!r}] must be a 1-d {dtype} tensor")
    lengths, flags, next_ids = (pool[k].tolist() for k in ("lengths", "flags", "next_ids"))
    if not (
        len(lengths) == len(flags) == len(next_ids)
        and all(n >= 0 for n in lengths)
        and sum(lengths) == pool["bytes"].numel()
        and all(0 <= f <= 3 for f in flags)
    ):
        raise ValueError(f"{_OP}: state['pool'] is inconsistent (lengths, flags, bytes)")
    data = bytes(pool["bytes"].tolist())
    ends = list(itertools.accumulate(lengths))
    return [
        (data[end - n : end], bool(f & 1), bool(f & 2), nxt)
        for n, end, f, nxt in zip(lengths, ends, flags, next_ids, strict=True)
    ]
