"""ferrograd.integrations.transformers.apply on tiny random models of every supported
architecture (built from configs, no downloads): the patched loss and gradients against the
model's own, generate(), the module swaps, torch.compile and transformers' Trainer."""

from __future__ import annotations

import contextlib
import copy
import importlib

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (make test installs it)"
)

import ferrograd as fg  # noqa: E402
from ferrograd.integrations import transformers as fgt  # noqa: E402
from ferrograd.ops.shiftquant import shiftquant_linear  # noqa: E402

VOCAB = 300
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
}
ROPE = {"rope_type": "default", "rope_theta": 10000.0}
MOE = {
    "num_local_experts": 4,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "output_router_logits": True,
    "router_aux_loss_coef": 0.1,
}
CONFIGS = {
    "LlamaForCausalLM": ("LlamaConfig", {"tie_word_embeddings": False}),
    "MistralForCausalLM": ("MistralConfig", {}),
    "Qwen2ForCausalLM": ("Qwen2Config", {}),
    "Qwen3ForCausalLM": ("Qwen3Config", {"head_dim": 16}),
    "GemmaForCausalLM": ("GemmaConfig", {"head_dim": 16}),
    "Gemma2ForCausalLM": ("Gemma2Config", {"head_dim": 16, "final_logit_softcapping": 2.0}),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", {"head_dim": 16, "final_logit_softcapping": 2.0}),
    "PhiForCausalLM": ("PhiConfig", {}),
    "Phi3ForCausalLM": ("Phi3Config", {}),
    "Olmo2ForCausalLM": ("Olmo2Config", {}),
    # Forwards the same as Llama's up to the names (the configs made valid for tiny sizes and,
    # where the default has dropout, deterministic).
    "ApertusForCausalLM": ("ApertusConfig", {}),
    "ArceeForCausalLM": ("ArceeConfig", {}),
    "BitNetForCausalLM": ("BitNetConfig", {}),
    "CwmForCausalLM": ("CwmConfig", {}),
    "DiffLlamaForCausalLM": ("DiffLlamaConfig", {}),
    "Ernie4_5ForCausalLM": ("Ernie4_5Config", {}),
    "Exaone4ForCausalLM": ("Exaone4Config", {}),
    "Glm4ForCausalLM": ("Glm4Config", {}),
    "GlmForCausalLM": ("GlmConfig", {}),
    "HeliumForCausalLM": ("HeliumConfig", {"head_dim": 16}),
    "HunYuanDenseV1ForCausalLM": (
        "HunYuanDenseV1Config",
        {"head_dim": 16, "rope_parameters": ROPE},
    ),
    "Jais2ForCausalLM": ("Jais2Config", {}),
    "Lfm2ForCausalLM": ("Lfm2Config", {}),
    "Ministral3ForCausalLM": ("Ministral3Config", {}),
    "MinistralForCausalLM": ("MinistralConfig", {"head_dim": 16, "rope_parameters": ROPE}),
    "NemotronForCausalLM": ("NemotronConfig", {}),
    "Olmo3ForCausalLM": ("Olmo3Config", {}),
    "OlmoForCausalLM": ("OlmoConfig", {}),
    "PersimmonForCausalLM": ("PersimmonConfig", {}),
    "SeedOssForCausalLM": ("SeedOssConfig", {"residual_dropout": 0.0, "attention_dropout": 0.0}),
    "SmolLM3ForCausalLM": ("SmolLM3Config", {}),
    "StableLmForCausalLM": ("StableLmConfig", {}),
    "Starcoder2ForCausalLM": ("Starcoder2Config", {}),
    # Logits scaled by a constant: Cohere's logit_scale (1/16 by default), Granite's division
    # by logits_scaling (3, not a power of two: the scaled hidden states round differently).
    "CohereForCausalLM": ("CohereConfig", {}),
    "Cohere2ForCausalLM": ("Cohere2Config", {"head_dim": 16}),
    "GraniteForCausalLM": ("GraniteConfig", {"logits_scaling": 3.0}),
    # Mixtral's forward: the router's load-balancing loss added (weighted 0.1, so that it
    # shows in the comparison).
    **{
        arch: (arch.replace("ForCausalLM", "Config"), {**MOE, **extra})
        for arch, extra in {
            "Ernie4_5_MoeForCausalLM": {},
            "FlexOlmoForCausalLM": {},
            "GptOssForCausalLM": {},
            "JambaForCausalLM": {"attn_layer_offset": 0, "attn_layer_period": 1},
            "MiniMaxForCausalLM": {},
            "MiniMaxM2ForCausalLM": {},
            "MixtralForCausalLM": {},
            "OlmoeForCausalLM": {},
            "PhimoeForCausalLM": {"router_jitter_noise": 0.0, "input_jitter_noise": 0.0},
            "Qwen2MoeForCausalLM": {},
            "Qwen3MoeForCausalLM": {},
            "Qwen3NextForCausalLM": {"layer_types": ["full_attention"] * 2, "head_dim": 16},
        }.items()
    },
    "Qwen3_5MoeForCausalLM": (
        "Qwen3_5MoeTextConfig",
        {**MOE, "layer_types": ["full_attention"] * 2, "head_dim": 16},
    ),
    "GPT2LMHeadModel": (
        "GPT2Config",
        {
            **{"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64, "vocab_size": VOCAB},
            **{"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},  # exact comparisons
            **{"bos_token_id": 1, "eos_token_id": 2},
        },
    ),
}


def build(arch: str, seed: int = 0, **overrides):
    config_name, extra = CONFIGS[arch]
    if not hasattr(transformers, arch):  # an architecture newer than this transformers
        pytest.skip(f"{arch} is not in transformers {transformers.__version__}")
    kw = extra if arch == "GPT2LMHeadModel" else {**COMMON, **extra}
    kw = {**kw, **overrides}
    config = getattr(transformers, config_name)(**kw)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).float()
    with torch.no_grad():  # Gemma's norms start at 0 (scale 1 + weight): make them matter
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.add_(torch.rand_like(p) * 0.2)
    return model


def batch(seed: int = 1, rows: int = 2, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, length), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[-1, -2:] = -100
    return ids, labels


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(ours, theirs, want, got):
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=0)
    g_ours, g_theirs = grads(ours), grads(theirs)
    assert g_ours.keys() == g_theirs.keys()
    for name, g in g_theirs.items():
        if g.norm() > 0:
            cos = torch.nn.functional.cosine_similarity(g_ours[name].flatten(), g.flatten(), 0)
            assert cos >= 0.9999, (name, cos.item())


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_patched_loss_and_gradients_equal_the_models_own(arch):
    model = build(arch)
    patched = fgt.apply(copy.deepcopy(model))
    ids, labels = batch()
    want = model(input_ids=ids, labels=labels)
    got = patched(input_ids=ids, labels=labels)
    assert got.logits is None and want.logits is not None
    want.loss.backward()
    got.loss.backward()
    assert_same_loss_and_grads(patched, model, want, got)
    if "aux_loss" in want:  # mixture of experts: the router's loss, inside .loss too
        assert want.aux_loss is not None
        torch.testing.assert_close(got.aux_loss, want.aux_loss)
    with torch.no_grad():  # without labels: the model's own logits, and generate() works
        torch.testing.assert_close(patched(input_ids=ids).logits, model(input_ids=ids).logits)
        kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(patched.generate(ids[:1], **kw), model.generate(ids[:1], **kw))


