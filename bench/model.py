"""Training step of a transformers causal LM: torch baselines vs ferrograd patched in.

One step is forward, backward and optimizer on a model built from a config with random weights
(no network). Every configuration starts from the same weights, trains on the same batches with
the same thread count in this one process, and is timed beside a fresh baseline model, the two
stepped in turn (step i of each, then step i + 1), so drift on a shared machine affects both
alike; its ratio is against the baseline steps of its own pair (``timed_pairs``). It runs
with torch's huge-page allocation (THP_MEM_ALLOC_ENABLE=1, harness.with_huge_pages) unless the
variable is set: without it the baseline's fresh logits page-fault every step.

Configurations: torch float32 + AdamW(fused=True); torch bf16 autocast + AdamW(fused=True) (run
where the CPU has BF16 instructions, or with --bf16 on); each of those through torch.compile;
ferrograd's ``integrations.transformers.apply`` with, cumulatively, the loss only (+ AdamW fused),
+ SPAM, + 8-bit ShiftQuantLinear, 6-bit instead of 8, + L1 norms on the 8-bit one; each inside
the same bf16 autocast as the baseline (the user keeps their setup) and in float32; and the main
one (8-bit + loss + SPAM) through torch.compile. ``x_strongest_torch`` divides a row's ratio to
the baseline beside it by the fastest torch configuration's (``strongest_torch``).

Per configuration: tokens/s from the median step time past the warm-up steps (and from the
fastest step, less exposed to neighbours on a shared machine), the peak RSS growth
over the post-import RSS of a fresh subprocess that builds the model and trains a few steps (a clean
high-water mark per configuration), and the loss at the last step. A torch.profiler run of the main
ferrograd configuration and of the strongest torch one splits the step by op.

    python bench/model.py [--quick] [--vocab 128256] [--steps 200] ...
    python -m ferrograd bench-model [same options]   # from a checkout
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inference  # noqa: E402
from harness import Bench, cpu_has_bf16, with_huge_pages  # noqa: E402

import ferrograd as fg  # noqa: E402
from ferrograd.integrations import transformers as fgt  # noqa: E402

#: Architectures whose configs take the Llama-style size arguments used here.
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "olmoe")


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    label: str
    bf16: bool
    optimizer: str  # "adamw" (torch, fused) or "spam" (fg.optim.SPAM)
    patch: dict | None  # apply()'s options; None: the model as transformers builds it
    compiled: bool = False  # the model through torch.compile (the optimizer step stays eager)


def variants(bf16: bool) -> list[Variant]:
    out = [Variant("torch_fp32", "torch float32 + AdamW fused", False, "adamw", None)]
    if bf16:
        out.append(Variant("torch_bf16", "torch bf16 autocast + AdamW fused", True, "adamw", None))
    # torch.compile'd models: inductor fuses the norms, activations and rotary embeddings that
    # eager runs op by op (Xeon model 207, this Llama in float32: 1255 -> 931 ms a step).
    out += [_compiled(v) for v in out]
    steps = [
        ("loss", "fg loss + AdamW fused", "adamw", {}),
        ("spam", "fg loss + SPAM", "spam", {}),
        ("sq8", "fg loss + SPAM + sq8", "spam", {"shiftquant_bits": 8}),
        # ferrograd's kernels with torch's optimizer: the loss curve then differs from
        # torch_bf16's by the kernels' numerics alone.
        ("sq8_adamw", "fg loss + AdamW fused + sq8", "adamw", {"shiftquant_bits": 8}),
        ("sq6", "fg loss + SPAM + sq6", "spam", {"shiftquant_bits": 6}),
        (
            "sq8_l1",
            "fg loss + SPAM + sq8 + L1 norms",
            "spam",
            {"shiftquant_bits": 8, "l1_norm": True},
        ),
    ]
    for key, label, opt, patch in steps:
        if bf16:
            out.append(Variant(f"fg_{key}_bf16", f"{label} (bf16 autocast)", True, opt, patch))
        out.append(Variant(f"fg_{key}_fp32", f"{label} (float32)", False, opt, patch))
    main = main_variant([v.name for v in out])
    out.append(_compiled(next(v for v in out if v.name == main)))
    return out


def _compiled(v: Variant) -> Variant:
    """``v`` with its model through torch.compile."""
    return dataclasses.replace(
        v, name=f"{v.name}_compiled", label=f"{v.label}, torch.compile", compiled=True
    )


def strongest_torch(speed: dict[str, float]) -> str | None:
    """The torch configuration (eager or compiled, float32 or bf16) fastest by ``speed``
    (tokens/s, or each configuration's ratio to the baseline stepped beside it)."""
    torch_rows = [n for n in speed if n.startswith("torch_")]
    return max(torch_rows, key=speed.__getitem__, default=None)


def main_variant(names: list[str]) -> str:
    """The configuration the issue's goal is about: 8-bit linears + fused loss + SPAM."""
    return "fg_sq8_bf16" if "fg_sq8_bf16" in names else "fg_sq8_fp32"


def baseline(names: list[str]) -> str:
    return "torch_bf16" if "torch_bf16" in names else "torch_fp32"


def build(args, variant: Variant) -> tuple[torch.nn.Module, object]:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        args.arch,
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=args.seq,
        tie_word_embeddings=not args.untied,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)  # the same initial weights for every configuration
    model = AutoModelForCausalLM.from_config(config).train()
    if variant.patch is not None:
        fgt.apply(model, **variant.patch)
    params = list(model.parameters())
    if variant.optimizer == "spam":
        opt = fg.optim.SPAM(params, lr=args.lr)
    else:
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=True)
    if variant.compiled:  # compiles at the first step, inside the warm-up steps
        model = torch.compile(model)
    return model, opt


