"""``python -m ferrograd demo``: trains a byte-level language model with every primitive.

Data: byte documents through ``fg.data.ByteStream`` (packing, per-document positions), by
default the Python standard library's own ``.py`` files; every 20th file is held out.
Model: a small decoder-only Transformer whose attention stays inside each packed document
(``fg.data.document_mask``), softmax through ``fg.softmax``, linears as
``fg.nn.ShiftQuantLinear`` (``--bits``), norms as ``fg.nn.L1LayerNorm``, the tied output head's
loss through ``fg.linear_cross_entropy``, optimizer ``fg.optim.SPAM`` (``--density``).
Then SmoothQuant+ W4A16 post-training quantization (``fg.quant.smoothquant_plus``), and a
sample. ``--compare`` trains the float32 nn.Linear / nn.LayerNorm / AdamW baseline on the same
batches. Bits per byte are the loss in bits per predicted token (a byte, or a document's end).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import ferrograd as fg

VOCAB = 260  # bytes + 4 specials (docs/definitions.md, byte ids)
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
    dim: int = 128
    layers: int = 2
    heads: int = 4
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 3e-3
    val_batches: int = 16
    seed: int = 0
    prompt: str = "def "
    sample_bytes: int = 200


class Block(nn.Module):
    def __init__(self, cfg: Config, linear: Callable, norm: Callable, softmax: Callable):
        super().__init__()
        self.heads, self.softmax = cfg.heads, softmax
        self.norm1, self.norm2 = norm(cfg.dim), norm(cfg.dim)
        self.qkv, self.proj = linear(cfg.dim, 3 * cfg.dim), linear(cfg.dim, cfg.dim)
        self.up, self.down = linear(cfg.dim, 4 * cfg.dim), linear(4 * cfg.dim, cfg.dim)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        att = self.softmax(scores, -1) @ v
        h = h + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return h + self.down(F.gelu(self.up(self.norm2(h))))


class ByteLM(nn.Module):
    """Decoder-only byte model; the output head is the embedding (tied)."""

    def __init__(self, cfg: Config, linear: Callable, norm: Callable, softmax: Callable):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, cfg.dim)
        self.pos = nn.Embedding(cfg.seq_len, cfg.dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg, linear, norm, softmax) for _ in range(cfg.layers))
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
    """The model and its loss(model, batch) -> mean nats per predicted token."""
    torch.manual_seed(cfg.seed)
    if ferrograd:
        model = ByteLM(
            cfg,
            lambda i, o: fg.nn.ShiftQuantLinear(i, o, bits=cfg.bits),
            fg.nn.L1LayerNorm,
            fg.softmax,
        )

        def loss(m, b):
            h = m.hidden(b["ids"], b["positions"], b["documents"])
            return fg.linear_cross_entropy(h, m.embed.weight, b["targets"])

    else:
        model = ByteLM(cfg, nn.Linear, nn.LayerNorm, torch.softmax)

        def loss(m, b):
            logits = m(b["ids"], b["positions"], b["documents"])
            return F.cross_entropy(logits.reshape(-1, VOCAB), b["targets"].reshape(-1))

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


def batches(files: list[Path], cfg: Config, shuffle: bool) -> Iterator[dict]:
    """Packed batches forever (epoch after epoch), as dicts of tensors on the device."""
    stream = fg.data.ByteStream(files, cfg.seq_len, cfg.batch_size, shuffle=shuffle, seed=cfg.seed)
    epoch = 0
    while True:
        stream.set_epoch(epoch)
        for b in stream:
            yield {
                "ids": b.input_ids.to(cfg.device),
                "targets": b.targets.to(cfg.device),
                "positions": b.position_ids.to(cfg.device),
                "documents": b.document_ids.to(cfg.device),
            }
        epoch += 1


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


def train(cfg: Config, files: list[Path], ferrograd: bool) -> tuple[ByteLM, Callable, dict]:
    model, loss_fn = build(cfg, ferrograd)
    params = list(model.parameters())
    if ferrograd:
        opt = fg.optim.SPAM(params, lr=cfg.lr, density=cfg.density, warmup_steps=cfg.steps // 20)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    label = f"ferrograd {cfg.bits}-bit" if ferrograd else "float32 baseline"
    progress = Progress(cfg.steps, label)
    curve, tokens = [], 0
    start = time.perf_counter()
    for step, batch in zip(range(cfg.steps), batches(files, cfg, shuffle=True), strict=False):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        curve.append(loss.item())
        tokens += int((batch["targets"] != -100).sum())
        progress.update(step, curve[-1], tokens)
    seconds = time.perf_counter() - start
    stats = {"loss_curve": curve, "train_seconds": seconds, "bytes_per_second": tokens / seconds}
    return model, loss_fn, stats


def evaluate(model: ByteLM, loss_fn: Callable, held: list[Path], cfg: Config) -> float:
    """Validation bits per byte over the first ``val_batches`` held-out batches."""
    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for _, b in zip(range(cfg.val_batches), batches(held, cfg, shuffle=False), strict=False):
            n = int((b["targets"] != -100).sum())
            total += float(loss_fn(model, b)) * n
            count += n
    model.train()
    return total / max(count, 1) / math.log(2)


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
    plain = float_copy(model)
    before = evaluate(plain, loss_fn, held, cfg)
    calibration = [
        {k: b[k] for k in ("ids", "positions", "documents")}
        for _, b in zip(range(8), batches(train_files, cfg, shuffle=True), strict=False)
    ]
    report = fg.quant.smoothquant_plus(plain, calibration, group_size=128)
    after = evaluate(plain, loss_fn, held, cfg)
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
            nxt = int(torch.multinomial(torch.softmax(logits / 0.8, -1), 1, generator=g))
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


def run(cfg: Config) -> dict:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("demo: --device cuda: torch sees no CUDA GPU here; run on the CPU")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train_files, held = split_files(cfg.data)
    print(
        f"ferrograd {fg.__version__} demo: {len(train_files)} training files, {len(held)} "
        f"held out, {cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} bytes on {cfg.device} "
        f"({fg.get_num_threads()} threads, {fg.simd_level()})",
        file=sys.stderr,
    )
    model, loss_fn, stats = train(cfg, train_files, ferrograd=True)
    results = {"ferrograd": {**stats, "val_bpb": evaluate(model, loss_fn, held, cfg)}}
    print(f"validation: {results['ferrograd']['val_bpb']:.4f} bits per byte", file=sys.stderr)
    curves = {f"ferrograd {cfg.bits}-bit": stats["loss_curve"]}
    if cfg.compare:
        base, base_loss, base_stats = train(cfg, train_files, ferrograd=False)
        results["baseline"] = {**base_stats, "val_bpb": evaluate(base, base_loss, held, cfg)}
        results["relative_to_baseline"] = (
            results["ferrograd"]["val_bpb"] / results["baseline"]["val_bpb"] - 1
        )
        curves["float32 baseline"] = base_stats["loss_curve"]
        print(
            f"baseline validation: {results['baseline']['val_bpb']:.4f} bits per byte "
            f"(ferrograd {100 * results['relative_to_baseline']:+.2f}%)",
            file=sys.stderr,
        )
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
    torch.save({"config": asdict(cfg), "model": model.state_dict()}, out / "checkpoint.pt")
    summary = {
        "config": asdict(cfg),
        "machine": {"threads": fg.get_num_threads(), "simd": fg.simd_level(),
                    "torch": torch.__version__, "ferrograd": fg.__version__},
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
    parser.add_argument("--compare", action="store_true", help="also train the float32 baseline")
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
    parser.add_argument("--prompt", default=d.prompt, help="start of the generated sample")
    parser.add_argument("--sample-bytes", type=int, default=d.sample_bytes, help="sample length")


def config_from(args: argparse.Namespace) -> Config:
    fields = {k: v for k, v in vars(args).items() if k in Config.__dataclass_fields__}
    return Config(**fields)