def test_num_items_in_batch_logits_to_keep_and_return_logits():
    model = build("Gemma2ForCausalLM")  # softcapped and tied
    patched = fgt.apply(copy.deepcopy(model))
    ids, labels = batch(rows=3)
    n = torch.tensor(11)
    want = model(input_ids=ids, labels=labels, num_items_in_batch=n)
    got = patched(input_ids=ids, labels=labels, num_items_in_batch=n)
    want.loss.backward()
    got.loss.backward()
    assert_same_loss_and_grads(patched, model, want, got)
    # the last k positions with their k labels, the logits on request
    want = model(input_ids=ids, labels=labels[:, -5:].contiguous(), logits_to_keep=5)
    got = patched(input_ids=ids, labels=labels[:, -5:], logits_to_keep=5, return_logits=True)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(got.logits, want.logits)
    # pre-shifted labels (transformers' shift_labels) and tuple outputs
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    want = model(input_ids=ids, labels=labels, shift_labels=shifted, return_dict=False)
    got = patched(input_ids=ids, labels=labels, shift_labels=shifted, return_dict=False)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=0)


@pytest.mark.parametrize("arch", ["CohereForCausalLM", "GraniteForCausalLM"])
def test_logit_scaling_with_a_biased_head(arch):
    """The scaling reaches the head's bias too (c (h W^T + b)), and the logits asked for."""
    model = build(arch)
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.copy_(torch.randn(head.out_features))
    model.lm_head = biased
    patched = fgt.apply(copy.deepcopy(model))
    ids, labels = batch()
    want = model(input_ids=ids, labels=labels)
    got = patched(input_ids=ids, labels=labels, return_logits=True)
    want.loss.backward()
    got.loss.backward()
    assert_same_loss_and_grads(patched, model, want, got)
    torch.testing.assert_close(got.logits, want.logits)


