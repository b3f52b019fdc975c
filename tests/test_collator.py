"""fg.data.PackingCollator against a plain-Python reference of the packed pieces, and a tiny
transformers Llama: the packed batch's loss equals the token-weighted per-document losses."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

import ferrograd as fg
from ferrograd.data import PackingCollator

IGNORE = -100
VOCAB = 300
PAD = 299  # an id no test document uses, so padding tails are recognisable


def reference_pieces(docs, seq_len, bos=None, eos=None, split_long=True):
    """Each document (ids, labels or None) cut into seq_len runs: (ids, unshifted labels)."""
    pieces = Counter()
    for ids, labels in docs:
        labels = ids if labels is None else labels
        tokens = [bos] * (bos is not None) + list(ids) + [eos] * (eos is not None)
        # BOS is never a target; EOS is trained on
        targets = [IGNORE] * (bos is not None) + list(labels) + [eos] * (eos is not None)
        for k in range(0, len(tokens), seq_len):
            run = tokens[k : k + seq_len]
            pieces[(tuple(run), (IGNORE, *targets[k + 1 : k + len(run)]))] += 1
            if not split_long:
                break
    return pieces


def batch_pieces(batch, seq_len, layout, pad=PAD):
    """Splits a batch into its segments (a position 0 starts one), checking positions and the
    flash-attention keys; returns the (ids, labels) pieces and the padding tails' lengths."""
    ids, labels, pos = (batch[k] for k in ("input_ids", "labels", "position_ids"))
    assert ids.dtype == labels.dtype == pos.dtype == torch.int64
    assert ids.shape == labels.shape == pos.shape
    if layout == "flat":
        assert ids.shape[0] == 1
    else:
        assert ids.shape[1] == seq_len
    pieces, pads, lengths = Counter(), [], []
    for row_ids, row_labels, row_pos in zip(
        ids.tolist(), labels.tolist(), pos.tolist(), strict=True
    ):
        starts = [i for i, p in enumerate(row_pos) if p == 0] + [len(row_pos)]
        assert starts[0] == 0
        for a, b in zip(starts, starts[1:], strict=False):
            assert row_pos[a:b] == list(range(b - a))
            lengths.append(b - a)
            if row_ids[a:b] == [pad] * (b - a):
                assert layout == "rows" and b == len(row_pos)  # padding ends a row
                assert row_labels[a:b] == [IGNORE] * (b - a)
                pads.append(b - a)
            else:
                pieces[(tuple(row_ids[a:b]), tuple(row_labels[a:b]))] += 1
    cu = batch["cu_seq_lens_q"]
    assert cu.dtype == torch.int32 and batch["cu_seq_lens_k"] is cu
    assert cu.tolist() == np.cumsum([0, *lengths]).tolist()
    assert batch["max_length_q"] == batch["max_length_k"] == max(lengths)
    assert isinstance(batch["max_length_q"], int)
    return pieces, pads


def random_docs(rng, count, median, with_labels):
    docs = [[], [7]]
    docs += [
        [rng.randrange(3, VOCAB - 1) for _ in range(rng.randrange(1, 3 * median))]
        for _ in range(count)
    ]
    out = []
    for d in docs:
        labels = None
        if with_labels and rng.random() < 0.5:  # a masked prompt
            cut = rng.randrange(len(d) + 1)
            labels = [IGNORE] * cut + d[cut:]
        out.append((d, labels))
    return out


def as_example(ids, labels, kind):
    example = {"input_ids": {"list": ids, "tensor": torch.tensor(ids, dtype=torch.int32)}[kind]}
    example["attention_mask"] = [1] * len(ids)  # a tokenizer's; ignored
    if labels is not None:
        example["labels"] = labels
    return example


