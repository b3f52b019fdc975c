"""``python -m ferrograd demo``: trains a byte-level language model with every primitive.

Data: byte documents through ``fg.data.ByteStream`` (packing, per-document positions), by
default the Python standard library's own ``.py`` files; every 20th file is held out.
Model: a small decoder-only Transformer whose attention stays inside each packed document
(``fg.data.document_mask``), linears as ``fg.nn.ShiftQuantLinear`` (``--bits``), norms as
``fg.nn.L1LayerNorm``, the tied output head's loss through ``fg.linear_cross_entropy``,
optimizer ``fg.optim.SPAM`` (``--density``). Attention is torch's fused
``F.scaled_dot_product_attention`` in both runs: a user's model calls it, and no stand-alone
softmax competes with it (an explicit scores-softmax-matmul attention took 27 ms a block
forward and backward with ``fg.softmax``, 31 with torch.softmax, against 14.5). The sample's
next-byte distribution goes through ``fg.softmax``.
Then SmoothQuant+ W4A16 post-training quantization (``fg.quant.smoothquant_plus``), and a
sample. ``--compare`` trains the strongest plain-torch configuration on the same batches:
nn.Linear / nn.LayerNorm / F.cross_entropy with AdamW(fused=True), under bf16
autocast where this CPU multiplies bf16 natively and faster than float32 (or on a GPU), in
float32 elsewhere; the
ferrograd run uses the same autocast setting, as a user keeping their setup would. Both report
bytes per second, peak memory and validation bits per byte side by side, and loss.png plots
both curves. Bits per byte are the loss in bits per predicted token (a byte, or a document's
end).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import json
import math
import os
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import ferrograd as fg
from ferrograd.ops._matmul import bf16_matmul_is_faster

VOCAB = 260  # bytes + 4 specials (docs/definitions.md, byte ids)
#: Whether the CPU runs autocast in bf16, as rank 0 measured it (under torchrun; None: this
#: process measures).
_CPU_BF16: bool | None = None
HOLDOUT_EVERY = 20


@dataclass
class Config:
    data: list[str]
    steps: int = 360  # both models in about 5 minutes on a 2-core Zen 2 VM (make demo)
    bits: int = 8
    device: str = "cpu"
    compare: bool = False
    out: str = "ferrograd-demo"
    density: float = 1.0
    dim: int = 256
    layers: int = 2
    heads: int = 4
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 3e-3
    val_batches: int = 16
    seed: int = 0
    prompt: str = "def "
    sample_bytes: int = 200
    fsdp: bool = False
    compress_all_gather: bool = False


class Block(nn.Module):
    def __init__(self, cfg: Config, linear: Callable, norm: Callable):
        super().__init__()
        self.heads = cfg.heads
        self.norm1, self.norm2 = norm(cfg.dim), norm(cfg.dim)
        self.qkv, self.proj = linear(cfg.dim, 3 * cfg.dim), linear(cfg.dim, cfg.dim)
        self.up, self.down = linear(cfg.dim, 4 * cfg.dim), linear(4 * cfg.dim, cfg.dim)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        h = h + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return h + self.down(F.gelu(self.up(self.norm2(h))))


class ByteLM(nn.Module):
    """Decoder-only byte model; the output head is the embedding (tied)."""

    def __init__(self, cfg: Config, linear: Callable, norm: Callable):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, cfg.dim)
        self.pos = nn.Embedding(cfg.seq_len, cfg.dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg, linear, norm) for _ in range(cfg.layers))
        self.norm = norm(cfg.dim)

    def hidden(self, ids, positions, documents) -> torch.Tensor:
        mask = fg.data.document_mask(documents)
        h = self.embed(ids) + self.pos(positions)
        for block in self.blocks:
            h = block(h, mask)
        return self.norm(h)

    def forward(self, ids, positions, documents) -> torch.Tensor:
        return self.hidden(ids, positions, documents) @ self.embed.weight.T


def build(cfg: Config, ferrograd: bool) -> tuple[ByteLM, Callable]:
    """The model and its loss(model, batch) -> nats summed over the predicted tokens."""
    torch.manual_seed(cfg.seed)
    if ferrograd:
        model = ByteLM(
            cfg,
            lambda i, o: fg.nn.ShiftQuantLinear(i, o, bits=cfg.bits),
            fg.nn.L1LayerNorm,
        )

        def loss(m, b):
            h = m.hidden(b["ids"], b["positions"], b["documents"])
            return fg.linear_cross_entropy(h, m.embed.weight, b["targets"], reduction="sum")

    else:
        model = ByteLM(cfg, nn.Linear, nn.LayerNorm)

        def loss(m, b):
            logits = m(b["ids"], b["positions"], b["documents"])
            flat = logits.reshape(-1, VOCAB).float()
            return F.cross_entropy(flat, b["targets"].reshape(-1), reduction="sum")

    return model.to(cfg.device), loss


def default_data() -> str:
    return sysconfig.get_paths()["stdlib"]


def split_files(sources: list[str]) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): every 20th file is held out. The default source (the
    standard library) contributes its .py files outside site-packages; others every file."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            pattern = "*.py" if source == default_data() else "*"
            found = (p for p in path.rglob(pattern) if p.is_file())
            files += sorted(p for p in found if "site-packages" not in p.parts)
        elif path.is_file():
            files.append(path)
        else:
            raise SystemExit(f"demo: --data {source!r} is neither a file nor a directory")
    if len(files) < 2:
        raise SystemExit("demo: need at least two files (one is held out for validation)")
    held = files[::HOLDOUT_EVERY] if len(files) >= HOLDOUT_EVERY else files[-1:]
    held_set = set(held)
    return [f for f in files if f not in held_set], held


class Group:
    """This process's place in a torchrun launch (rank, world size); 0 of 1 without one.

    Data parallel over one global batch: every rank reads the same packed batches and trains on
    its contiguous share of the rows; its loss is its tokens' summed loss over the global batch's
    token count, so the gradients summed over ranks are exactly the one-process gradients of the
    batch mean, and the one-process run at the same global batch is reproduced (to the order of
    float sums; ShiftQuant's stochastic gradient rounding then sees other row blocks). The sum
    is one all-reduce per parameter (every rank holds the whole model), or with ``--fsdp`` FSDP2's
    reduce-scatter (``fully_shard`` per block and the model: each rank holds its rows of every
    parameter and all-gathers a block's weights for its forward and backward)."""

    def __init__(self, cfg: Config | None) -> None:
        self.world = 1 if cfg is None else int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0 if cfg is None else int(os.environ.get("RANK", "0"))
        self.fsdp = cfg is not None and cfg.fsdp
        if self.fsdp and "WORLD_SIZE" not in os.environ:
            raise SystemExit(
                "demo: --fsdp shards the model over the processes torchrun starts: run it as "
                "torchrun --nproc_per_node N -m ferrograd demo --fsdp ..."
            )
        if cfg is None or (self.world == 1 and not self.fsdp):
            return
        if cfg.batch_size % self.world:
            raise SystemExit(
                f"demo: --batch-size {cfg.batch_size} must be a multiple of the {self.world} "
                "processes torchrun started"
            )
        if cfg.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
        self.device = cfg.device
        if cfg.device == "cpu":
            # One precision for every rank: each process would measure torch's bf16 matmul
            # itself (autocast_dtype), and ranks near the probe's margin could disagree.
            choice = torch.tensor([int(bf16_matmul_is_faster())])
            dist.broadcast(choice, 0)
            global _CPU_BF16
            _CPU_BF16 = bool(choice)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        share = batch_size // self.world
        return slice(self.rank * share, (self.rank + 1) * share)

    def all_reduce_(self, tensors: list[torch.Tensor]) -> None:
        """Sums the tensors over the ranks in place."""
        if self.world > 1:
            for t in tensors:
                dist.all_reduce(t)

    def shard(self, model: ByteLM, compress: bool) -> None:
        """FSDP2 over the ranks: each block, then the model (embeddings, final norm: kept
        gathered from the forward through the loss, which reads the tied head). FSDP2 averages
        the gradients over the ranks: :meth:`backward` scales each rank's loss by the world
        size so that the average is the sum. With ``compress`` the ShiftQuantLinear weights
        are all-gathered as codes."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        if compress:
            fg.nn.compress_all_gather(model)
        mesh = init_device_mesh(self.device, (self.world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh, reshard_after_forward=False)
        register_fsdp_forward_method(model, "hidden")  # the loss runs hidden(), not forward()

    def gathered(self, model: ByteLM, empty: ByteLM) -> ByteLM:
        """``empty`` holding the sharded ``model``'s whole parameters (every rank takes part)."""
        from torch.distributed.tensor import DTensor

        from .nn.fsdp import ShiftQuantWeight

        state = {}
        for name, t in model.state_dict().items():
            if isinstance(t, DTensor):
                t = t.full_tensor()
            if isinstance(t, ShiftQuantWeight):
                t = t.data_
            state[name] = t.detach()
        empty.load_state_dict(state)
        return empty

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.world if self.fsdp else loss).backward()

    def sum_gradients(self, params: list[nn.Parameter], loss: torch.Tensor) -> None:
        """Sums the parameters' gradients (a rank without one adds zeros; under FSDP2 its
        reduce-scatter has summed them) and the loss."""
        if self.world == 1:
            return
        if self.fsdp:
            self.all_reduce_([loss])
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.all_reduce_([*(p.grad for p in params), loss])

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def batches(files: list[Path], cfg: Config, shuffle: bool, group: Group) -> Iterator[dict]:
    """Packed batches forever (epoch after epoch): this rank's rows of each global batch as
    dicts of tensors on the device, with the global batch's count of predicted tokens."""
    stream = fg.data.ByteStream(
        files, cfg.seq_len, cfg.batch_size, shuffle=shuffle, seed=cfg.seed, shard_ranks=False
    )
    epoch = 0
    while True:
        stream.set_epoch(epoch)
        for b in stream:
            mine = group.rows(b.input_ids.shape[0])
            yield {
                "ids": b.input_ids[mine].to(cfg.device),
                "targets": b.targets[mine].to(cfg.device),
                "positions": b.position_ids[mine].to(cfg.device),
                "documents": b.document_ids[mine].to(cfg.device),
                "global_tokens": int((b.targets != -100).sum()),
            }
        epoch += 1


def autocast_dtype(device: str) -> torch.dtype | None:
    """bf16 where the device multiplies it natively and faster than float32 (the strongest
    torch setup), else None. On the CPU that is measured: a native instruction set is not
    enough (an Intel Xeon with AVX512-BF16 but no AMX multiplies bf16 at half its float32
    rate: bench/model.py's Llama trained at 484 tokens/s under autocast there, 949 in float32)."""
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    bf16 = bf16_matmul_is_faster() if _CPU_BF16 is None else _CPU_BF16
    return torch.bfloat16 if bf16 else None


def autocast(cfg: Config) -> contextlib.AbstractContextManager:
    dtype = autocast_dtype(cfg.device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(cfg.device, dtype=dtype)


def run_label(cfg: Config, ferrograd: bool) -> str:
    precision = "bf16 autocast" if autocast_dtype(cfg.device) else "float32"
    if ferrograd:
        return f"ferrograd {cfg.bits}-bit ({precision})"
    return f"torch {precision} + AdamW fused"


class PeakMemory:
    """Growth of the resident set's high-water mark over a block (CPU; Linux /proc), or of
    torch's peak allocated memory on a GPU. None where neither can be read.

    On the CPU the C heap first hands its free memory back to the system (glibc's
    ``malloc_trim``): otherwise a run reuses pages the run before it left resident without
    growing the resident set, and the second of two runs measured small (the same two runs
    measured 0.8-3.7x apart depending on the order and the heap's state)."""

    def __init__(self, device: str) -> None:
        self.device, self.mib = device, None

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _trim_heap()
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to VmRSS
                self.base = _status_kib("VmRSS")
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        elif self.base is not None:
            self.mib = (_status_kib("VmHWM") - self.base) / 1024


def _trim_heap() -> None:
    """glibc's malloc_trim(0) where the C library has it (a no-op elsewhere)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return
    trim(0)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def lr_at(step: int, cfg: Config) -> float:
    warmup = max(1, cfg.steps // 20)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Progress:
    """A one-line progress bar on a terminal, a line every 10% otherwise."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label = total, label
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()

    def update(self, step: int, loss: float, tokens: int) -> None:
        done = step + 1
        if not self.tty and done % max(1, self.total // 10) and done != self.total:
            return
        rate = tokens / max(time.perf_counter() - self.start, 1e-9)
        bar = "#" * (24 * done // self.total)
        line = (
            f"{self.label} [{bar:<24}] {done}/{self.total} loss {loss:.3f} "
            f"bpb {loss / math.log(2):.3f} {rate / 1e3:.1f} kB/s"
        )
        print(("\r" if self.tty else "") + line, end="" if self.tty else "\n", file=sys.stderr)
        if self.tty and done == self.total:
            print(file=sys.stderr)


def optimizer(cfg: Config, params: list[nn.Parameter], ferrograd: bool) -> torch.optim.Optimizer:
    """fg.optim.SPAM for the ferrograd run, AdamW(fused=True) for the torch one."""
    if ferrograd:
        return fg.optim.SPAM(params, lr=cfg.lr, density=cfg.density, warmup_steps=cfg.steps // 20)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, fused=True)


def train(
    cfg: Config, files: list[Path], ferrograd: bool, group: Group, quiet: bool = False
) -> tuple[ByteLM, Callable, dict]:
    model, loss_fn = build(cfg, ferrograd)
    if group.fsdp:
        group.shard(model, compress=ferrograd and cfg.compress_all_gather)
    params = list(model.parameters())
    opt = optimizer(cfg, params, ferrograd)
    label = run_label(cfg, ferrograd)
    progress = Progress(cfg.steps, label) if group.main and not quiet else None
    curve, tokens = [], 0
    start = time.perf_counter()
    data = batches(files, cfg, shuffle=True, group=group)
    with PeakMemory(cfg.device) as peak:
        for step, batch in zip(range(cfg.steps), data, strict=False):
            for param_group in opt.param_groups:
                param_group["lr"] = lr_at(step, cfg)
            with autocast(cfg):
                loss = loss_fn(model, batch).float() / max(batch["global_tokens"], 1)
            opt.zero_grad(set_to_none=True)
            group.backward(loss)
            loss = loss.detach()
            group.sum_gradients(params, loss)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            curve.append(loss.item())
            tokens += batch["global_tokens"]
            if progress is not None:
                progress.update(step, curve[-1], tokens)
    seconds = time.perf_counter() - start
    stats = {
        "label": label,
        "loss_curve": curve,
        "train_seconds": seconds,
        "bytes_per_second": tokens / seconds,
        "peak_memory_MiB": peak.mib,
    }
    return model, loss_fn, stats


def evaluate(
    model: ByteLM, loss_fn: Callable, held: list[Path], cfg: Config, group: Group
) -> float:
    """Validation bits per byte over the first ``val_batches`` held-out batches."""
    sums = torch.zeros(2, dtype=torch.float64, device=cfg.device)  # nats, tokens
    model.eval()
    data = batches(held, cfg, shuffle=False, group=group)
    with torch.no_grad(), autocast(cfg):
        for _, b in zip(range(cfg.val_batches), data, strict=False):
            sums[0] += loss_fn(model, b).double()
            sums[1] += int((b["targets"] != -100).sum())
    group.all_reduce_([sums])
    model.train()
    return float(sums[0] / sums[1].clamp(min=1)) / math.log(2)


def float_copy(model: ByteLM) -> ByteLM:
    """The trained model with its ShiftQuantLinears as plain float nn.Linear."""
    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if isinstance(module, fg.nn.ShiftQuantLinear):
            linear = nn.Linear(module.in_features, module.out_features, module.bias is not None)
            linear.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, linear.to(module.weight.device))
    return plain


def quantize_w4a16(model: ByteLM, loss_fn, train_files, held, cfg: Config) -> tuple[ByteLM, dict]:
    """SmoothQuant+ W4A16 of the trained model, in this one process (the main rank)."""
    solo = Group(None)
    plain = float_copy(model)
    before = evaluate(plain, loss_fn, held, cfg, solo)
    calibration = [
        {k: b[k] for k in ("ids", "positions", "documents")}
        for _, b in zip(range(8), batches(train_files, cfg, shuffle=True, group=solo), strict=False)
    ]
    report = fg.quant.smoothquant_plus(plain, calibration, group_size=128)
    after = evaluate(plain, loss_fn, held, cfg, solo)
    return plain, {
        "val_bpb_before": before,
        "val_bpb_after": after,
        "relative_change": (after - before) / before,
        "alpha": report.alpha,
        "folded_into_norms": report.folded,
        "layer_errors": {name: layer.error for name, layer in report.layers.items()},
    }


def sample(model: ByteLM, cfg: Config) -> str:
    g = torch.Generator().manual_seed(cfg.seed)
    ids = [1] + [b + 4 for b in cfg.prompt.encode()]  # BOS + prompt bytes
    model.eval()
    with torch.no_grad():
        for _ in range(cfg.sample_bytes):
            window = torch.tensor([ids[-cfg.seq_len :]], device=cfg.device)
            positions = torch.arange(window.shape[1], device=cfg.device)[None]
            logits = model(window, positions, torch.zeros_like(window))[0, -1].float().cpu()
            logits[:4] = float("-inf")  # no specials mid-sample
            nxt = int(torch.multinomial(fg.softmax(logits / 0.8, -1), 1, generator=g))
            ids.append(nxt)
    return fg.data.decode_bytes(torch.tensor(ids))


def plot(out: Path, curves: dict[str, list[float]]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no loss plot"
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, curve in curves.items():
        ax.plot([c / math.log(2) for c in curve], label=label, linewidth=1)
    ax.set(xlabel="step", ylabel="train bits per byte", title="ferrograd demo")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)
    return None


def comparison_table(ours: dict, base: dict) -> str:
    """The two runs side by side, with ferrograd's ratio to the baseline."""

    def mib(x):
        return "n/a" if x is None else f"{x:.0f} MiB"

    rows = [
        ("", ours["label"], base["label"], "ratio"),
        ("bytes/s", f"{ours['bytes_per_second']:.0f}", f"{base['bytes_per_second']:.0f}",
         f"{ours['bytes_per_second'] / base['bytes_per_second']:.2f}x"),
        ("peak memory", mib(ours["peak_memory_MiB"]), mib(base["peak_memory_MiB"]),
         "n/a" if not ours["peak_memory_MiB"] or not base["peak_memory_MiB"]
         else f"{ours['peak_memory_MiB'] / base['peak_memory_MiB']:.2f}x"),
        ("val bits per byte", f"{ours['val_bpb']:.4f}", f"{base['val_bpb']:.4f}",
         f"{100 * (ours['val_bpb'] / base['val_bpb'] - 1):+.2f}%"),
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def portable_config(cfg: Config) -> dict:
    """The config without this machine's paths: the default data source by name, other
    sources by their file or directory name, no output directory."""
    config = asdict(cfg)
    config["data"] = [
        "python-stdlib" if source == default_data() else Path(source).name for source in cfg.data
    ]
    del config["out"]
    return config


def run(cfg: Config) -> dict:
    """The demo; under torchrun every rank trains its share of each batch and the main rank
    reports (the others return {})."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("demo: --device cuda: torch sees no CUDA GPU here; run on the CPU")
    group = Group(cfg)
    try:
        result = _run(cfg, group)
        group.barrier()  # no rank tears the group down while another still reports
        return result
    finally:
        group.close()


def _run(cfg: Config, group: Group) -> dict:
    out = Path(cfg.out)
    train_files, held = split_files(cfg.data)
    log = (lambda *a: print(*a, file=sys.stderr)) if group.main else (lambda *a: None)
    log(
        f"ferrograd {fg.__version__} demo: {len(train_files)} training files, {len(held)} "
        f"held out, {cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} bytes on {cfg.device} "
        f"({group.world} process{'es' if group.world > 1 else ''} x "
        f"{fg.get_num_threads()} threads, {fg.simd_level()})"
    )
    # One step of each run first: the one-time allocations (thread pools, kernel caches) then
    # count against neither run's peak memory.
    for ferrograd in (True, False) if cfg.compare else (True,):
        train(replace(cfg, steps=1), train_files, ferrograd, group, quiet=True)
    model, loss_fn, stats = train(cfg, train_files, True, group)
    results = {"ferrograd": {**stats, "val_bpb": evaluate(model, loss_fn, held, cfg, group)}}
    log(f"validation: {results['ferrograd']['val_bpb']:.4f} bits per byte")
    curves = {stats["label"]: stats["loss_curve"]}
    if cfg.compare:
        base, base_loss, base_stats = train(cfg, train_files, False, group)
        results["baseline"] = {
            **base_stats,
            "val_bpb": evaluate(base, base_loss, held, cfg, group),
        }
        results["relative_to_baseline"] = (
            results["ferrograd"]["val_bpb"] / results["baseline"]["val_bpb"] - 1
        )
        curves[base_stats["label"]] = base_stats["loss_curve"]
        log(comparison_table(results["ferrograd"], results["baseline"]))
    if group.fsdp:
        model = group.gathered(model, build(cfg, True)[0])
    if not group.main:
        return {}
    out.mkdir(parents=True, exist_ok=True)
    quantized, results["w4a16"] = quantize_w4a16(model, loss_fn, train_files, held, cfg)
    print(
        f"W4A16 (SmoothQuant+, alpha {results['w4a16']['alpha']}): validation "
        f"{results['w4a16']['val_bpb_before']:.4f} -> {results['w4a16']['val_bpb_after']:.4f} "
        "bits per byte",
        file=sys.stderr,
    )
    results["sample"] = sample(quantized, cfg)
    print(f"sample (W4A16 model):\n{results['sample']}", file=sys.stderr)
    plot_note = plot(out, curves)
    if plot_note:
        print(plot_note, file=sys.stderr)
    torch.save({"config": portable_config(cfg), "model": model.state_dict()}, out / "checkpoint.pt")
    summary = {
        "config": portable_config(cfg),
        "machine": {"processes": group.world, "threads": fg.get_num_threads(),
                    "simd": fg.simd_level(), "torch": torch.__version__,
                    "ferrograd": fg.__version__},
        "results": results,
        "plot": "loss.png" if plot_note is None else plot_note,
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out / 'summary.json'}", file=sys.stderr)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Config(data=[])
    parser.add_argument(
        "--data",
        nargs="+",
        default=[default_data()],
        help="files or directories (the default takes the standard library's .py files)",
    )
    parser.add_argument("--steps", type=int, default=d.steps, help="training steps")
    parser.add_argument("--bits", type=int, default=d.bits, help="ShiftQuant bits (2..8)")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default=d.device, help="where to train"
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also train the strongest plain-torch baseline on the same batches (bf16 autocast "
        "+ AdamW(fused=True) where the CPU multiplies bf16 faster than float32, float32 "
        "elsewhere)",
    )
    parser.add_argument("--out", default=d.out, help="output directory")
    parser.add_argument(
        "--density", type=float, default=d.density, help="SPAM momentum density (1 = dense)"
    )
    sizes = {
        "dim": "model width", "layers": "Transformer blocks", "heads": "attention heads",
        "seq_len": "bytes per packed row", "batch_size": "rows per step",
        "val_batches": "held-out batches to evaluate", "seed": "data and init seed",
    }  # fmt: skip
    for name, text in sizes.items():
        flag = f"--{name.replace('_', '-')}"
        parser.add_argument(flag, type=int, default=getattr(d, name), help=text)
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    parser.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard the model with FSDP2 (fully_shard per block) instead of "
        "replicating it on every rank",
    )
    parser.add_argument(
        "--compress-all-gather",
        action="store_true",
        help="with --fsdp: all-gather ShiftQuantLinear weights as ShiftQuant codes "
        "(fg.nn.compress_all_gather)",
    )
    parser.add_argument("--prompt", default=d.prompt, help="start of the generated sample")
    parser.add_argument("--sample-bytes", type=int, default=d.sample_bytes, help="sample length")


def config_from(args: argparse.Namespace) -> Config:
    fields = {k: v for k, v in vars(args).items() if k in Config.__dataclass_fields__}
    if fields.get("compress_all_gather") and not fields.get("fsdp"):
        raise SystemExit("demo: --compress-all-gather needs --fsdp (it changes FSDP2's all-gather)")
    return Config(**fields)