def test_ignored_labels_contribute_nothing():
    patched = fgt.apply(build("LlamaForCausalLM"))
    ids, labels = batch()
    base = patched(ids, labels=labels).loss  # input_ids positional
    relabeled = labels.clone()
    relabeled[:, 0] = 5  # position 0 is never a target after the shift
    torch.testing.assert_close(patched(input_ids=ids, labels=relabeled).loss, base)
    # nothing to predict: 0 with zero gradients (transformers' own loss is NaN there)
    loss = patched(input_ids=ids, labels=torch.full_like(labels, -100)).loss
    loss.backward()
    assert loss.item() == 0.0
    assert all(g.abs().max() == 0 for g in grads(patched).values())


def test_bad_labels():
    patched = fgt.apply(build("LlamaForCausalLM"))
    ids, labels = batch()
    with pytest.raises(ValueError, match="labels"):
        patched(input_ids=ids, labels=labels[:, :-1])
    with pytest.raises(TypeError, match="labels"):
        patched(input_ids=ids, labels=labels.float())


def test_bf16_autocast_and_gradient_checkpointing():
    model = build("LlamaForCausalLM")
    patched = fgt.apply(copy.deepcopy(model), shiftquant_bits=8)
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=ids, labels=labels).loss
        got = patched(input_ids=ids, labels=labels).loss
    got.backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=0)
    patched = fgt.apply(copy.deepcopy(model))
    for m in (model, patched):
        enable = getattr(m, "activation_checkpointing_enable", None)
        (enable or m.gradient_checkpointing_enable)()
        m.zero_grad(set_to_none=True)
    want = model(input_ids=ids, labels=labels)
    got = patched(input_ids=ids, labels=labels)
    want.loss.backward()
    got.loss.backward()
    assert_same_loss_and_grads(patched, model, want, got)


