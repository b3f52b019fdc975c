"""fg.data.pack_documents and friends against an independent plain-Python reference."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

import ferrograd as fg
from ferrograd.data import decode_bytes, document_mask, pack_documents

BOS, EOS, PAD, IGNORE = 1, 2, 0, -100


def reference_pieces(docs, seq_len, offset=4, bos=True, eos=True, split_long=True):
    """Each document's tokens cut into seq_len runs, with the id that follows each run."""
    pieces = Counter()
    for doc in docs:
        raw = doc.encode() if isinstance(doc, str) else doc
        tokens = [BOS] * bos + [b + offset for b in raw] + [EOS] * eos
        for k in range(0, len(tokens), seq_len):
            run = tuple(tokens[k : k + seq_len])
            nxt = tokens[k + seq_len] if k + seq_len < len(tokens) else IGNORE
            pieces[(run, nxt)] += 1
            if not split_long:
                break
    return pieces


def batch_pieces(batch):
    """Splits a batch back into its pieces (runs of equal document ids), checking each row."""
    pieces = Counter()
    seq_len = batch.input_ids.shape[1]
    segments = []
    for ids, tgt, pos, doc in zip(
        batch.input_ids.tolist(),
        batch.targets.tolist(),
        batch.position_ids.tolist(),
        batch.document_ids.tolist(),
        strict=True,
    ):
        i = 0
        expected_doc = 0
        while i < seq_len:
            j = i
            while j < seq_len and doc[j] == doc[i]:
                j += 1
            segments.append(j - i)
            if doc[i] < 0:  # padding tail
                assert j == seq_len
                assert ids[i:] == [PAD] * (j - i) and tgt[i:] == [IGNORE] * (j - i)
            else:
                assert doc[i] == expected_doc
                expected_doc += 1
                assert pos[i:j] == list(range(j - i))
                assert tgt[i : j - 1] == ids[i + 1 : j]
                pieces[(tuple(ids[i:j]), tgt[j - 1])] += 1
            i = j
    return pieces, segments


def random_docs(rng: random.Random, count: int, median: int) -> list[bytes]:
    docs = [bytes(rng.randrange(256) for _ in range(int(rng.lognormvariate(0, 1) * median)))]
    docs += [b"", b"\x00\x00", "héllo wörld".encode(), b"\xff\xfe invalid utf-8"]
    docs += [
        bytes(rng.randrange(256) for _ in range(rng.randrange(3 * median))) for _ in range(count)
    ]
    return docs


@pytest.mark.parametrize("seq_len", [1, 2, 7, 64, 257])
@pytest.mark.parametrize(("bos", "eos"), [(True, True), (False, True), (False, False)])
def test_every_byte_once_targets_positions_cu_seqlens(seq_len, bos, eos):
    docs = random_docs(random.Random(seq_len), 40, 60)
    batch = pack_documents(docs, seq_len, add_bos=bos, add_eos=eos)
    got, segments = batch_pieces(batch)
    assert got == reference_pieces(docs, seq_len, bos=bos, eos=eos)
    cu = batch.cu_seqlens
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0] + list(torch.tensor(segments).cumsum(0).tolist())
    assert batch.max_seqlen == max(segments)
    assert cu[-1] == batch.input_ids.numel()


def test_split_long_false_keeps_the_first_piece():
    docs = [b"abcdefghij", b"xy"]
    batch = pack_documents(docs, 4, split_long=False)
    got, _ = batch_pieces(batch)
    assert got == reference_pieces(docs, 4, split_long=False)


def test_batch_size_and_seed():
    docs = [f"document {i} " * (i % 7 + 1) for i in range(50)]
    plain = pack_documents(docs, 32)
    rows = plain.input_ids.shape[0]
    padded = pack_documents(docs, 32, batch_size=rows + 3)
    assert padded.input_ids.shape == (rows + 3, 32)
    assert (padded.document_ids[rows:] == -1).all()
    with pytest.raises(ValueError, match="batch_size"):
        pack_documents(docs, 32, batch_size=rows - 1)
    a = pack_documents(docs, 32, seed=3)
    b = pack_documents(docs, 32, seed=3)
    c = pack_documents(docs, 32, seed=4)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.input_ids, c.input_ids)
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(a.input_ids) == key(c.input_ids) == key(plain.input_ids)


def test_packing_is_dense_on_log_normal_lengths():
    rng = random.Random(0)
    seq_len = 2048
    docs = [b"x" * max(1, int(rng.lognormvariate(0, 0.8) * seq_len / 4)) for _ in range(2000)]
    batch = pack_documents(docs, seq_len)
    filled = (batch.document_ids >= 0).float().mean().item()
    assert filled >= 0.99


def test_decode_bytes_round_trip_and_errors():
    text = "byte-level ✓ \x00 end"
    batch = pack_documents([text], 64)
    assert decode_bytes(batch.input_ids) == text
    assert decode_bytes(batch.targets) == text  # BOS targets the first byte
    assert decode_bytes([1, 0xFF + 4, 2]) == "\ufffd"
    assert decode_bytes(torch.tensor([[104 + 4, 105 + 4]]), offset=4) == "hi"
    with pytest.raises(ValueError, match="decode_bytes: id 300"):
        decode_bytes([300])
    with pytest.raises(TypeError, match="decode_bytes: ids"):
        decode_bytes(torch.tensor([1.0]))


