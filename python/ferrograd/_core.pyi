"""Type stubs for the Rust extension ``ferrograd._core``: kernels on CPU, contiguous torch tensors
(borrowed for the call; outputs are allocated by the caller). The packing functions take and
return numpy arrays of bytes and ids."""

import numpy as np
import numpy.typing as npt
import torch

__version__: str

def softmax_forward(
    x: torch.Tensor,
    out: torch.Tensor,
    outer: int,
    n: int,
    inner: int,
    log: bool = False,
) -> None:
    """Softmax (or log-softmax) of x seen as [outer, n, inner] over n, written into out
    (float32, bfloat16 or float16, both of one dtype)."""

def softmax_backward(
    y: torch.Tensor,
    grad_out: torch.Tensor,
    grad_in: torch.Tensor,
    outer: int,
    n: int,
    inner: int,
    log: bool = False,
) -> None:
    """The input gradient of softmax / log-softmax from its output y, written into grad_in
    (float32, bfloat16 or float16, all of one dtype)."""

def pack_documents(
    buffer: npt.NDArray[np.uint8],
    offsets: npt.NDArray[np.int64],
    seq_len: int,
    batch_size: int | None = None,
    offset: int = 4,
    add_bos: bool = True,
    add_eos: bool = True,
    split_long: bool = True,
    seed: int | None = None,
) -> dict[str, object]:
    """Packs documents buffer[offsets[d]:offsets[d+1]]: input_ids, targets, position_ids,
    document_ids (int64 [rows, seq_len]), cu_seqlens (int32), max_seqlen."""

def pack_pieces(
    buffer: npt.NDArray[np.uint8],
    starts: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
    flags: npt.NDArray[np.uint8],
    next_ids: npt.NDArray[np.int64],
    seq_len: int,
    batch_size: int,
    offset: int = 4,
    seed: int | None = None,
) -> dict[str, object]:
    """Packs ready-cut pieces (flags: 1 = BOS, 2 = EOS) into batch_size rows; "leftover" holds
    the indices of pieces that did not fit."""

def pack_tokens(
    ids: npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
    seq_len: int,
    labels: npt.NDArray[np.int64] | None = None,
    pad_id: int = 0,
    bos_id: int | None = None,
    eos_id: int | None = None,
    split_long: bool = True,
) -> dict[str, object]:
    """Packs documents of token ids ids[offsets[d]:offsets[d+1]] (labels, when given, are the
    targets instead of the ids; bos_id / eos_id added to every document): the arrays of
    pack_documents."""

def spam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    bias_corrections: tuple[float, float],
    warmup: float,
    spike_threshold: float | None,
    adaclip: tuple[float, float],
    grad_scale: float,
    mask: torch.Tensor | None,
) -> None:
    """spam_step_many on one parameter, its scalars as arguments."""

def spam_step_many(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    bias_corrections: tuple[float, float],
    warmup: float,
    spike_threshold: float | None,
    adaclips: list[tuple[float, float]],
    grad_scales: list[float],
    masks: list[torch.Tensor | None],
) -> None:
    """One fused step in place on every float32 or bfloat16 parameter of ``params`` (one dtype;
    gradients of it) with float32 moments, in one parallel region: the scalars shared but
    AdaClip's (bound, ratio) and AdaGN's scale per parameter. With a mask (1 bit per element)
    the moments are compact, for the marked coordinates only; the others get weight decay alone.
    """

def adaclip_stats_many(
    grads: list[torch.Tensor],
    max_abs: list[float | None],
    running_maxes: list[float],
    gamma3: float,
    correction: float,
) -> list[tuple[float, float, float, float, float]]:
    """Stable-SPAM's AdaClip statistics of float32 or bfloat16 gradients (one dtype) in one
    call, their chunks in one parallel region: per gradient (max |g| or max_abs when given,
    running max, bound, ratio, sum of squares of the clipped gradient)."""

def sample_mask(numel: int, k: int, rng_state: int) -> tuple[npt.NDArray[np.uint8], int]:
    """Exactly k of numel coordinates as a bitmask, and the advanced generator state."""

def set_num_threads(n: int, pin: bool = True) -> None: ...
def get_num_threads() -> int: ...
def simd_level() -> str: ...
def cpu_info() -> dict[str, object]: ...
def advise_huge_pages(t: torch.Tensor) -> bool: ...
def shiftquant_quantize(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    shifts: torch.Tensor,
    len: int,
    bits: int,
    group_size: int,
    seed: int | None = None,
    transposed: bool = False,
    col_sums: torch.Tensor | None = None,
) -> None:
    """ShiftQuant codes of x (float32 or bfloat16) along the reduction length len: x is
    [rows, len], or with transposed [len, cols] (output row c is column c); seed None rounds to
    nearest; col_sums (float32 [cols], transposed only): x's column sums."""

def shiftquant_dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    shifts: torch.Tensor,
    group_size: int,
    out: torch.Tensor,
) -> None:
    """codes * scale * 2^-shift into out."""

def shiftquant_matmul(
    a_codes: torch.Tensor,
    a_scale: torch.Tensor,
    a_shifts: torch.Tensor,
    b_codes: torch.Tensor,
    b_scale: torch.Tensor,
    b_shifts: torch.Tensor,
    k: int,
    group_size: int,
    out: torch.Tensor,
    bias: torch.Tensor | None = None,
    packed_b: torch.Tensor | None = None,
) -> None:
    """out [M, N] = A · Bᵀ (+ bias) in integer arithmetic, operands quantized along K; out
    float32 or bfloat16 (rounded to nearest even); packed_b (shiftquant_pack_weight of B)
    spares packing B."""