def train(model, ids, labels, steps=8, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_shiftquant_swaps_the_decoder_linears_and_trains(arch):
    from transformers.pytorch_utils import Conv1D

    model = build(arch)
    ids, labels = batch()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    # (exactly nn.Linear: a subclass, as Phi-MoE's router, keeps its own forward)
    n_linear = sum(type(m) in (torch.nn.Linear, Conv1D) for m in model.base_model.modules())
    params = dict(model.named_parameters())
    conv1d = any(isinstance(m, Conv1D) for m in model.modules())
    fgt.apply(model, shiftquant_bits=8, grad_bits=6)
    # nn.Linear layers are swapped with their own Parameters (GPT-2's Conv1D: transposed copies)
    if not conv1d:
        after = dict(model.named_parameters())
        assert after.keys() == params.keys() and all(after[k] is params[k] for k in params)
    swapped = [m for m in model.base_model.modules() if isinstance(m, fg.nn.ShiftQuantLinear)]
    # Kept: a router that transformers records as an nn.Linear (Jamba's up to transformers 5.20)
    kept = [
        name for name, m in model.base_model.named_modules() if type(m) in (torch.nn.Linear, Conv1D)
    ]
    assert all(name.endswith(".router") for name in kept), kept
    assert len(swapped) == n_linear - len(kept) > 0
    assert all(m.bits == 8 and m.grad_bits == 6 for m in swapped)
    assert type(model.get_output_embeddings()) is torch.nn.Linear  # the head stays
    with torch.no_grad():  # 8-bit codes: close to the float model
        got = model(input_ids=ids).logits
    if CONFIGS[arch][1].get("num_experts_per_tok") is None:  # (a router may pick other experts)
        assert (got - want).abs().max() < 0.1 * want.abs().max()
    losses = train(model, ids, labels)
    assert losses[-1] < losses[0]


def test_a_class_whose_prefix_names_no_submodule_is_patched_below_its_head(monkeypatch):
    """transformers 4.57's Gemma3ForCausalLM names its base model ``language_model`` and holds
    it as ``model``, so ``base_model`` is the causal LM itself: the head was swapped with the
    decoder's linears, and the loss read the hidden states from the causal LM's output."""
    monkeypatch.setattr(transformers.LlamaForCausalLM, "base_model_prefix", "language_model")
    model = build("LlamaForCausalLM")
    assert model.base_model is model
    ids, labels = batch()
    want = model(input_ids=ids, labels=labels).loss
    patched = fgt.apply(copy.deepcopy(model), shiftquant_bits=8)
    assert type(patched.lm_head) is torch.nn.Linear
    assert isinstance(patched.model.layers[0].mlp.up_proj, fg.nn.ShiftQuantLinear)
    got = fgt.apply(copy.deepcopy(model))(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(got, want)
    assert patched(input_ids=ids, labels=labels).loss.isfinite()


def test_modules_transformers_records_by_class_stay_and_are_still_recorded(monkeypatch):
    """A module whose output transformers records by its class (here Llama's o_proj, recorded
    as an nn.Linear in place of the attention weights; Jamba's router in transformers 5.20) is
    not swapped: swapped, it went unrecorded (the hooks stay on the old module, the class no
    longer matches). Its output is recorded before and after apply, every other linear is
    swapped."""
    recorder = None  # in transformers.utils.output_capturing, earlier in .generic, or none
    for where in ("output_capturing", "generic"):
        with contextlib.suppress(ImportError):
            module = importlib.import_module(f"transformers.utils.{where}")
            recorder = recorder or getattr(module, "OutputRecorder", None)
    if recorder is None:
        pytest.skip(f"transformers {transformers.__version__} records no outputs by class")
    recorders = dict(transformers.LlamaPreTrainedModel._can_record_outputs or {})
    recorders["attentions"] = recorder(torch.nn.Linear, index=0, layer_name="o_proj")
    monkeypatch.setattr(transformers.LlamaPreTrainedModel, "_can_record_outputs", recorders)
    model = build("LlamaForCausalLM")
    ids, _ = batch()
    layers = model.config.num_hidden_layers
    with torch.no_grad():  # the first forward installs the recording hooks
        want = model(input_ids=ids, output_attentions=True).attentions
    assert len(want) == layers
    fgt.apply(model, shiftquant_bits=8)
    kept = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert sorted(kept) == sorted(
        [f"model.layers.{i}.self_attn.o_proj" for i in range(layers)] + ["lm_head"]
    )
    with torch.no_grad():
        got = model(input_ids=ids, output_attentions=True).attentions
    assert len(got) == layers
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and (g - w).abs().max() < 0.1 * w.abs().max()


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "Qwen3MoeForCausalLM", "GptOssForCausalLM"])
def test_shiftquant_experts_route_each_token_through_its_experts(arch):
    """The experts' ShiftQuant loop against a token-by-token sum over the top-k slots, each
    slot's expert applied to that one token (the codes are per row: the same products), and
    training reaches the experts' 3-D weights."""
    model = build(arch)
    fgt.apply(model, shiftquant_bits=8)
    experts = [m for m in model.modules() if hasattr(m, "_ferrograd_shiftquant")]
    assert len(experts) == model.config.num_hidden_layers
    e = experts[0]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, model.config.hidden_size, generator=g)
    k = model.config.num_experts_per_tok
    index = torch.stack([torch.randperm(e.num_experts, generator=g)[:k] for _ in range(9)])
    weights = torch.rand(9, k, generator=g)
    with torch.no_grad():  # GPT-OSS's biases start at 0: make them matter
        for name in ("gate_up_proj_bias", "down_proj_bias"):
            if hasattr(e, name):
                getattr(e, name).normal_(generator=g)

    def project(x, name, i):  # GPT-OSS keeps [in, out] weights and biases
        w = getattr(e, name)[i].detach()
        b = getattr(e, f"{name}_bias")[i].detach() if e.has_bias else None
        return shiftquant_linear(x, w.t() if e.is_transposed else w, b, bits=8)

    want = torch.zeros_like(x)
    for t in range(9):
        for slot in range(k):
            i = int(index[t, slot])
            y = project(e._apply_gate(project(x[t : t + 1], "gate_up_proj", i)), "down_proj", i)
            want[t] += weights[t, slot] * y[0]
    with torch.no_grad():
        got = e(x, index, weights)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    ids, labels = batch()
    losses = train(model, ids, labels)
    assert losses[-1] < losses[0]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (e.gate_up_proj, e.down_proj))


