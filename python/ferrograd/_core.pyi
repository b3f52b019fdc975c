"""Type stubs for the Rust extension ``ferrograd._core`` (kernels on flat float32 arrays)."""

import numpy as np
import numpy.typing as npt

__version__: str

def softmax_forward(
    x: npt.NDArray[np.float32],
    out: npt.NDArray[np.float32],
    outer: int,
    n: int,
    inner: int,
    log: bool = False,
) -> None:
    """Softmax (or log-softmax) of x seen as [outer, n, inner] over n, written into out."""

def softmax_backward(
    y: npt.NDArray[np.float32],
    grad_out: npt.NDArray[np.float32],
    grad_in: npt.NDArray[np.float32],
    outer: int,
    n: int,
    inner: int,
    log: bool = False,
) -> None:
    """The input gradient of softmax / log-softmax from its output y, written into grad_in."""

def softmax_three_pass(
    x: npt.NDArray[np.float32],
    out: npt.NDArray[np.float32],
    n: int,
    variant: str = "reload",
) -> None:
    """The classic three-pass softmax over contiguous rows of length n (benchmark baseline)."""

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

def spam_step(
    param: npt.NDArray[np.float32],
    grad: npt.NDArray[np.float32],
    exp_avg: npt.NDArray[np.float32],
    exp_avg_sq: npt.NDArray[np.float32],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    bias_corrections: tuple[float, float],
    warmup: float = 1.0,
    spike_threshold: float | None = None,
    adaclip: tuple[float, float] = ...,
    grad_scale: float = 1.0,
    mask: npt.NDArray[np.uint8] | None = None,
) -> None:
    """One fused SPAM-family step in place; with mask (1 bit per element) the moments are
    compact for the marked coordinates and the others get weight decay only."""

def sample_mask(numel: int, k: int, rng_state: int) -> tuple[npt.NDArray[np.uint8], int]:
    """Exactly k of numel coordinates as a bitmask, and the advanced generator state."""

def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def simd_level() -> str: ...
def cpu_info() -> dict[str, object]: ...
def measured_clock_hz() -> float | None: ...
def _panic_for_test(message: str, parallel: bool = False) -> None: ...
def shiftquant_quantize(
    x: npt.NDArray[np.float32],
    codes: npt.NDArray[np.int8],
    scale: npt.NDArray[np.float32],
    shifts: npt.NDArray[np.uint8],
    len: int,
    bits: int,
    group_size: int,
    seed: int | None = None,
    transposed: bool = False,
) -> None:
    """ShiftQuant codes of x along the reduction length len: x is [rows, len], or with
    transposed [len, cols] (output row c is column c); seed None rounds to nearest."""

def shiftquant_dequantize(
    codes: npt.NDArray[np.int8],
    scale: npt.NDArray[np.float32],
    shifts: npt.NDArray[np.uint8],
    group_size: int,
    out: npt.NDArray[np.float32],
) -> None:
    """codes * scale * 2^-shift into out."""

def shiftquant_matmul(
    a_codes: npt.NDArray[np.int8],
    a_scale: npt.NDArray[np.float32],
    a_shifts: npt.NDArray[np.uint8],
    b_codes: npt.NDArray[np.int8],
    b_scale: npt.NDArray[np.float32],
    b_shifts: npt.NDArray[np.uint8],
    k: int,
    group_size: int,
    out: npt.NDArray[np.float32],
    bias: npt.NDArray[np.float32] | None = None,
) -> None:
    """out [M, N] = A · Bᵀ (+ bias) in integer arithmetic, operands quantized along K."""

def l1_norm_forward_f32(
    x: npt.NDArray[np.float32],
    n: int,
    eps: float,
    weight: npt.NDArray[np.float32] | None,
    bias: npt.NDArray[np.float32] | None,
    out: npt.NDArray[np.float32],
    mean: npt.NDArray[np.float32],
    rstd: npt.NDArray[np.float32],
) -> None:
    """L1 LayerNorm of x [rows, n]; saves per-row mean and rstd for the backward."""