@pytest.mark.parametrize("layout", ["flat", "rows"])
@pytest.mark.parametrize("seq_len", [1, 5, 32])
@pytest.mark.parametrize(("bos", "eos"), [(None, None), (None, 2), (1, 2)])
@pytest.mark.parametrize("with_labels", [False, True])
def test_pieces_labels_positions_cu_seq_lens(layout, seq_len, bos, eos, with_labels):
    rng = random.Random(seq_len * 7 + with_labels)
    docs = random_docs(rng, 12, 12, with_labels)
    kinds = ["list", "tensor"]
    features = [as_example(d, lab, kinds[i % 2]) for i, (d, lab) in enumerate(docs)]
    collate = PackingCollator(seq_len, layout=layout, bos_id=bos, eos_id=eos, pad_id=PAD)
    batch = collate(features)
    assert set(batch) == {
        "input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
        "max_length_q", "max_length_k", "use_cache",
    }  # fmt: skip
    assert batch["use_cache"] is False
    pieces, pads = batch_pieces(batch, seq_len, layout)
    assert pieces == reference_pieces(docs, seq_len, bos, eos)
    if layout == "rows":  # packed tightly: fewer than one row's worth of padding per row
        assert sum(pads) < batch["input_ids"].shape[0] * seq_len
        assert batch["input_ids"].numel() - sum(pads) == sum(
            len(p[0]) * n for p, n in pieces.items()
        )


def test_split_long_false_keeps_the_first_piece():
    docs = [(list(range(3, 20)), None), ([5, 6], None)]
    batch = PackingCollator(4, split_long=False)([{"input_ids": d} for d, _ in docs])
    pieces, _ = batch_pieces(batch, 4, "flat")
    assert pieces == reference_pieces(docs, 4, split_long=False)


@pytest.mark.parametrize("layout", ["flat", "rows"])
def test_raw_text_becomes_byte_ids(layout):
    texts = ["hello", b"\x00\xff bytes", "héllo wörld " * 5, ""]
    examples = [texts[0], texts[1], {"text": texts[2]}, {"text": texts[3]}]
    batch = PackingCollator(16, layout=layout)(examples)
    raw = [t.encode() if isinstance(t, str) else t for t in texts]
    docs = [([b + 4 for b in r], None) for r in raw]
    pieces, _ = batch_pieces(batch, 16, layout, pad=0)  # the byte scheme's PAD
    assert pieces == reference_pieces(docs, 16, bos=1, eos=2)
    bare = PackingCollator(16, offset=10, add_bos=False, add_eos=False)([texts[0]])
    assert bare["input_ids"].tolist() == [[b + 10 for b in raw[0]]]
    keyed = PackingCollator(16, text_key="content")([{"content": "hi"}])
    assert fg.data.decode_bytes(keyed["input_ids"]) == "hi"


def test_optional_keys():
    collate = PackingCollator(8, return_flash_attn_kwargs=False, use_cache=None)
    batch = collate([[3, 4], (5,), np.array([6, 7], dtype=np.uint8), torch.tensor([8])])
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[3, 4, 6, 7, 5, 8]]


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed")


def tiny_llama(transformers, attn, vocab=VOCAB):
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    config._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).float()


