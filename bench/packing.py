"""Byte-level packing: fg.data.pack_documents vs a plain-Python packer with the same output.

``MB_per_s`` counts input text; ``write_frac`` is the rate of output bytes (four int64 arrays,
32 bytes per token) as a fraction of copy bandwidth. Packing efficiency (non-pad fraction)
compares best-fit decreasing with one document per row. The last row feeds ByteStream through
a DataLoader with 2 workers.
"""

from __future__ import annotations

import bisect
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import Bench, interleaved_times

from ferrograd.data import ByteStream, pack_documents

SEQ_LEN = 2048


def corpus(total_bytes: int, seq_len: int, seed: int = 0) -> list[bytes]:
    """Text-like documents with log-normal lengths, median seq_len / 4."""
    rng = random.Random(seed)
    words = [
        bytes(rng.choice(b"etaoinshrdlu") for _ in range(rng.randrange(2, 9))) for _ in range(512)
    ]
    docs, size = [], 0
    while size < total_bytes:
        n = max(1, int(rng.lognormvariate(0, 0.8) * seq_len / 4))
        doc = b" ".join(rng.choices(words, k=n // 5 + 1))[:n]
        docs.append(doc)
        size += len(doc)
    return docs


def python_pack(docs: list[bytes], seq_len: int, offset: int = 4) -> dict[str, torch.Tensor]:
    """The straightforward packer a user would write: same pieces, best fit, same arrays."""
    pieces = []
    for doc in docs:
        tokens = [1] + [b + offset for b in doc] + [2]
        for k in range(0, len(tokens), seq_len):
            nxt = tokens[k + seq_len] if k + seq_len < len(tokens) else -100
            pieces.append((tokens[k : k + seq_len], nxt))
    pieces.sort(key=lambda p: -len(p[0]))
    rows: list[list] = []
    rooms: list[tuple[int, int]] = []  # (room, row) sorted
    for piece in pieces:
        i = bisect.bisect_left(rooms, (len(piece[0]), -1))
        if i == len(rooms):
            rows.append([])
            room, row = seq_len, len(rows) - 1
        else:
            room, row = rooms.pop(i)
        rows[row].append(piece)
        bisect.insort(rooms, (room - len(piece[0]), row))
    ids, tgt, pos, doc_ids = [], [], [], []
    for row in rows:
        r_ids, r_tgt, r_pos, r_doc = [], [], [], []
        for d, (tokens, nxt) in enumerate(row):
            r_ids += tokens
            r_tgt += tokens[1:] + [nxt]
            r_pos += range(len(tokens))
            r_doc += [d] * len(tokens)
        pad = seq_len - len(r_ids)
        ids.append(r_ids + [0] * pad)
        tgt.append(r_tgt + [-100] * pad)
        pos.append(r_pos + list(range(pad)))
        doc_ids.append(r_doc + [-1] * pad)
    return {
        k: torch.tensor(v) for k, v in (("ids", ids), ("tgt", tgt), ("pos", pos), ("doc", doc_ids))
    }


def in_batches(docs: list[bytes], batch_bytes: int) -> list[list[bytes]]:
    groups, group, size = [], [], 0
    for doc in docs:
        group.append(doc)
        size += len(doc)
        if size >= batch_bytes:
            groups.append(group)
            group, size = [], 0
    return groups + [group] * bool(group)


def main(threads: int | None = None) -> None:
    bench = Bench("packing", threads)
    # (label, corpus MB, bytes of text per pack_documents call): one call, or a training
    # loop's batches (64 rows x 2048 tokens each), whose buffers the allocator recycles.
    for label, mb, per_call in (("one call", 64, None), ("64-row batches", 64, 64 * SEQ_LEN)):
        docs = corpus(mb << 20, SEQ_LEN)
        size = sum(map(len, docs))
        groups = in_batches(docs, per_call) if per_call else [docs]

        def ours(groups=groups):
            for group in groups:
                pack_documents(group, SEQ_LEN)

        fns = {"ours": ours}
        small = docs[: len(docs) * 4 // mb]  # the Python packer gets 4 MB
        small_size = sum(map(len, small))
        fns["python"] = lambda small=small: python_pack(small, SEQ_LEN)
        t = interleaved_times(fns, repeats=3)
        batch = pack_documents(docs, SEQ_LEN)
        tokens = batch.input_ids.numel()
        naive_rows = sum(-(-(len(d) + 2) // SEQ_LEN) for d in docs)
        bench.add(
            {
                "case": f"pack {mb} MB, {label}",
                "docs": len(docs),
                "fg_MB_per_s": size / t["ours"] / 1e6,
                "python_MB_per_s": small_size / t["python"] / 1e6,
                "speedup": (size / t["ours"]) / (small_size / t["python"]),
                "write_frac": 32 * tokens / t["ours"] / bench.bandwidth,
                "fill_bfd": (batch.document_ids >= 0).float().mean().item(),
                "fill_naive": (size + 2 * len(docs)) / (naive_rows * SEQ_LEN),
            }
        )
    with tempfile.TemporaryDirectory() as tmp:
        for i, doc in enumerate(corpus(32 << 20, 4096, seed=1)):
            Path(tmp, f"{i // 1000:03d}").mkdir(exist_ok=True)
            Path(tmp, f"{i // 1000:03d}", f"{i}.txt").write_bytes(doc)
        loader = torch.utils.data.DataLoader(
            ByteStream(tmp, 4096, 16, seed=0), batch_size=None, num_workers=2
        )
        start, batches, size = time.perf_counter(), 0, 0
        for batch in loader:
            batches += 1
            size += int((batch.input_ids >= 4).sum())
        seconds = time.perf_counter() - start
        bench.add(
            {
                "case": "ByteStream 2 workers",
                "docs": len(list(Path(tmp).rglob("*.txt"))),
                "fg_MB_per_s": size / seconds / 1e6,
                "python_MB_per_s": None,
                "speedup": None,
                "write_frac": None,
                "fill_bfd": None,
                "fill_naive": None,
                "batches_per_s": batches / seconds,
            }
        )
    bench.save(
        {
            "python": "pure-Python best-fit packer with the same output, timed on <= 4 MB",
            "fill_bfd": "non-pad fraction of pack_documents (best-fit decreasing)",
            "fill_naive": "non-pad fraction with one document per row (split across rows)",
            "transformers": "DataCollatorWithFlattening not measured: transformers not installed",
        }
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else None)
