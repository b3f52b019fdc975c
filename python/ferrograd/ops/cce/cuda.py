"""The CUDA kernels: kernels/cce.cu (its header describes the tiles and the pipeline) for
float32 / bfloat16 / float16 inputs whose rows are 16-byte multiples (D x itemsize % 16 == 0)
when ferrograd can launch kernels here; other CUDA inputs run reference.py's chunk loop (cuBLAS
matmuls into a 256 MiB float32 buffer).

``cce_forward_cuda`` / ``cce_backward_cuda`` are the launches: e [N, D] and c [V, D] of one
dtype, bias [V] of that dtype or None, targets int64 [N] (negative: ignored row; a target >= V
gets a NaN target logit, hence a NaN loss: raising would synchronize with the device). Neither pass
allocates anything of size N x V.
"""

from __future__ import annotations

import ctypes
import math

import torch

from ... import cuda
from . import reference

__all__ = ["backward", "cce_backward_cuda", "cce_forward_cuda", "forward", "vocab_order"]

#: Rows of e and vocabulary entries per block, threads per block (kernels/cce.cu).
BLOCK_ROWS = 64
BLOCK_VOCAB = 128
THREADS = 128
#: Dynamic shared memory per block; kernels/cce.cu static_asserts the same numbers.
FORWARD_SMEM = 46080
BACKWARD_SMEM = {torch.float32: 89088, torch.float16: 72704, torch.bfloat16: 72704}
#: Forward blocks to aim for per SM when the vocabulary is split among blocks.
FORWARD_BLOCKS_PER_SM = 8
#: The kernel rounds dz · 2^(14 - e) to the input type, with 2^e >= max |dz|: the largest
#: gradients sit near 2^14, far from fp16's overflow (65504) and its subnormals (< 2^-14).
GRAD_HEADROOM_LOG2 = 14

_TYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
_NULL = ctypes.c_void_p(0)
_INT32_MAX = 2**31 - 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous tensor starting on a 16-byte boundary (the kernels' cp.async loads)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _operands(op, e, c, bias, targets):
    """Checked (e, c, bias, targets), contiguous and aligned."""
    for name, t in (("e", e), ("c", c), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if e.dtype not in _TYPES:
        raise TypeError(f"{op}: e must be float32, bfloat16 or float16, got {e.dtype}")
    if e.dim() != 2 or c.dim() != 2 or e.shape[1] != c.shape[1]:
        raise ValueError(f"{op}: e [N, D] and c [V, D] must share D, got {e.shape} and {c.shape}")
    n, d = e.shape
    v = c.shape[0]
    if not e.is_cuda or c.device != e.device or targets.device != e.device:
        raise ValueError(f"{op}: e, c and targets must be on one CUDA device")
    if c.dtype != e.dtype:
        raise TypeError(f"{op}: c must have e's dtype {e.dtype}, got {c.dtype}")
    if targets.dtype != torch.int64 or targets.shape != (n,):
        raise ValueError(f"{op}: targets must be int64 [{n}], got {targets.dtype} {targets.shape}")
    if bias is not None and (
        not isinstance(bias, torch.Tensor)
        or bias.dtype != e.dtype
        or bias.shape != (v,)
        or bias.device != e.device
    ):
        raise ValueError(f"{op}: bias must be None or a [{v}] {e.dtype} tensor on {e.device}")
    if d * e.element_size() % 16:
        raise ValueError(
            f"{op}: D = {d} must be a multiple of {16 // e.element_size()} for {e.dtype} "
            "(the kernels load rows in 16-byte pieces)"
        )
    if v == 0:
        raise ValueError(f"{op}: c has no rows (V = 0)")
    if max(n, v, d) > _INT32_MAX or _cdiv(n, BLOCK_ROWS) * _cdiv(v, BLOCK_VOCAB) > _INT32_MAX:
        raise ValueError(f"{op}: N = {n}, V = {v}, D = {d} exceed the kernels' int32 sizes")
    return _aligned(e), _aligned(c), None if bias is None else _aligned(bias), targets.contiguous()


def _softcap(op: str, softcap: float | None) -> float:
    """The kernels' softcap argument: 0 means none."""
    if softcap is None:
        return 0.0
    if not 0.0 < float(softcap) < float("inf"):
        raise ValueError(f"{op}: softcap must be None or a positive finite float, got {softcap}")
    return float(softcap)


def _row_vector(op: str, name: str, t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.shape != (e.shape[0],):
        raise ValueError(f"{op}: {name} must be a float32 [{e.shape[0]}] tensor")
    if t.device != e.device:
        raise ValueError(f"{op}: {name} must be on {e.device}, got {t.device}")
    return t.contiguous()


def cce_forward_cuda(e, c, bias, targets, softcap, want_sum):
    """Per row i of e, with z_ij = e_i · c_j + bias_j (fp32 accumulation), then
    softcap · tanh(z / softcap) when softcap is set: (lse_i = logsumexp_j z_ij,
    z_i,targets[i] (0 for ignored rows, NaN for targets >= V), Σ_j z_ij if want_sum else None),
    float32 [N] each."""
    op = "cce_forward_cuda"
    e, c, bias, targets = _operands(op, e, c, bias, targets)
    cap = _softcap(op, softcap)
    n, d = e.shape
    v = c.shape[0]
    f32 = {"dtype": torch.float32, "device": e.device}
    # NaN until the kernel writes it: a target >= V that no check saw poisons its row's loss.
    z_target = torch.full((n,), math.nan, **f32).masked_fill_(targets < 0, 0.0)
    if n == 0:
        return torch.empty(0, **f32), z_target, torch.empty(0, **f32) if want_sum else None
    row_tiles, tiles = _cdiv(n, BLOCK_ROWS), _cdiv(v, BLOCK_VOCAB)
    sms = cuda.multiprocessors(e.device)
    # Split the vocabulary until the grid holds a few waves; a block's split is a contiguous
    # run of tiles, consecutive blocks share a row tile (e stays in L2).
    splits = min(tiles, max(1, _cdiv(FORWARD_BLOCKS_PER_SM * sms, row_tiles)))
    per_split = _cdiv(tiles, splits)
    splits = _cdiv(tiles, per_split)
    if per_split * _cdiv(d * e.element_size(), 64) > _INT32_MAX:  # the kernel's step counter
        raise ValueError(f"{op}: V = {v} x D = {d} is too large for one row block")
    part = torch.empty(3 if want_sum else 2, splits, n, **f32)  # max, Σ exp(z - max), Σ z
    with torch.cuda.device(e.device):
        kernel = cuda.kernel("cce.cu", "cce_forward", {"CCE_T": _TYPES[e.dtype]})
        zsum = part[2] if want_sum else _NULL
        args = [e, c, _NULL if bias is None else bias, targets, part[0], part[1], zsum,
                z_target, n, v, d, splits, per_split, cap]  # fmt: skip
        kernel((row_tiles * splits,), (THREADS,), args, FORWARD_SMEM)
    lse = torch.logsumexp(part[0] + part[1].log(), dim=0)
    return lse, z_target, part[2].sum(0) if want_sum else None


def cce_backward_cuda(
    e,
    c,
    bias,
    targets,
    lse,
    coef_softmax,
    coef_target,
    coef_uniform,
    softcap,
    filter_eps,
    need_bias_grad,
):
    """(dE [N, D] in e's dtype, dC [V, D] in c's dtype, dbias [V] in bias's dtype, empty unless
    ``need_bias_grad``) for the logit gradient
    g_ij = coef_softmax_i p_ij - coef_target_i [j = targets_i] - coef_uniform_i, p_ij =
    exp(z_ij - lse_i), times 1 - (z_ij / softcap)^2 when softcap is set (z capped).

    filter_eps (None: off): a (64-row, 128-entry) block is skipped when every
    |coef_softmax_i| p_ij in it is below filter_eps * max(|coef_softmax_i|, |coef_target_i|)
    (the reference's rule, relative to the row's gradient scale; rows whose coefficients are all
    0 do not count), none of its rows has its target in it and its rows' coef_uniform are 0.
    The vocabulary is then visited in ``vocab_order`` so that such blocks cluster. Accumulation
    in fp32 scratch (atomics), cast at the end."""
    op = "cce_backward_cuda"
    e, c, bias, targets = _operands(op, e, c, bias, targets)
    cap = _softcap(op, softcap)
    lse, coef_softmax, coef_target, coef_uniform = (
        _row_vector(op, name, t, e)
        for name, t in (
            ("lse", lse),
            ("coef_softmax", coef_softmax),
            ("coef_target", coef_target),
            ("coef_uniform", coef_uniform),
        )
    )
    if filter_eps is not None and not float(filter_eps) >= 0.0:
        raise ValueError(f"{op}: filter_eps must be None or >= 0, got {filter_eps}")
    n, d = e.shape
    v = c.shape[0]
    f32 = {"dtype": torch.float32, "device": e.device}
    de, dc = torch.zeros(n, d, **f32), torch.zeros(v, d, **f32)
    dbias = torch.zeros(v if need_bias_grad else 0, **f32)
    if n > 0:
        order = None if filter_eps is None else vocab_order(e, c, bias, coef_softmax)
        row_tiles = _cdiv(n, BLOCK_ROWS)
        grid = row_tiles * _cdiv(v, BLOCK_VOCAB)
        with torch.cuda.device(e.device):
            kernel = cuda.kernel("cce.cu", "cce_backward", {"CCE_T": _TYPES[e.dtype]})
            args = [e, c, _NULL if bias is None else bias, targets, lse, coef_softmax,
                    coef_target, coef_uniform, _NULL if order is None else order, de, dc,
                    dbias if need_bias_grad else _NULL, n, v, d, row_tiles, cap,
                    -1.0 if filter_eps is None else float(filter_eps),
                    _grad_scale(coef_softmax, coef_target, coef_uniform)]  # fmt: skip
            kernel((grid,), (THREADS,), args, BACKWARD_SMEM[e.dtype])
    bias_dtype = e.dtype if bias is None else bias.dtype
    return de.to(e.dtype), dc.to(c.dtype), dbias.to(bias_dtype)


def vocab_order(e, c, bias, coef_softmax) -> torch.Tensor:
    """int32 [V]: the vocabulary by decreasing mean logit over the rows, weighted by
    |coef_softmax| (the rows whose probabilities the filter tests). The mean of z_ij over i is
    linear in e_i, so one GEMV on the weighted mean embedding gives it exactly (before any
    softcap): O((N + V) D) instead of another pass over N x V."""
    w = coef_softmax.abs()
    w = w / w.sum().clamp_min(torch.finfo(torch.float32).tiny)  # convex: no overflow in fp16
    score = c @ (w.to(e.dtype) @ e)
    if bias is not None:
        score = score + bias
    return torch.argsort(score.float(), descending=True).to(torch.int32)


def _grad_scale(coef_softmax, coef_target, coef_uniform) -> torch.Tensor:
    """float32 [1] on the device (no host sync): 2^(14 - e) with 2^e >= max_i |coef_softmax_i|
    + |coef_target_i| + |coef_uniform_i|, a bound on |dz|."""
    peak = (coef_softmax.abs() + coef_target.abs() + coef_uniform.abs()).amax()
    _, exponent = torch.frexp(peak)  # peak < 2^exponent
    # Clamped so that absurdly small coefficients cannot push the scale past float32's range.
    return torch.exp2(GRAD_HEADROOM_LOG2 - exponent.clamp_min(-100).float()).reshape(1)


def _takes(e: torch.Tensor) -> bool:
    d = e.shape[1]  # D = 0 (logits all bias) goes to the reference
    return e.dtype in _TYPES and d > 0 and (d * e.element_size()) % 16 == 0 and cuda.is_available()


def forward(e, c, bias, targets, softcap, label_smoothing, z_loss, filter_eps):
    if not _takes(e):
        return reference.forward(e, c, bias, targets, softcap, label_smoothing, z_loss, filter_eps)
    vocab = c.shape[0]
    lse, target_logit, logit_sum = cce_forward_cuda(
        e, c, bias, targets, softcap, label_smoothing > 0
    )
    row = reference.row_loss(lse, target_logit, logit_sum, targets, vocab, label_smoothing, z_loss)
    return row, lse


def parts(e, c, bias, targets, softcap, want_sum):
    """reference.parts' arguments and results."""
    if not _takes(e):
        return reference.parts(e, c, bias, targets, softcap, want_sum)
    lse, target_logit, logit_sum = cce_forward_cuda(e, c, bias, targets, softcap, want_sum)
    return lse, target_logit, lse.new_empty(0) if logit_sum is None else logit_sum


def backward(e, c, bias, targets, lse, *args):
    """The op's arguments, as reference.backward's (and cce_backward_cuda's)."""
    if not _takes(e):
        return reference.backward(e, c, bias, targets, lse, *args)
    e, lse = reference.quiet_ignored_rows(e, lse, args[:3])
    return cce_backward_cuda(e, c, bias, targets, lse, *args)
