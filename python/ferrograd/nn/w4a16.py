"""A Linear layer with a frozen 4-bit weight (W4A16)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.w4a16 import W4Weight, quantize_w4, w4a16_linear
from ..ops.w4a16.weight import CPU_BLOCKS, convert, native_layout
from ._own import own
from ._swap import frozen_as

__all__ = ["W4A16Linear"]

#: The integer type of each scale dtype's width (scales move between devices as these).
_SCALE_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


class W4A16Linear(nn.Module):
    """y = (x * input_scale) @ W_hat.T + bias with W_hat a 4-bit weight (``fg.quant.W4Weight``).

    The weight's packed codes, scales and zeros are buffers (they follow ``.to()`` and
    ``state_dict()``); the weight is frozen and gradients reach the input and the bias.
    ``input_scale`` (1 / s, from SmoothQuant+ smoothing that could not be folded into a
    preceding norm) is None when there is none.

    ``packed`` is kept in the layout of the device it is on (``layout``; moving the module
    repacks it), while ``state_dict()`` always holds the ``"cpu_blocks"`` layout, so a checkpoint
    loads on any device.
    """

    def __init__(
        self,
        weight: W4Weight,
        bias: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        weight = weight.with_layout(native_layout(weight.device))
        self.out_features, self.in_features = weight.shape
        self.group_size, self.weight_dtype = weight.group_size, weight.dtype
        self.layout = weight.layout
        self.register_buffer("packed", weight.packed)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zeros", weight.zeros)
        self.register_buffer("input_scale", input_scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @property
    def weight(self) -> W4Weight:
        """The 4-bit weight over the current buffers."""
        shape = (self.out_features, self.in_features)
        return W4Weight(
            self.packed, self.scales, self.zeros, shape, self.group_size, self.weight_dtype,
            self.layout,
        )  # fmt: skip

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group_size: int = 128, smooth: torch.Tensor | None = None
    ) -> W4A16Linear:
        """Quantizes ``linear.weight`` (times ``smooth`` per input channel, positive and finite,
        whose inverse then scales the input) to 4 bits with zero points."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"W4A16Linear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}"
            )
        weight = linear.weight.detach()
        input_scale = None
        if smooth is not None:
            if not isinstance(smooth, torch.Tensor):
                raise TypeError(
                    f"W4A16Linear.from_linear: smooth must be a tensor, got {type(smooth).__name__}"
                )
            if smooth.shape != (linear.in_features,):
                raise ValueError(
                    f"W4A16Linear.from_linear: smooth must have shape [in_features] = "
                    f"[{linear.in_features}], got {tuple(smooth.shape)}"
                )
            # The input is divided by smooth: a 0 (or inf, NaN) would make the layer NaN.
            if not bool(((smooth > 0) & smooth.isfinite()).all()):
                raise ValueError(
                    "W4A16Linear.from_linear: smooth must be positive and finite everywhere"
                )
            smooth = smooth.detach().to(weight.device, torch.float32)
            weight = (weight.float() * smooth).to(weight.dtype)
            input_scale = (1.0 / smooth).to(weight.dtype)
        return frozen_as(cls(quantize_w4(weight, group_size), linear.bias, input_scale), linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_scale = own(self, "input_scale")
        if input_scale is not None:
            x = x * input_scale.to(x.dtype)
        shape = (self.out_features, self.in_features)
        packed, scales, zeros = own(self, "packed"), own(self, "scales"), own(self, "zeros")
        return w4a16_linear(
            x, packed, scales, zeros, shape, self.group_size, self.layout, own(self, "bias")
        )

    def _apply(self, fn, recurse=True):
        # The scales travel as integers, so that .half() / .to(dtype) move them but keep the
        # dtype the quantizer stored them in (float32 where a 16-bit type cannot hold them).
        dtype = self.scales.dtype
        self.scales = self.scales.view(_SCALE_BITS[dtype])
        super()._apply(fn, recurse)
        self.scales = self.scales.view(dtype)
        layout = native_layout(self.packed.device)
        if layout != self.layout:  # moved between CUDA and another device
            self.packed = convert(self.packed, self.layout, layout, self.in_features)
            self.layout = layout
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout != CPU_BLOCKS:
            destination[prefix + "packed"] = convert(
                self.packed, self.layout, CPU_BLOCKS, self.in_features
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        scales = state_dict.get(prefix + "scales")
        if isinstance(scales, torch.Tensor) and scales.dtype in _SCALE_BITS:
            # Loaded in the checkpoint's dtype: copying float32 scales into float16 ones
            # could flush or overflow them.
            self.scales = torch.empty_like(self.scales, dtype=scales.dtype)
        key = prefix + "packed"
        if self.layout != CPU_BLOCKS and key in state_dict:
            # load_state_dict passes a copy of the caller's dict.
            state_dict[key] = convert(state_dict[key], CPU_BLOCKS, self.layout, self.in_features)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, "
            f"input_scale={self.input_scale is not None}"
        )