def test_to_hf_and_document_mask():
    batch = pack_documents(["abc", "de", "f"], 8)
    hf = batch.to_hf()
    assert set(hf) == {
        "input_ids",
        "labels",
        "position_ids",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
    }
    labels = hf["labels"]
    starts = batch.position_ids == 0
    assert (labels[starts] == IGNORE).all()
    real = (batch.document_ids >= 0) & ~starts
    assert torch.equal(labels[real], batch.input_ids[real])
    mask = document_mask(batch.document_ids)
    doc = batch.document_ids
    n = doc.shape[1]
    for r in range(doc.shape[0]):
        for i in range(n):
            for j in range(n):
                want = (doc[r, i] == doc[r, j] and doc[r, i] >= 0 and j <= i) or (
                    doc[r, i] < 0 and i == j
                )
                assert mask[r, i, j].item() == want


def test_to_hf_feeds_a_transformers_model():
    """A packed batch's loss equals the per-document losses when attention honours the document
    boundaries: on the CPU, sdpa with the block-diagonal causal mask of document_mask."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    config = transformers.LlamaConfig(
        vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    docs = ["hello there", "byte level", "packing"]
    packed = pack_documents(docs, 48, add_eos=False)
    hf = packed.to_hf()
    mask = document_mask(packed.document_ids)[:, None]  # [batch, 1, query, key]
    with torch.no_grad():
        packed_loss = model(
            input_ids=hf["input_ids"], labels=hf["labels"], position_ids=hf["position_ids"],
            attention_mask=mask,
        ).loss  # fmt: skip
        losses, counts = [], []
        for d in docs:
            ids = torch.tensor([[1] + [b + 4 for b in d.encode()]])
            losses.append(model(input_ids=ids, labels=ids).loss * (ids.shape[1] - 1))
            counts.append(ids.shape[1] - 1)
    torch.testing.assert_close(packed_loss, sum(losses) / sum(counts), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: pack_documents("not a list", 8), TypeError, "docs must be a sequence"),
        (lambda: pack_documents([1, 2], 8), TypeError, r"docs\[0\]"),
        (lambda: pack_documents(["a"], 0), ValueError, "seq_len"),
        (lambda: pack_documents(["a"], 8, offset=2), ValueError, "offset"),
        (lambda: pack_documents(["a"], 8, batch_size=0), ValueError, "batch_size"),
        (lambda: pack_documents(["a"], 8.0), TypeError, "seq_len"),
        (lambda: pack_documents(["a"], 8, add_eos=None), TypeError, "add_eos must be a bool"),
        (lambda: pack_documents(["a"], 8, add_bos=1), TypeError, "add_bos must be a bool"),
        (lambda: pack_documents(["a"], 8, split_long="no"), TypeError, "split_long"),
    ],
)
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=f"pack_documents: {match}"):
        call()


def test_exported_from_the_package():
    assert fg.data.pack_documents is pack_documents


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: document_mask(None), TypeError, "document_mask: document_ids must be a tensor"),
        (lambda: document_mask(torch.tensor(3)), ValueError, "document_mask: document_ids .* 0-d"),
        (
            lambda: document_mask(torch.zeros(4)),
            TypeError,
            "document_mask: document_ids .* integer",
        ),
        (lambda: decode_bytes(None), TypeError, "decode_bytes: ids must be a tensor or a sequence"),
        (lambda: decode_bytes([101.7]), TypeError, "decode_bytes: ids must be integers"),
        (lambda: decode_bytes([104, 2.0]), TypeError, "decode_bytes: ids must be integers"),
        (lambda: decode_bytes([True]), TypeError, "decode_bytes: ids must be integers"),
        (lambda: decode_bytes("hi"), TypeError, "decode_bytes: ids must be a tensor"),
        (lambda: decode_bytes([[1, 2], [3]]), TypeError, "decode_bytes: ids must be a tensor"),
        (lambda: decode_bytes([5], offset=-1), ValueError, "decode_bytes: offset"),
    ],
)
def test_bad_inputs_name_the_function_and_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_decode_bytes_takes_empty_and_nested_sequences():
    assert decode_bytes([]) == ""
    assert decode_bytes([[104 + 4], [105 + 4]]) == "hi"


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: fg.data.pack_documents([b"ab"], 4, seed=2**64), "pack_documents: seed"),
        (lambda: fg.data.pack_documents([b"ab"], 4, offset=2**64), "pack_documents: offset"),
        (lambda: fg.data.pack_documents([b"ab"], 4, offset=2**31), "pack_documents: offset"),
        (lambda: fg.data.decode_bytes([5], offset=2**63), "decode_bytes: offset"),
        (lambda: fg.data.ByteStream([b"ab"], 4, 1, offset=2**64), "ByteStream: offset"),
    ],
)
def test_integers_beyond_the_packers_range_name_the_argument(call, match):
    """Fuzz finding: these were OverflowErrors from the Rust boundary, or a message about
    offset being below 3, or a raw bytes() error."""
    with pytest.raises(ValueError, match=f"^{match} must be in"):
        call()
    assert (
        fg.data.pack_documents([b"ab"], 4, seed=2**64 - 1, offset=2**31 - 257).input_ids[0, 1]
        == 2**31 - 257 + 97
    )