def batches(args) -> list[torch.Tensor]:
    """Sequences that repeat a random motif: a model can learn them in a few steps (copying),
    so the loss after S steps says something, unlike on uniform noise."""
    g = torch.Generator().manual_seed(args.seed + 1)
    out = []
    for _ in range(args.batches):
        motif = torch.randint(0, args.vocab, (args.batch, args.motif), generator=g)
        reps = -(-args.seq // args.motif)
        out.append(motif.repeat(1, reps)[:, : args.seq].contiguous())
    return out


def stepper(args, variant: Variant, data: list[torch.Tensor]):
    model, opt = build(args, variant)
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if variant.bf16
        else contextlib.nullcontext
    )
    count = 0

    def step() -> float:
        nonlocal count
        ids = data[count % len(data)]
        count += 1
        with autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return model, step


def timed_pairs(args, chosen: list[Variant], ref: str, data: list[torch.Tensor]):
    """Step times, losses and parameter counts of every configuration, each timed beside a fresh
    baseline model (the two stepped in turn, so drift on a shared machine affects both alike)
    and nothing else: with all five configurations alive in one process, torch's bf16 step
    took twice its time alone (900-1750 against 480-550 ms on a 2-vCPU Zen 5 VM, with glibc's
    allocator or jemalloc) while ferrograd's did not change, which doubled the ratio. The
    baseline's row pools its steps of every pair; ``beside[name]`` holds the baseline steps
    timed beside ``name``. Returns (times, beside, losses, params)."""
    times: dict[str, list[float]] = {v.name: [] for v in chosen}
    beside: dict[str, list[float]] = {}
    losses: dict[str, list[float]] = {}
    params: dict[str, int] = {}
    has_ref = any(v.name == ref for v in chosen)
    others = [v for v in chosen if v.name != ref] or list(chosen)
    for other in others:
        pair = [v for v in chosen if v.name == ref and v is not other] + [other]
        steps = {}
        for v in pair:
            model, steps[v.name] = stepper(args, v, data)
            params[v.name] = sum(p.numel() for p in model.parameters())
        pair_times: dict[str, list[float]] = {v.name: [] for v in pair}
        pair_losses: dict[str, list[float]] = {v.name: [] for v in pair}
        for i in range(args.steps):
            for name, step in steps.items():
                start = time.perf_counter()
                pair_losses[name].append(step())
                pair_times[name].append(time.perf_counter() - start)
            print(f"{other.name}: step {i + 1}/{args.steps}", end="\r", flush=True, file=sys.stderr)
        print(file=sys.stderr)
        times[other.name] = pair_times[other.name]
        losses[other.name] = pair_losses[other.name]
        if has_ref and other.name != ref:
            beside[other.name] = pair_times[ref]
            # The baseline's row: the steps past warm-up of every pair (the first pair's curve)
            times[ref] += pair_times[ref] if not times[ref] else pair_times[ref][args.warmup :]
            losses.setdefault(ref, pair_losses[ref])
        del steps, model
    return times, beside, losses, params


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def memory_child(args) -> None:
    """In a fresh process: peak RSS growth (MiB) of building one configuration and training it
    for a few steps, over the RSS after the imports; printed as one JSON line."""
    variant = next(v for v in variants(True) if v.name == args.memory_of)
    data = batches(args)
    torch.set_num_threads(args.threads)
    base = _status_kb("VmRSS")
    _, step = stepper(args, variant, data)
    for _ in range(args.memory_steps):
        step()
    print(json.dumps({"peak_mib": (_status_kb("VmHWM") - base) / 1024}))