# transformers 5.x (checked on 5.24: masking_utils.find_packed_sequence_indices) finds the
# packed documents from position_ids when no attention_mask and no cache are given, and builds
# the block-diagonal causal mask for sdpa and eager; no explicit 4D mask is passed here. The
# collator's use_cache=False keeps the model from making a cache, which would turn this off.
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["flat", "rows"])
def test_packed_loss_is_the_token_weighted_per_document_loss(transformers, attn, layout):
    model = tiny_llama(transformers, attn).eval()
    rng = random.Random(5)
    docs = [[rng.randrange(3, VOCAB - 1) for _ in range(n)] for n in (9, 17, 4, 12, 1, 7)]
    labels = [list(d) for d in docs]
    labels[1][:6] = [IGNORE] * 6  # a masked prompt
    features = [{"input_ids": d, "labels": y} for d, y in zip(docs, labels, strict=True)]
    eos = 2
    batch = PackingCollator(24, layout=layout, eos_id=eos, pad_id=PAD)(features)
    with torch.no_grad():
        packed = model(**batch).loss
        total, count = torch.zeros((), dtype=torch.float64), 0
        for d, y in zip(docs, labels, strict=True):
            ids = torch.tensor([d + [eos]])
            target = torch.tensor([y + [eos]])
            n = int((target[0, 1:] != IGNORE).sum())
            total += model(input_ids=ids, labels=target).loss.double() * n
            count += n
    torch.testing.assert_close(packed.double(), total / count, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", ["tokens", "text"])
def test_trainer_data_collator(transformers, tmp_path, kind):
    rng = random.Random(2)
    if kind == "tokens":
        data = [
            {"input_ids": [rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 40))]}
            for _ in range(16)
        ]
        model, collate = tiny_llama(transformers, "sdpa"), PackingCollator(32, eos_id=2)
    else:
        data = ["".join(rng.choice("abc \n") for _ in range(rng.randrange(40))) for _ in range(16)]
        model, collate = tiny_llama(transformers, "sdpa", 260), PackingCollator(32, layout="rows")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, data_collator=collate
    )
    result = trainer.train()
    assert result.global_step == 2
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: PackingCollator(0), ValueError, "seq_len must be at least 1"),
        (lambda: PackingCollator(8.0), TypeError, "seq_len must be an int"),
        (lambda: PackingCollator(8, layout="2d"), ValueError, "layout must be one of"),
        (lambda: PackingCollator(8, eos_id=-1), ValueError, "eos_id must be at least 0"),
        (lambda: PackingCollator(8, bos_id=1.0), TypeError, "bos_id must be an int"),
        (lambda: PackingCollator(8, pad_id=None), TypeError, "pad_id must be an int"),
        (lambda: PackingCollator(8, offset=2), ValueError, "offset must be in"),
        (lambda: PackingCollator(8, add_eos=1), TypeError, "add_eos must be a bool"),
        (lambda: PackingCollator(8, split_long="no"), TypeError, "split_long must be a bool"),
        (
            lambda: PackingCollator(8, return_flash_attn_kwargs=None),
            TypeError,
            "return_flash_attn_kwargs must be a bool",
        ),
        (lambda: PackingCollator(8, use_cache=0), TypeError, "use_cache must be a bool"),
        (lambda: PackingCollator(8, text_key=1), TypeError, "text_key must be a str"),
    ],
)
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=f"PackingCollator: {match}"):
        make()


@pytest.mark.parametrize(
    ("features", "error", "match"),
    [
        ("text", TypeError, "features must be a sequence of examples"),
        ({"input_ids": [1]}, TypeError, "features must be a sequence"),
        ([], ValueError, "features is empty"),
        ([{"input_ids": []}, {"input_ids": []}], ValueError, "every example .* is empty"),
        ([{"ids": [1]}], ValueError, "an example has neither 'input_ids' nor 'text'"),
        ([3], TypeError, "an example must be a mapping"),
        ([{"input_ids": [1, 2.5]}], TypeError, "input_ids must hold integers"),
        ([{"input_ids": [True]}], TypeError, "input_ids must hold integers"),
        ([{"input_ids": torch.ones(3)}], TypeError, "input_ids must hold integers"),
        ([{"input_ids": "abc"}], TypeError, "input_ids must be a sequence of ints"),
        ([{"input_ids": [[1, 2], [3]]}], TypeError, "input_ids must be a sequence of ints"),
        ([{"input_ids": [[1, 2], [3, 4]]}], ValueError, "input_ids must be 1-d"),
        ([{"input_ids": [4, -1]}], ValueError, "input_ids of example 0 hold a negative id"),
        ([{"input_ids": [4, 5], "labels": [4]}], ValueError, "labels of example 0 hold 1"),
        ([{"input_ids": [4], "labels": [0.5]}], TypeError, "labels must hold integers"),
        (
            [{"input_ids": [4]}, "text"],
            TypeError,
            "a batch must be all token examples or all raw text",
        ),
        ([{"text": 3}], TypeError, r"example\['text'\] must be str or bytes"),
    ],
)
def test_bad_examples(features, error, match):
    with pytest.raises(error, match=f"PackingCollator: {match}"):
        PackingCollator(8)(features)


def test_exported_from_the_package():
    assert fg.data.PackingCollator is PackingCollator
    assert "PackingCollator" in fg.data.__all__
