"""fg.data.ByteStream: coverage, sharding, shuffling and exact resume."""

from __future__ import annotations

import io
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_packing import batch_pieces, reference_pieces

from ferrograd.data import ByteStream


def pieces_of(batches):
    total = Counter()
    for batch in batches:
        got, _ = batch_pieces(batch)
        total += got
    return total


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[bytes]]:
    rng = random.Random(0)
    docs = []
    for i in range(30):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
        sub = tmp_path / f"d{i % 3}" / ("deep" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:02d}.bin").write_bytes(data)
        docs.append(data)
    return tmp_path, docs


def test_files_every_byte_once_in_chunks(corpus):
    root, docs = corpus
    stream = ByteStream(root, 64, 4, seed=1, chunk_bytes=7)
    batches = list(stream)
    assert all(b.input_ids.shape == (4, 64) for b in batches)
    assert pieces_of(batches) == reference_pieces(docs, 64)


def test_documents_and_one_pass_iterables():
    docs = [b"alpha", "beta \u2713", b"", b"\x00\xff", "gamma" * 40]
    for source in (docs, iter(docs)):
        assert pieces_of(ByteStream(source, 16, 2, seed=5)) == reference_pieces(docs, 16)


def test_shuffle_is_seeded():
    docs = [f"doc {i} ".encode() * (i % 5 + 1) for i in range(60)]

    def ids(seed):
        return torch.cat([b.input_ids for b in ByteStream(docs, 32, 4, seed=seed)])

    assert torch.equal(ids(3), ids(3))
    assert not torch.equal(ids(3), ids(4))
    unshuffled = torch.cat([b.input_ids for b in ByteStream(docs, 32, 4, shuffle=False)])
    assert torch.equal(
        unshuffled, torch.cat([b.input_ids for b in ByteStream(docs, 32, 4, shuffle=False)])
    )


def test_two_workers_times_two_ranks_cover_every_document_once(corpus, monkeypatch):
    root, docs = corpus
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    total = Counter()
    for rank in range(2):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        loader = torch.utils.data.DataLoader(
            ByteStream(root, 48, 2, seed=9),
            batch_size=None,
            num_workers=2,
            multiprocessing_context="fork",
        )
        total += pieces_of(list(loader))
    assert total == reference_pieces(docs, 48)


def test_shard_ranks_false_gives_every_rank_the_whole_stream(corpus, monkeypatch):
    """What a data-parallel run that splits one global batch over ranks reads."""
    root, _ = corpus
    alone = [b.input_ids for b in ByteStream(root, 48, 2, seed=9)]
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    whole = [b.input_ids for b in ByteStream(root, 48, 2, seed=9, shard_ranks=False)]
    sharded = [b.input_ids for b in ByteStream(root, 48, 2, seed=9)]
    assert len(whole) == len(alone) and all(map(torch.equal, whole, alone))
    assert len(sharded) < len(alone)


@pytest.mark.parametrize("stop_after", [1, 3, 7])
def test_resume_equals_an_uninterrupted_run(corpus, stop_after):
    root, _ = corpus
    full = list(ByteStream(root, 40, 3, seed=2, chunk_bytes=11))
    first = ByteStream(root, 40, 3, seed=2, chunk_bytes=11)
    it = iter(first)
    head = [next(it) for _ in range(stop_after)]
    state = first.state_dict()
    resumed = ByteStream(root, 40, 3, seed=2, chunk_bytes=11)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert len(head) + len(tail) == len(full)
    for a, b in zip(head + tail, full, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="ByteStream: seq_len"):
        ByteStream(["a"], 0, 2)
    with pytest.raises(TypeError, match="ByteStream: batch_size"):
        ByteStream(["a"], 8, 2.5)
    with pytest.raises(ValueError, match="ByteStream: source"):
        ByteStream(tmp_path / "missing", 8, 2)
    with pytest.raises(TypeError, match="ByteStream: a document"):
        list(ByteStream([3.5], 8, 2))
    with pytest.raises(TypeError, match="ByteStream: add_eos must be a bool"):
        ByteStream(["a"], 8, 2, add_eos=None)
    with pytest.raises(ValueError, match="ByteStream: seed"):
        ByteStream(["a"], 8, 2, seed=-1)
    with pytest.raises(TypeError, match="exact resume"):
        ByteStream(iter(["a"]), 8, 2).state_dict()