@pytest.mark.parametrize(
    "arch", ["Gemma3ForCausalLM", "GPT2LMHeadModel", "Qwen3NextForCausalLM", "LlamaForCausalLM"]
)
def test_l1_norm_swaps_the_norms_and_trains(arch):
    model = build(arch)
    norms = {
        n: m
        for n, m in model.base_model.named_modules()
        if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")
    }
    fgt.apply(model, l1_norm=True)
    modules = dict(model.base_model.named_modules())
    want = fg.nn.L1LayerNorm if arch == "GPT2LMHeadModel" else fg.nn.L1RMSNorm
    assert norms and all(type(modules[n]) is want for n in norms)
    if arch in ("Gemma3ForCausalLM", "Qwen3NextForCausalLM"):  # they scale by 1 + weight
        for n, m in norms.items():
            torch.testing.assert_close(modules[n].weight, m.weight + 1)
    else:  # the norms' own Parameters, not copies
        assert all(modules[n].weight is m.weight for n, m in norms.items())
    ids, labels = batch()
    losses = train(model, ids, labels)
    assert losses[-1] < losses[0]


def test_unsupported_class_and_bad_options():
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    with pytest.raises(TypeError, match="BertForMaskedLM"):
        fgt.apply(transformers.BertForMaskedLM(config))
    with pytest.raises(TypeError, match="Linear"):
        fgt.apply(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="shiftquant_bits"):
        fgt.apply(build("LlamaForCausalLM"), shiftquant_bits=9)
    with pytest.raises(ValueError, match="grad_bits"):
        fgt.apply(build("LlamaForCausalLM"), grad_bits=8)
    with pytest.raises(ValueError, match="group_size"):
        fgt.apply(build("LlamaForCausalLM"), group_size=32)


def test_a_deepcopy_runs_its_own_weights():
    model = fgt.apply(build("LlamaForCausalLM"))
    ids, labels = batch()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.get_output_embeddings().weight.mul_(2)
    assert twin(input_ids=ids, labels=labels).loss != model(input_ids=ids, labels=labels).loss


def test_apply_twice_is_a_no_op_or_an_error():
    model = fgt.apply(build("LlamaForCausalLM"), shiftquant_bits=8)
    forward = model.forward
    assert fgt.apply(model, shiftquant_bits=8) is model and model.forward is forward
    n = sum(isinstance(m, fg.nn.ShiftQuantLinear) for m in model.modules())
    with pytest.raises(ValueError, match="already patched"):
        fgt.apply(model, shiftquant_bits=6)
    assert sum(isinstance(m, fg.nn.ShiftQuantLinear) for m in model.modules()) == n


@pytest.mark.parametrize(
    "options, tied",
    [({}, False), ({}, True), ({"shiftquant_bits": 8, "l1_norm": True}, False)],
)
def test_compiled_patched_model_equals_eager(options, tied):
    model = fgt.apply(build("LlamaForCausalLM", tie_word_embeddings=tied), **options)
    ids, labels = batch()

    def run(m):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the gradients' stochastic rounding draws its seed
        loss = m(input_ids=ids, labels=labels).loss
        loss.backward()
        return loss.detach(), grads(model)

    torch._dynamo.reset()
    want = run(model)
    with torch._inductor.config.patch(fallback_random=True):  # eager's generator draws
        got = run(torch.compile(model, fullgraph=True))
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for name, g in want[1].items():
        torch.testing.assert_close(got[1][name], g, rtol=1e-4, atol=1e-6)


