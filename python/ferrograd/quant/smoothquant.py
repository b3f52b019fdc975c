"""SmoothQuant+ (docs/definitions.md): smooth activation outliers into the weights per input
channel, then quantize every Linear to W4 (round to nearest, zero points).

Per Linear input channel j: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) from calibration
activations; X / s feeds W * s, exactly equivalent before quantization.

- Calibration: forward pre-hooks record max|X_j| of every nn.Linear's input over all
  calibration batches (each passed as ``model(item)``, or ``model(**item)`` for a dict, under
  ``torch.no_grad()``), and which Linears read the output tensor of a norm (LayerNorm, RMSNorm,
  L1LayerNorm or any module named *Norm with a weight over the last dim) directly.
- Linears that read the same norm (q / k / v, gate / up) share one s (their max|W_j| combined),
  and 1/s is folded into that norm's weight and bias; the other Linears keep 1/s as the
  ``input_scale`` of their W4A16Linear. If folding changes the unquantized model's output (the
  norm's output feeds something else too), nothing is folded and every Linear keeps its scale.
- alpha=None tries alpha in 0.0, 0.1, ..., 1.0 and keeps the one with the lowest calibration
  loss: the relative squared error of the quantized model's output against the original's.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn.w4a16 import W4A16Linear

__all__ = ["SmoothQuantReport", "smoothquant_plus"]

OP = "smoothquant_plus"
ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))
#: Rows of each Linear's input kept from the first batch to measure the per-layer error.
SAMPLE_ROWS = 512
#: Relative output change above which folding into norms is judged inexact.
FOLD_TOLERANCE = 1e-4


@dataclass
class LayerReport:
    #: ||W4A16Linear(x) - Linear(x)|| / ||Linear(x)|| on calibration inputs.
    error: float
    #: The norm that absorbed 1/s, or None when the layer scales its own input.
    folded_into: str | None
    smooth_min: float
    smooth_max: float


@dataclass
class SmoothQuantReport:
    alpha: float
    #: Calibration loss (relative squared output error) of each alpha tried.
    alpha_losses: dict[float, float]
    #: The same loss with plain round-to-nearest (no smoothing), for comparison.
    rtn_loss: float
    folded: bool
    layers: dict[str, LayerReport] = field(default_factory=dict)


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("Norm")
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 1
    )


def _call(model: nn.Module, item):
    return model(**item) if isinstance(item, dict) else model(item)


def _output_tensor(out) -> torch.Tensor:
    """The tensor to compare of a model's output: itself, ``.logits`` / ["logits"], or the
    first tensor of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"{OP}: cannot find a tensor in the model's output ({type(out).__name__})")


class _Calibration:
    """max|X_j| per Linear, the norm each Linear reads directly, and input samples."""

    def __init__(self, model: nn.Module) -> None:
        self.linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.norms = {n: m for n, m in model.named_modules() if _is_norm(m)}
        self.act_max: dict[str, torch.Tensor] = {}
        self.samples: dict[str, torch.Tensor] = {}
        self.reads: dict[str, set[str | None]] = {n: set() for n in self.linears}
        self._outputs: dict[int, tuple[str, torch.Tensor]] = {}

    def run(self, model: nn.Module, batches: Iterable) -> list:
        handles = [m.register_forward_hook(self._norm_hook(n)) for n, m in self.norms.items()]
        handles += [
            m.register_forward_pre_hook(self._linear_hook(n)) for n, m in self.linears.items()
        ]
        outputs = []
        try:
            with torch.no_grad():
                for item in batches:
                    outputs.append(_output_tensor(_call(model, item)).detach().float())
                    self._outputs.clear()
        finally:
            for h in handles:
                h.remove()
        if not outputs:
            raise ValueError(f"{OP}: calibration_batches yielded no batch")
        return outputs

    def _norm_hook(self, name: str):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                self._outputs[id(output)] = (name, output)  # the reference keeps the id unique

        return hook

    def _linear_hook(self, name: str):
        def hook(module, args):
            x = args[0]
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            amax = flat.abs().amax(0)
            prev = self.act_max.get(name)
            self.act_max[name] = amax if prev is None else torch.maximum(prev, amax)
            if name not in self.samples:
                self.samples[name] = flat[:SAMPLE_ROWS].clone()
            source = self._outputs.get(id(x))
            self.reads[name].add(source[0] if source is not None and source[1] is x else None)

        return hook

    def groups(self) -> list[tuple[str | None, list[str]]]:
        """(norm, Linears that always read that norm's output directly) and (None, [linear])
        for each other calibrated Linear."""
        by_norm: dict[str, list[str]] = {}
        alone = []
        for name in self.linears:
            if name not in self.act_max:
                continue  # never called during calibration: left as it is
            reads = self.reads[name]
            norm = next(iter(reads)) if len(reads) == 1 else None
            if norm is None:
                alone.append((None, [name]))
            else:
                by_norm.setdefault(norm, []).append(name)
        return list(by_norm.items()) + alone