def shiftquant_packed_weight_bytes(n: int, k: int, group_size: int) -> int:
    """The bytes shiftquant_pack_weight writes for an N x K weight on this CPU."""

def shiftquant_pack_weight(
    codes: torch.Tensor,
    scale: torch.Tensor,
    shifts: torch.Tensor,
    k: int,
    group_size: int,
    out: torch.Tensor,
) -> None:
    """A weight [N, K] quantized along K packed into out (uint8) as shiftquant_matmul's
    packed_b."""

def l1_norm_forward(
    x: torch.Tensor,
    n: int,
    eps: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> None:
    """L1 LayerNorm of x [rows, n] into out (float32, bfloat16 or float16 rows, one dtype);
    saves per-row float32 mean and rstd."""

def l1_norm_backward(
    x: torch.Tensor,
    n: int,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    grad_out: torch.Tensor,
    weight: torch.Tensor | None,
    grad_in: torch.Tensor,
    grad_weight: torch.Tensor | None = None,
    grad_bias: torch.Tensor | None = None,
) -> None:
    """Gradients of L1 LayerNorm from the saved x, mean and rstd."""

def l1_rms_norm_forward(
    x: torch.Tensor,
    n: int,
    eps: float,
    weight: torch.Tensor | None,
    out: torch.Tensor,
    rstd: torch.Tensor,
) -> None:
    """L1 RMSNorm of x [rows, n] into out (rows as in l1_norm_forward); saves per-row rstd."""

def l1_rms_norm_backward(
    x: torch.Tensor,
    n: int,
    rstd: torch.Tensor,
    grad_out: torch.Tensor,
    weight: torch.Tensor | None,
    grad_in: torch.Tensor,
    grad_weight: torch.Tensor | None = None,
) -> None:
    """Gradients of L1 RMSNorm from the saved x and rstd."""

def l1_norm_forward_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    shifts: torch.Tensor,
    group_size: int,
    n: int,
    eps: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> None:
    """L1 LayerNorm from ShiftQuant codes, the statistics exact in integers."""

def l1_norm_backward_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    shifts: torch.Tensor,
    group_size: int,
    n: int,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    grad_out: torch.Tensor,
    weight: torch.Tensor | None,
    grad_in: torch.Tensor,
    grad_weight: torch.Tensor | None = None,
    grad_bias: torch.Tensor | None = None,
) -> None: ...

# cut cross-entropy: one vocabulary chunk of logits [rows, width] (float32 or bfloat16) per call
def cce_forward_chunk(
    logits: torch.Tensor,
    width: int,
    v0: int,
    targets: torch.Tensor,
    lse: torch.Tensor,
    target_logit: torch.Tensor,
    logit_sum: torch.Tensor | None = None,
    softcap: float | None = None,
) -> None:
    """Folds the chunk into the running lse, target logits and logit sums (softcap in place)."""

def cce_backward_chunk(
    logits: torch.Tensor,
    width: int,
    v0: int,
    targets: torch.Tensor,
    lse: torch.Tensor,
    coef_softmax: torch.Tensor,
    coef_target: torch.Tensor,
    coef_uniform: torch.Tensor,
    softcap: float | None = None,
) -> float:
    """Turns the raw chunk into the logit gradient in place; returns its relative peak."""

def cce_loss_grad_rows(
    logits: torch.Tensor,
    width: int,
    targets: torch.Tensor,
    lse: torch.Tensor,
    target_logit: torch.Tensor,
    logit_sum: torch.Tensor | None,
    peaks: torch.Tensor,
    piece: int,
    scale: float,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None = None,
) -> None:
    """Rows over the whole vocabulary: lse, target logit, logit sum, then in place the
    gradient of scale x the summed row losses; per piece of columns its relative peak."""

# W4: stored codes 0..15 (q + 8 when symmetric), the CPU layout of ferrograd/ops/w4a16/weight.py
def w4_quantize(
    weight: torch.Tensor,
    n: int,
    k: int,
    group_size: int,
    zero_point: bool,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
) -> None:
    """Codes straight into the CPU layout; NaN or infinity in weight is a ValueError."""

def w4_gemv(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    n: int,
    k: int,
    group_size: int,
    x: torch.Tensor,
    y: torch.Tensor,
) -> None:
    """y [m, n] = x [m, k] @ W_hat.T by the GEMV (group size a multiple of 32); x float32
    or bfloat16; scales float32, float16 or bfloat16, read as they are; y float32, or
    bfloat16 (rounded once from the float32 sums)."""

def w4_gemm(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    n: int,
    k: int,
    group_size: int,
    x: torch.Tensor,
    y: torch.Tensor,
) -> bool:
    """y [m, n] = x [m, k] @ W_hat.T by the AVX-512 GEMM on CPUs with AVX-512 BF16 (y float32
    or bfloat16, as w4_gemv); False (y untouched) where the CPU or the group size does not
    allow it."""

def w4_gemm_arith() -> str:
    """The GEMM's multiply on this CPU: "bf16" (vdpbf16ps) or "fma" (float32 multiply-adds)."""

def w4_dequantize(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    n: int,
    k: int,
    group_size: int,
    row0: int,
    row1: int,
    out: torch.Tensor,
) -> None: ...
def kernel_sources() -> dict[str, str]:
    """File name -> source of the CUDA kernels embedded from kernels/."""