def peak_memory(args, name: str) -> float | None:
    """Runs memory_child for ``name`` with the same sizes; None where /proc is unavailable."""
    if not Path("/proc/self/status").exists():
        return None
    cmd = [sys.executable, str(Path(__file__).resolve()), *args.argv, "--memory-of", name]
    cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        print(f"memory run of {name} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


GEMMS = frozenset(
    {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul"}
)


def op_group(name: str) -> str:
    low = name.lower()
    if "optimizer" in low or "adam" in low or "spam" in low:
        return "optimizer"
    # ferrograd::<op> through the dispatcher; ferrograd_<op>_backward (forward) and its
    # BackwardBackward node on the eager fast path (ops/_library.py), whose self time is the kernel
    if name.startswith(("ferrograd", "BackwardBackward")):
        return "ferrograd ops"
    if name in GEMMS:
        return "gemm (aten mm/addmm/bmm)"
    if "softmax" in low or "attention" in low or "sdpa" in low:
        return "softmax/attention"
    return "other"


def profile(step, steps: int, top: int) -> dict:
    """Self CPU time of ``steps`` steps by op: groups (share of the total) and the top ops."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()  # warm
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = defaultdict(float)
    for e in events:
        groups[op_group(e.key)] += e.self_cpu_time_total
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "ms_per_step": total / 1e3 / steps,
        "groups": {
            k: {"ms_per_step": v / 1e3 / steps, "share": v / total}
            for k, v in sorted(groups.items(), key=lambda kv: -kv[1])
        },
        "top_ops": [
            {
                "op": e.key,
                "group": op_group(e.key),
                "ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                "share": e.self_cpu_time_total / total,
                "calls_per_step": e.count / steps,
            }
            for e in events[:top]
        ],
    }


def print_profile(name: str, prof: dict) -> None:
    print(f"-- profile {name}: {prof['ms_per_step']:.1f} ms/step self CPU --")
    for group, g in prof["groups"].items():
        print(f"  {group:28s} {g['ms_per_step']:9.1f} ms  {100 * g['share']:5.1f}%")
    for op in prof["top_ops"]:
        print(f"    {op['op'][:48]:48s} {op['ms_per_step']:9.1f} ms  {100 * op['share']:5.1f}%")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/model.py",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="tiny model, few steps (a smoke run)")
    p.add_argument("--arch", choices=ARCHS, default="llama")
    p.add_argument("--vocab", type=int, default=32000, help="e.g. 128256 (Llama 3)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--untied", action="store_true", help="untied input and output embeddings")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="steps per configuration (e.g. 200)")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    p.add_argument("--batches", type=int, default=8, help="distinct batches, cycled")
    p.add_argument("--motif", type=int, default=32, help="length of the repeated motif")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="default: torch's thread count")
    p.add_argument(
        "--bf16",
        choices=("auto", "on", "off"),
        default="auto",
        help="bf16 autocast rows; auto: where the CPU has BF16 instructions",
    )
    p.add_argument("--only", nargs="*", default=None, help="configuration names to run")
    p.add_argument("--memory-steps", type=int, default=3, help="steps of each memory run")
    p.add_argument("--no-memory", action="store_true", help="skip the peak RSS subprocesses")
    p.add_argument("--profile-steps", type=int, default=3, help="0: no profile")
    p.add_argument("--top", type=int, default=12, help="top ops listed per profile")
    p.add_argument("--name", default="model", help="writes bench/results/<name>.json")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)
    inference.add_arguments(p)
    return p


QUICK = {
    "layers": 2,
    "hidden": 128,
    "heads": 4,
    "intermediate": 384,
    "vocab": 8192,
    "batch": 2,
    "seq": 128,
    "steps": 8,
    "warmup": 2,
    "memory_steps": 2,
    "profile_steps": 2,
    "infer_hidden": 256,
    "infer_intermediate": 512,
    "infer_layers": 2,
    "infer_heads": 4,
    "prefill": 64,
    "decode": 8,
    "infer_repeats": 1,
}


def parse(argv: list[str], threads: int | None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if args.quick:  # quick sizes, unless given explicitly
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
        for key, value in QUICK.items():
            if key not in given:
                setattr(args, key, value)
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")
    if not 0 <= args.warmup < args.steps:
        p.error(f"--warmup must be in 0..--steps-1, got {args.warmup}")
    args.threads = threads or args.threads or torch.get_num_threads()
    args.argv = list(argv)  # memory subprocesses rebuild the same sizes from it
    return args


def main(threads: int | None = None, argv: list[str] | None = None) -> None:
    args = parse(list(argv or []), threads)
    with_huge_pages()
    if args.memory_of:
        memory_child(args)
        return
    bench = Bench(args.name, args.threads)
    has_bf16 = cpu_has_bf16()
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and has_bf16)
    chosen = [v for v in variants(bf16) if args.only is None or v.name in args.only]
    if not chosen:
        raise SystemExit(f"--only matched no configuration of {[v.name for v in variants(bf16)]}")
    data = batches(args)
    tokens = args.batch * args.seq

    names = [v.name for v in chosen]
    by_name = {v.name: v for v in chosen}
    ref = baseline(names)
    times, ref_times, losses, params = timed_pairs(args, chosen, ref, data)
    warm = args.warmup
    tps = {n: tokens / statistics.median(times[n][warm:]) for n in names}
    # The fastest step too: on a shared machine neighbours inflate the median of every row
    best = {n: tokens / min(times[n][warm:]) for n in names}
    # Each configuration against the baseline steps timed beside it
    ratio = {n: statistics.median(ref_times[n][warm:]) / statistics.median(times[n][warm:])
             for n in ref_times}  # fmt: skip
    ratio_best = {n: min(ref_times[n][warm:]) / min(times[n][warm:]) for n in ref_times}
    # The strongest torch configuration by its ratio to the baseline beside it (drift-robust),
    # and every row against it: its own ratio over the strongest's.
    paired = {ref: 1.0, **ratio} if ratio else tps
    strongest = strongest_torch({n: paired[n] for n in names if n in paired})
    # A compiled model's peak RSS would be the compiler's: not measured.
    memory = {
        n: None if args.no_memory or by_name[n].compiled else peak_memory(args, n) for n in names
    }

    def against_ref(n: str, own: dict, rates: dict):
        """n's ratio to the baseline beside it, its own rate's where n is the baseline, "-"
        where --only left the baseline out."""
        return own.get(n, rates[n] / rates[ref] if ref in rates else "-")

    for v in chosen:
        bench.add(
            {
                "config": v.name,
                "tokens_per_s": tps[v.name],
                f"x_{ref}": against_ref(v.name, ratio, tps),
                "best_tokens_per_s": best[v.name],
                "x_best": against_ref(v.name, ratio_best, best),
                "x_strongest_torch": paired[v.name] / paired[strongest]
                if strongest and v.name in paired
                else "-",
                "peak_rss_mib": memory[v.name] if memory[v.name] is not None else "-",
                f"loss@{args.steps}": losses[v.name][-1],
            }
        )
    for row, v in zip(bench.rows, chosen, strict=True):
        row.update(
            label=v.label,
            params=params[v.name],
            loss_curve=losses[v.name],
            step_ms=[round(1e3 * t, 2) for t in times[v.name]],
        )

    profiles = {}
    if args.profile_steps:
        for name in dict.fromkeys((main_variant(names), strongest or ref)):
            if name in by_name:
                profiles[name] = profile(stepper(args, by_name[name], data)[1],
                                         args.profile_steps, args.top)  # fmt: skip
                print_profile(name, profiles[name])

    inference_rows = None
    if not args.no_inference:
        inference_rows = {
            "model": {k: getattr(args, k) for k in ("infer_hidden", "infer_intermediate",
                      "infer_layers", "infer_heads", "prefill", "decode", "infer_repeats")},
            "rows": inference.rows(args),
        }  # fmt: skip
        for row in inference_rows["rows"]:
            print(
                f"{row['version']:12s} decode {row['decode_tok_s']:8.1f} tok/s "
                f"({row['decode_tok_s_x_bf16']:.2f}x bf16, {row['decode_tok_s_x_int4']:.2f}x "
                f"int4)  prefill {row['prefill_tok_s']:8.1f} tok/s "
                f"({row['prefill_tok_s_x_bf16']:.2f}x bf16, {row['prefill_tok_s_x_int4']:.2f}x "
                f"int4)  weights {row['weight_MiB']:.0f} MiB"
            )

    sizes = {
        k: getattr(args, k)
        for k in (
            "arch",
            "vocab",
            "layers",
            "hidden",
            "heads",
            "intermediate",
            "batch",
            "seq",
            "steps",
            "warmup",
            "batches",
            "motif",
            "lr",
            "seed",
        )
    }
    bench.save(
        {
            "model": {
                **sizes,
                "tied_embeddings": not args.untied,
                "params": params[names[0]],
                "tokens_per_step": tokens,
            },
            "bf16": {
                "cpu_has_bf16": has_bf16,
                "rows": bf16,
                "mkldnn_bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
            },
            "cpu_info": fg.cpu_info(),
            "command": " ".join(["bench/model.py", *args.argv]),
            "baseline": ref,
            "strongest_torch": strongest,
            "main_variant": main_variant(names),
            "timing": f"median of steps {args.warmup + 1}..{args.steps}; each configuration "
            "stepped in turn with a fresh baseline model, its ratios against that pair's baseline "
            "steps",
            "peak_rss": f"VmHWM growth over the post-import VmRSS of a subprocess that builds the "
            f"model and trains {args.memory_steps} steps",
            "profile": profiles,
            "inference": inference_rows,
        }
    )


if __name__ == "__main__":
    main(argv=sys.argv[1:])