def _smoothing(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_max = torch.stack([w.detach().abs().amax(0).float().cpu() for w in weights]).amax(0)
    a = act_max.cpu().clamp(min=1e-5)
    s = a.pow(alpha) / w_max.clamp(min=1e-5).pow(1.0 - alpha)
    return s.clamp(1e-5, 1e5)


def _fold(norm: nn.Module, linears: list[nn.Module], s: torch.Tensor) -> None:
    """1/s into the norm's weight and bias, s into the Linears' input columns: the same function
    before quantization."""
    with torch.no_grad():
        for p in (norm.weight, getattr(norm, "bias", None)):
            if isinstance(p, torch.Tensor):
                p.div_(s.to(p.device, p.dtype))
        for m in linears:
            m.weight.mul_(s.to(m.weight.device, m.weight.dtype))


def _paths(model: nn.Module) -> dict[int, list[str]]:
    """id of each submodule -> every name it has under ``model`` (a layer used in several
    places has several)."""
    paths: dict[int, list[str]] = {}
    for path, sub in model.named_modules(remove_duplicate=False):
        if path:
            paths.setdefault(id(sub), []).append(path)
    return paths


def _set_module(model: nn.Module, paths: list[str], module: nn.Module) -> None:
    """Puts ``module`` at each of ``paths`` (every name of the layer it replaces)."""
    for path in paths:
        parent_name, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _quantize(model: nn.Module, calib: _Calibration, alpha: float | None, group_size: int,
              fold: bool) -> dict[str, tuple[str | None, torch.Tensor | None]]:  # fmt: skip
    """Smooths (alpha None: not at all) and quantizes ``model``'s calibrated Linears in place;
    returns name -> (norm folded into, s)."""
    modules, paths = dict(model.named_modules()), _paths(model)
    applied = {}
    for norm_name, names in calib.groups():
        linears = [modules[n] for n in names]
        s = None
        if alpha is not None:
            s = _smoothing(calib.act_max[names[0]], [m.weight for m in linears], alpha)
        if s is not None and fold and norm_name is not None:
            _fold(modules[norm_name], linears, s)
            for n, m in zip(names, linears, strict=True):
                _set_module(model, paths[id(m)], W4A16Linear.from_linear(m, group_size))
                applied[n] = (norm_name, s)
        else:
            for n, m in zip(names, linears, strict=True):
                _set_module(model, paths[id(m)], W4A16Linear.from_linear(m, group_size, smooth=s))
                applied[n] = (None, s)
    return applied


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(||got - want||^2, ||want||^2) in float64, where the squares of float32 outputs cannot
    overflow (outputs ~1e20 square past float32's range: the loss read 0 for every alpha)."""
    got, want = got.double(), want.double()
    return float((got - want).pow(2).sum()), float(want.pow(2).sum())


def _relative_loss(model: nn.Module, batches: list, reference: list[torch.Tensor]) -> float:
    num = den = 0.0
    with torch.no_grad():
        for item, ref in zip(batches, reference, strict=True):
            d, r = _relative_error(_output_tensor(_call(model, item)), ref)
            num, den = num + d, den + r
    return num / max(den, 1e-300)


def _folding_is_exact(
    model: nn.Module, calib: _Calibration, batch, reference: torch.Tensor
) -> bool:
    """Smooths a copy with alpha 0.5 but no quantization and compares its output."""
    trial = copy.deepcopy(model)
    modules = dict(trial.named_modules())
    for norm_name, names in calib.groups():
        if norm_name is not None:
            linears = [modules[n] for n in names]
            s = _smoothing(calib.act_max[names[0]], [m.weight for m in linears], 0.5)
            _fold(modules[norm_name], linears, s)
    return math.sqrt(_relative_loss(trial, [batch], [reference])) <= FOLD_TOLERANCE


def smoothquant_plus(
    model: nn.Module,
    calibration_batches: Iterable,
    *,
    group_size: int = 128,
    alpha: float | None = None,
) -> SmoothQuantReport:
    """Smooths and 4-bit quantizes every nn.Linear of ``model`` in place (they become
    ``fg.nn.W4A16Linear``); returns the chosen alpha, the calibration losses and per-layer
    errors. See the module docstring for the procedure."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{OP}: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):  # replaced in place: a root has no parent to hold it
        raise TypeError(
            f"{OP}: model must hold its Linears, got an nn.Linear itself (quantize it with "
            "fg.nn.W4A16Linear.from_linear, or wrap it in a module)"
        )
    if alpha is not None and (isinstance(alpha, bool) or not 0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"{OP}: alpha must be None or in [0, 1], got {alpha!r}")
    batches = list(calibration_batches)
    calib = _Calibration(model)
    reference = calib.run(model, batches)
    if not calib.act_max:
        raise ValueError(f"{OP}: the model called no nn.Linear during calibration")
    fold = _folding_is_exact(model, calib, batches[0], reference[0])

    def trial(a: float | None) -> float:
        candidate = copy.deepcopy(model)
        _quantize(candidate, calib, a, group_size, fold)
        return _relative_loss(candidate, batches, reference)

    alphas = ALPHA_GRID if alpha is None else (float(alpha),)
    losses = {a: trial(a) for a in alphas} if len(alphas) > 1 else {}
    best = min(losses, key=losses.get) if losses else alphas[0]
    rtn_loss = trial(None)

    originals = {n: copy.deepcopy(m) for n, m in calib.linears.items() if n in calib.act_max}
    applied = _quantize(model, calib, best, group_size, fold)
    if not losses:
        losses = {best: _relative_loss(model, batches, reference)}
    layers = {}
    for name, (norm_name, s) in applied.items():
        x, ref_layer = calib.samples[name], originals[name].float()
        new = model.get_submodule(name)
        with torch.no_grad():
            want = ref_layer(x.to(ref_layer.weight.device))
            xin = x if norm_name is None else x / s.to(x.device)
            got = new(xin.to(new.packed.device, new.weight_dtype)).float()
        d, r = _relative_error(got, want)
        err = math.sqrt(d / max(r, 1e-300))
        lo, hi = (1.0, 1.0) if s is None else (float(s.min()), float(s.max()))
        layers[name] = LayerReport(err, norm_name, lo, hi)
    return SmoothQuantReport(best, losses, rtn_loss, fold, layers)