def test_tied_head_hands_its_gradient_to_the_embedding():
    """A tied head and embedding: the embedding's backward adds its rows into the head's
    gradient; float64 gradients equal those of the same patched model without the hand-off
    (the rows summed in another order), over a retained graph's two passes, the padding id,
    and inputs_embeds (no embedding call: the head's gradient flows on as usual)."""
    patched = fgt.apply(build("LlamaForCausalLM", tie_word_embeddings=True).double())
    model = copy.deepcopy(patched)
    del model.get_input_embeddings().forward  # torch's embedding: two gradient buffers
    assert patched.get_input_embeddings().weight is patched.get_output_embeddings().weight
    ids, labels = batch()
    ids[1, 3] = 0  # the padding id: its row gets no gradient from the embedding
    handed = []
    head_backward = fgt._tied.HeadHandOff.backward

    def spy(ctx, grad):
        handed.append(grad.data_ptr())
        return head_backward(ctx, grad)

    fgt._tied.HeadHandOff.backward = staticmethod(spy)
    try:
        for retain in (True, False):  # the second pass adds the same again
            want = model(input_ids=ids, labels=labels).loss
            got = patched(input_ids=ids, labels=labels).loss
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
            want.backward()
            got.backward(retain_graph=retain)
            if retain:
                got.backward()
                want = model(input_ids=ids, labels=labels).loss
                want.backward()
    finally:
        fgt._tied.HeadHandOff.backward = head_backward
    assert len(handed) == 3
    emb = patched.get_input_embeddings().weight
    for name, g in grads(model).items():
        torch.testing.assert_close(grads(patched)[name], g, rtol=1e-10, atol=1e-13)
    assert emb.grad[0].abs().sum() > 0  # the head's gradient of the padding row stays
    # inputs_embeds: the embedding is not called, the head's gradient flows on as usual.
    for m in (model, patched):
        m.zero_grad(set_to_none=True)
        embeds = m.get_input_embeddings()(ids)
        m(inputs_embeds=embeds, labels=labels).loss.backward()
    torch.testing.assert_close(emb.grad, model.get_input_embeddings().weight.grad)


def test_tied_gradient_in_either_order_of_the_backward_nodes():
    """The hand-off where the head's backward runs first (the usual order: the embedding's
    backward returns the handed gradient, one buffer) and where the embedding's runs first
    (the head's gradient then flows on as usual); both against the gradient written out."""
    from ferrograd.integrations._tied import EmbeddingRows, HeadHandOff, Pairing

    weight = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[1, 3, 3, 0], [7, 1, 10, 2]])
    flat = ids.reshape(-1)
    probe = torch.randn(8, 11, dtype=torch.float64)
    w = weight.detach()
    e, keep = w[flat], (flat != 0).double().unsqueeze(1)  # padding id 0: no embedding gradient
    want = torch.zeros_like(w).index_add_(0, flat, (2 * e + probe @ w) * keep) + probe.T @ e
    for head_first in (True, False):
        weight.grad, pairing = None, Pairing()
        # The engine runs the later-created of two ready nodes first.
        if head_first:
            rows = EmbeddingRows.apply(ids, weight, 0, pairing).reshape(8, 4)
            head = HeadHandOff.apply(weight, pairing)
        else:
            head = HeadHandOff.apply(weight, pairing)
            rows = EmbeddingRows.apply(ids, weight, 0, pairing).reshape(8, 4)
        ((rows @ head.T) * probe).sum().add((rows**2).sum()).backward()
        assert (pairing.handoffs, pairing.embeddings, pairing.grad) == (1, 1, None)
        torch.testing.assert_close(weight.grad, want)


def test_trainer_with_spam(tmp_path):
    model = fgt.apply(build("Qwen3ForCausalLM"), shiftquant_bits=8)
    rows = [
        dict(zip(("input_ids", "labels"), batch(seed=s, rows=1), strict=True)) for s in range(8)
    ]
    data = [{k: v[0] for k, v in r.items()} for r in rows]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    opt = fg.optim.SPAM(model.parameters(), lr=1e-3, warmup_steps=1)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, optimizers=(opt, None)
    )
    result = trainer.train()
    assert result.global_step == 3
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