def l1_norm_backward_f32(
    x: npt.NDArray[np.float32],
    n: int,
    mean: npt.NDArray[np.float32],
    rstd: npt.NDArray[np.float32],
    grad_out: npt.NDArray[np.float32],
    weight: npt.NDArray[np.float32] | None,
    grad_in: npt.NDArray[np.float32],
    grad_weight: npt.NDArray[np.float32] | None = None,
    grad_bias: npt.NDArray[np.float32] | None = None,
) -> None: ...
def l1_norm_forward_f64(
    x: npt.NDArray[np.float64],
    n: int,
    eps: float,
    weight: npt.NDArray[np.float64] | None,
    bias: npt.NDArray[np.float64] | None,
    out: npt.NDArray[np.float64],
    mean: npt.NDArray[np.float64],
    rstd: npt.NDArray[np.float64],
) -> None: ...
def l1_norm_backward_f64(
    x: npt.NDArray[np.float64],
    n: int,
    mean: npt.NDArray[np.float64],
    rstd: npt.NDArray[np.float64],
    grad_out: npt.NDArray[np.float64],
    weight: npt.NDArray[np.float64] | None,
    grad_in: npt.NDArray[np.float64],
    grad_weight: npt.NDArray[np.float64] | None = None,
    grad_bias: npt.NDArray[np.float64] | None = None,
) -> None: ...
def l1_norm_forward_codes(
    codes: npt.NDArray[np.int8],
    scale: npt.NDArray[np.float32],
    shifts: npt.NDArray[np.uint8],
    group_size: int,
    n: int,
    eps: float,
    weight: npt.NDArray[np.float32] | None,
    bias: npt.NDArray[np.float32] | None,
    out: npt.NDArray[np.float32],
    mean: npt.NDArray[np.float32],
    rstd: npt.NDArray[np.float32],
) -> None:
    """L1 LayerNorm from ShiftQuant codes, the statistics exact in integers."""

def l1_norm_backward_codes(
    codes: npt.NDArray[np.int8],
    scale: npt.NDArray[np.float32],
    shifts: npt.NDArray[np.uint8],
    group_size: int,
    n: int,
    mean: npt.NDArray[np.float32],
    rstd: npt.NDArray[np.float32],
    grad_out: npt.NDArray[np.float32],
    weight: npt.NDArray[np.float32] | None,
    grad_in: npt.NDArray[np.float32],
    grad_weight: npt.NDArray[np.float32] | None = None,
    grad_bias: npt.NDArray[np.float32] | None = None,
) -> None: ...

# cut cross-entropy: one vocabulary chunk of logits [rows, width] per call
def cce_forward_chunk(
    logits: npt.NDArray[np.float32],
    width: int,
    v0: int,
    targets: npt.NDArray[np.int64],
    lse: npt.NDArray[np.float64],
    target_logit: npt.NDArray[np.float32],
    logit_sum: npt.NDArray[np.float64] | None = None,
    softcap: float | None = None,
) -> None:
    """Folds the chunk into the running lse, target logits and logit sums (softcap in place)."""

def cce_backward_chunk(
    logits: npt.NDArray[np.float32],
    width: int,
    v0: int,
    targets: npt.NDArray[np.int64],
    lse: npt.NDArray[np.float32],
    coef_softmax: npt.NDArray[np.float32],
    coef_target: npt.NDArray[np.float32],
    coef_uniform: npt.NDArray[np.float32],
    softcap: float | None = None,
) -> float:
    """Turns the raw chunk into the logit gradient in place; returns its relative peak."""

# W4: stored codes 0..15 (q + 8 when symmetric), the CPU layout of ferrograd.quant.w4
def w4_quantize(
    weight: npt.NDArray[np.float32],
    n: int,
    k: int,
    group_size: int,
    zero_point: bool,
    codes: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float32],
    zeros: npt.NDArray[np.uint8],
) -> None: ...
def w4_pack(
    codes: npt.NDArray[np.uint8],
    packed: npt.NDArray[np.uint8],
    n: int,
    k: int,
    unpack: bool = False,
) -> None: ...
def w4_gemv(
    packed: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float32],
    zeros: npt.NDArray[np.uint8],
    n: int,
    k: int,
    group_size: int,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.float32],
) -> None:
    """y [m, n] = x [m, k] @ W_hat.T (group size a multiple of 32)."""

def w4_dequantize(
    packed: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float32],
    zeros: npt.NDArray[np.uint8],
    n: int,
    k: int,
    group_size: int,
    row0: int,
    row1: int,
    out: npt.NDArray[np.float32],
) -> None: ...
def kernel_sources() -> dict[str, str]:
    """File name -> source of the CUDA kernels embedded from kernels/."""