def same_batch(a, b) -> bool:
    return all(
        torch.equal(getattr(a, k), getattr(b, k))
        for k in ("input_ids", "targets", "position_ids", "document_ids", "cu_seqlens")
    ) and (a.max_seqlen == b.max_seqlen)


def through_torch_save(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


DOCS = [b"abcd", b"", "h\u00e9llo w", b"\x00\xff\x02", b"xyzuvw" * 3, b"q"]
RESUME_CONFIGS = [
    # (documents, seq_len, batch_size, options)
    ([b"abcd"], 1, 1, {"add_bos": False}),
    ([b"abcd"], 2, 1, {}),
    (DOCS, 1, 1, {"shuffle": False}),
    (DOCS, 2, 1, {"add_eos": False, "seed": 3}),
    (DOCS, 3, 2, {"add_bos": False, "seed": 1}),
    (DOCS, 3, 2, {"add_bos": False, "add_eos": False, "shuffle": False}),
    (DOCS, 4, 3, {"seed": 7}),
    (DOCS, 5, 1, {"add_bos": False, "seed": 2}),
    (DOCS * 2, 7, 2, {"shuffle": False}),
    ("files", 3, 2, {"seed": 4, "chunk_bytes": 2}),
    ("files", 2, 1, {"add_bos": False, "shuffle": False, "chunk_bytes": 1}),
    ("files", 6, 2, {"add_eos": False, "seed": 5, "chunk_bytes": 3}),
]


@pytest.mark.parametrize("docs, seq_len, batch_size, options", RESUME_CONFIGS)
def test_resume_is_exact_at_every_save_point(tmp_path, docs, seq_len, batch_size, options):
    """Every save point, through torch.save / torch.load(weights_only=True), resumes to the
    batches (and the batch count) of the uninterrupted run."""
    if docs == "files":
        for i, doc in enumerate(DOCS):
            (tmp_path / f"f{i}.bin").write_bytes(doc.encode() if isinstance(doc, str) else doc)
        docs = tmp_path

    def stream():
        return ByteStream(docs, seq_len, batch_size, **options)

    full = list(stream())
    assert len(full) > 1
    for stop in range(len(full) + 1):
        first = stream()
        it = iter(first)
        head = [next(it) for _ in range(stop)]
        resumed = stream()
        resumed.load_state_dict(through_torch_save(first.state_dict()))
        run = head + list(resumed)
        assert len(run) == len(full), f"save after batch {stop}"
        assert all(map(same_batch, run, full)), f"save after batch {stop}"


def test_bad_state_names_the_key():
    stream = ByteStream([b"abcdef"], 2, 1, shuffle=False)
    next(iter(stream))
    state = stream.state_dict()
    with pytest.raises(TypeError, match=r"ByteStream: state\['doc'\] must be an int"):
        ByteStream([b"abcdef"], 2, 1).load_state_dict({**state, "doc": 1.5})
    pool = {**state["pool"], "lengths": state["pool"]["lengths"] + 1}
    with pytest.raises(ValueError, match=r"ByteStream: state\['pool'\] is inconsistent"):
        ByteStream([b"abcdef"], 2, 1).load_state_dict({**state, "pool": pool})
    with pytest.raises(ValueError, match=r"ByteStream: state\['pool'\]\['flags'\]"):
        pool = {**state["pool"], "flags": state["pool"]["flags"].long()}
        ByteStream([b"abcdef"], 2, 1).load_state_dict({**state, "pool": pool})
