"""FSDP2 all-gathers ShiftQuantLinear weights as ShiftQuant codes instead of floats.

``compress_all_gather(model)`` (before ``fully_shard``) wraps every ShiftQuantLinear weight in
:class:`ShiftQuantWeight`, a tensor subclass that FSDP2's all-gather extension hooks
(``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``) recognize. Each rank quantizes its own
rows of the weight exactly as the layer's forward does (round to nearest, the layer's bits and
group size: rows are independent, so the codes of a shard are the codes of those rows of the
whole weight) and sends per row K code bytes, the float32 scale and one shift byte per group:
about a quarter of the float32 bytes (half of bf16). The receiving side dequantizes, so the
module sees a float weight; its forward quantizes that again and gets the same codes (the
dequantized values are exact multiples of the row's step), so the forward is the
uncompressed one up to the last bit of the scale. The weight gradient is reduced in float as
usual; the backward's transposed weight codes are quantized from the dequantized weight, a
difference of at most half a code step per element.

Weights whose rows do not split evenly over the mesh are refused (FSDP2 would need padded
inputs of the parameter's own shape).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..ops.shiftquant import ShiftQuantTensor, shiftquant
from .shiftquant import ShiftQuantLinear

__all__ = ["AllGatherBytes", "ShiftQuantWeight", "all_gather_bytes", "compress_all_gather"]

OP = "compress_all_gather"

# Ops whose results stay ShiftQuantWeight (FSDP2 shards, copies and views the parameter with
# these); every other op returns plain tensors.
_KEEP = {
    torch.ops.aten.empty_like.default,
    torch.ops.aten.new_zeros.default,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.copy_.default,
    torch.ops.aten.view.default,
    torch.ops.aten.as_strided.default,
    torch.ops.aten._to_copy.default,
    torch.ops.aten._pin_memory.default,
    torch.ops.aten.split.Tensor,
    torch.ops.aten.clone.default,
    torch.ops.aten.detach.default,
}


class ShiftQuantWeight(torch.Tensor):
    """A float weight (``data``) that FSDP2 all-gathers as ShiftQuant codes of ``bits`` bits
    in groups of ``group_size`` along its rows."""

    @staticmethod
    def __new__(cls, data: torch.Tensor, bits: int, group_size: int):
        return torch.Tensor._make_wrapper_subclass(
            cls,
            data.shape,
            strides=data.stride(),
            storage_offset=data.storage_offset(),
            dtype=data.dtype,
            layout=data.layout,
            device=data.device,
            requires_grad=data.requires_grad,
        )

    def __init__(self, data: torch.Tensor, bits: int, group_size: int) -> None:
        self.data_ = data
        self.bits, self.group_size = bits, group_size

    def __repr__(self) -> str:
        return f"ShiftQuantWeight(bits={self.bits}, group_size={self.group_size}, {self.data_!r})"

    def __tensor_flatten__(self):
        return ["data_"], (self.bits, self.group_size)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return ShiftQuantWeight(inner["data_"], *meta)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        spec = None

        def unwrap(t: ShiftQuantWeight) -> torch.Tensor:
            nonlocal spec
            spec = (t.bits, t.group_size)
            return t.data_

        args, kwargs = pytree.tree_map_only(ShiftQuantWeight, unwrap, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if func not in _KEEP:
            return out
        return pytree.tree_map_only(torch.Tensor, lambda t: ShiftQuantWeight(t, *spec), out)

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """This shard's rows as one uint8 tensor [rows, K + 4 + groups]: codes, the float32
        scale's bytes, the shifts."""
        if outer_size[0] % mesh.size():
            raise ValueError(
                f"{OP}: a weight of {outer_size[0]} rows does not split evenly over "
                f"{mesh.size()} ranks; leave it uncompressed"
            )
        with torch.no_grad():
            q = shiftquant(self.data_, bits=self.bits, group_size=self.group_size)
        rows = q.codes.shape[0]
        packed = torch.cat(
            [
                q.codes.view(torch.uint8),
                q.scale.float().contiguous().view(torch.uint8).view(rows, 4),
                q.shifts.view(torch.uint8).reshape(rows, -1),
            ],
            dim=1,
        )
        return (packed,), (self.data_.shape[1], q.shifts.reshape(rows, -1).shape[1])

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        """The whole weight, dequantized to ``param_dtype`` (into ``out`` after the first)."""
        (packed,) = outputs
        k, groups = metadata
        rows = packed.shape[0]
        q = ShiftQuantTensor(
            codes=packed[:, :k].contiguous().view(torch.int8),
            scale=packed[:, k : k + 4].contiguous().view(torch.float32).view(rows),
            shifts=packed[:, k + 4 : k + 4 + groups].contiguous(),
            bits=self.bits,
            group_size=self.group_size,
        )
        weight = q.dequantize().to(param_dtype)
        if out is not None:
            # The backward's re-gather refills the weight the forward saved: the same values,
            # so autograd's version check must not count it as a modification.
            with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(out):
                out.copy_(weight)
            return None
        return weight, (weight,)


def compress_all_gather(model: nn.Module) -> nn.Module:
    """Wraps the weight of every ShiftQuantLinear in ``model`` (in place) so that FSDP2's
    ``fully_shard``, applied afterwards, all-gathers it as ShiftQuant codes; returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{OP}: model must be an nn.Module, got {type(model).__name__}")
    found = False
    for module in model.modules():
        if isinstance(module, ShiftQuantLinear):
            found = True
            w = module.weight
            if not isinstance(w.data, ShiftQuantWeight):
                wrapped = ShiftQuantWeight(w.detach(), module.bits, module.group_size)
                module.weight = nn.Parameter(wrapped, requires_grad=w.requires_grad)
    if not found:
        raise ValueError(f"{OP}: model holds no ShiftQuantLinear")
    return model


class AllGatherBytes:
    """What :func:`all_gather_bytes` counted: ``bytes`` handed to the all-gather so far."""

    def __init__(self) -> None:
        self.bytes = 0


@contextlib.contextmanager
def all_gather_bytes() -> Iterator[AllGatherBytes]:
    """Counts the bytes this process hands to FSDP2's all-gather inside the block, to measure
    what :func:`compress_all_gather` saves. Replaces the function for the whole process while
    it runs: ``torch.distributed.all_gather_single``, or ``all_gather_into_tensor`` in the torch
    releases that lack it (FSDP2 called that one before)."""
    import torch.distributed as dist

    name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    counted, all_gather = AllGatherBytes(), getattr(dist, name)

    def counting(output_tensor, input_tensor, *args, **kwargs):
        counted.bytes += input_tensor.numel() * input_tensor.element_size()
        return all_gather(output_tensor, input_tensor, *args, **kwargs)

    setattr(dist, name, counting)
    try:
        yield counted
    finally:
        setattr(dist, name, all_gather)
