"""Inference rows of bench/model.py: a transformers causal LM with 4-bit weights, decode at
batch 1 and prefill, all in bf16 activations.

Three versions of one model (random weights from a config), every nn.Linear (the head too)
replaced alike:
- ``bf16``: the model in bfloat16 (torch's oneDNN GEMMs).
- ``torch int4``: torch's int4 CPU kernel, ``aten._weight_int4pack_mm_for_cpu`` (what
  torchao's int4 CPU layout and inductor's weight-only int4 lowering call), group 128, scales
  and float zero points in bf16.
- ``fg W4A16``: ``fg.quant.smoothquant_plus`` (alpha fixed, one calibration batch: this row
  measures speed; bench/w4a16.py measures fidelity), then the model in bfloat16.
- ``fg ShiftQuant8``: ``fg.nn.quantize_model`` (8-bit codes, group 64, the norms kept): a model
  trained with ShiftQuantLinear, evaluated as it is; each weight quantized and packed at its
  first call without gradients, then read as int8 codes.

Decode: tokens/s of single-token steps with the KV cache after a prompt; prefill: tokens/s of
one forward over ``prefill`` tokens. Versions run in turn within each repeat, so drift on a
shared machine affects all alike.
"""

from __future__ import annotations

import inspect
import statistics
import time

import torch
from torch import nn

import ferrograd as fg

GROUP = 128


def int4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's int4 weight-only scheme (CPU and CUDA kernels alike) for w [N, K]: asymmetric
    4-bit codes per group of GROUP inputs, as (codes int32 [N, K], scales_and_zeros bf16
    [K / GROUP, N, 2])."""
    n, k = w.shape
    groups = w.float().view(n, k // GROUP, GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-8)
    codes = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).view(n, k)
    zero = low + 8 * scale  # the kernels compute (code - 8) * scale + zero
    pairs = torch.stack([scale.view(n, -1).T, zero.view(n, -1).T], -1)
    return codes, pairs.to(torch.bfloat16).contiguous()


class Int4Linear(nn.Module):
    """torch's int4 CPU weight-only linear: asymmetric 4-bit codes per group of 128 inputs."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        codes, self.scales_and_zeros = int4_quantize(linear.weight.detach())
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.bias = None if linear.bias is None else linear.bias.detach().bfloat16()
        self.out_features = codes.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.packed, GROUP, self.scales_and_zeros
        )
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def _swap_linears(model: nn.Module, make) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make(module))


def build(args, version: str) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        args.arch,
        vocab_size=args.vocab,
        hidden_size=args.infer_hidden,
        intermediate_size=args.infer_intermediate,
        num_hidden_layers=args.infer_layers,
        num_attention_heads=args.infer_heads,
        num_key_value_heads=args.infer_heads,
        head_dim=args.infer_hidden // args.infer_heads,
        max_position_embeddings=args.prefill + args.decode + 1,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    if version == "torch int4":
        _swap_linears(model, Int4Linear)
    elif version == "fg W4A16":
        calibration = [torch.randint(0, args.vocab, (1, 64), generator=_gen(args))]
        with torch.no_grad():
            fg.quant.smoothquant_plus(model, calibration, group_size=GROUP, alpha=0.5)
    elif version == "fg ShiftQuant8":
        fg.nn.quantize_model(model, norms=False)
    return model.to(torch.bfloat16)


def _gen(args) -> torch.Generator:
    return torch.Generator().manual_seed(args.seed + 2)


@torch.inference_mode()
def _prefill(model: nn.Module, prompt: torch.Tensor):
    return model(input_ids=prompt, use_cache=True)


def _cache_name(model: nn.Module) -> str:
    """The KV cache's argument and output name: ``cache`` from transformers 5.2x, before that
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def _decode(model: nn.Module, out, steps: int) -> None:
    name = _cache_name(model)
    cache, token = getattr(out, name), out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = model(input_ids=token, use_cache=True, **{name: cache})
        cache, token = getattr(out, name), out.logits[:, -1:].argmax(-1)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the linear weights one decode step reads."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif isinstance(module, Int4Linear):
            total += module.packed.numel() + module.scales_and_zeros.numel() * 2
        elif isinstance(module, fg.nn.W4A16Linear):
            total += sum(t.numel() * t.element_size() for t in (module.packed, module.scales))
            total += module.zeros.numel() * module.zeros.element_size()
        elif isinstance(module, fg.nn.ShiftQuantLinear) and module._codes is not None:
            total += module._codes.forward[3].numel()  # the packed codes the GEMM reads
    return total


def rows(args) -> list[dict]:
    """One row per version: decode and prefill tokens/s (medians over ``args.infer_repeats``),
    the weight bytes a decode step reads and the ratios to bf16 and to torch's int4 kernel."""
    versions = ("bf16", "torch int4", "fg W4A16", "fg ShiftQuant8")
    models = {v: build(args, v) for v in versions}
    prompt = torch.randint(0, args.vocab, (1, args.prefill), generator=_gen(args))
    decode: dict[str, list[float]] = {v: [] for v in versions}
    prefill: dict[str, list[float]] = {v: [] for v in versions}
    for _ in range(args.infer_repeats + 1):  # the first round warms up
        for v, model in models.items():
            start = time.perf_counter()
            out = _prefill(model, prompt)
            prefill[v].append(time.perf_counter() - start)
            start = time.perf_counter()
            _decode(model, out, args.decode)
            decode[v].append(time.perf_counter() - start)
    result = []
    for v in versions:
        dec = args.decode / statistics.median(decode[v][1:])
        pre = args.prefill / statistics.median(prefill[v][1:])
        result.append({"version": v, "decode_tok_s": dec, "prefill_tok_s": pre,
                       "weight_MiB": weight_bytes(models[v]) / 2**20})  # fmt: skip
    base, int4 = result[0], result[1]
    for row in result:
        for key in ("decode_tok_s", "prefill_tok_s"):
            row[f"{key}_x_bf16"] = row[key] / base[key]
            row[f"{key}_x_int4"] = row[key] / int4[key]
    return result


def add_arguments(p) -> None:
    p.add_argument("--no-inference", action="store_true", help="skip the W4A16 inference rows")
    p.add_argument("--infer-hidden", type=int, default=2048, help="inference model width")
    p.add_argument("--infer-intermediate", type=int, default=5632)
    p.add_argument("--infer-layers", type=int, default=4)
    p.add_argument("--infer-heads", type=int, default=16)
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens (prefill row)")
    p.add_argument("--decode", type=int, default=32, help="decode steps per measurement")
    p.add_argument("--infer-repeats", type=int, default=3)
