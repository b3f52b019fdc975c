"""Vocabulary-parallel cut cross-entropy: ``linear_cross_entropy(..., process_group=pg)``.

Rank r of the group holds rows offset_r .. offset_r + V_r of the classifier (c and bias), shards
in rank order, shard sizes free (gathered at each call); e and targets (global ids) are the same
on every rank. Each rank folds its shard into three numbers per row with the chunk loop of the
unsharded op (op ``ferrograd::linear_cross_entropy_parts``: lse_r, the target logit where the
target is in the shard, the logit sum), never holding more than a chunk of logits; one
all-gather of those [3, N] pieces lets every rank combine them into the full row loss:
lse = logsumexp_r lse_r, z[t] from the owning rank, sum_j z_ij = sum_r of the shards' sums.

The backward is the unsharded one restricted to the shard: the logit gradient of the shard's
columns, dz_ij = a_i exp(z_ij - lse_i) - b_i [j = t_i] - u_i, needs only the global lse and
the row coefficients, which every rank has. dC and dbias stay local; each rank's dE is its shard's
share, all-reduced (summed) over the group, as in tensor parallelism where e is replicated.

Before any check or collective the ranks agree: one all_gather_object of each rank's shard
size and a fingerprint of what decides the checks (options, shapes, dtypes, devices, targets,
autocast, whether e needs a gradient). Ranks that disagree raise on every rank; ranks that
agree then pass or fail the checks alike, so that none is left waiting in a collective. The
path is eager (the agreement reads the data); every rank must run the backward when one does,
and pass the same group.

A DTensor classifier sharded on dim 0 over a 1-D device mesh (torch.chunk's shards) is the same
call on its local shard with the mesh's group (``local_shards``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import _library
from . import cpu, cuda, reference

__all__ = ["Shard", "agree", "is_dtensor", "linear_cross_entropy_parts_op", "local_shards"]

OP = "linear_cross_entropy"
#: The options every rank passes to ``agree``, in this order.
OPTIONS = ("ignore_index", "reduction", "shift", "softcap", "label_smoothing", "z_loss",
           "return_lse", "filter_eps")  # fmt: skip


def _parts_fake(e, c, bias, targets, softcap, want_sum):
    kd = reference.compute_dtype(e.dtype)
    rows = e.shape[0]
    return (
        e.new_empty(rows, dtype=kd),
        e.new_empty(rows, dtype=kd),
        e.new_empty(rows if want_sum else 0, dtype=kd),
    )


linear_cross_entropy_parts_op = _library.define(
    "linear_cross_entropy_parts(Tensor e, Tensor c, Tensor? bias, Tensor targets, "
    "float? softcap, bool want_sum) -> (Tensor, Tensor, Tensor)",
    cpu=cpu.parts,
    cuda=cuda.parts,
    reference=reference.parts,
    fake=_parts_fake,
)
"""Per row of e [N, D] against c [V, D] (targets [N], -1: none in c): (lse, target logit,
logit sum, empty unless ``want_sum``) in the compute dtype, the pieces the op
``linear_cross_entropy`` turns into the row loss; the target logit of a row without a target
is 0."""


@dataclass(frozen=True)
class Shard:
    """This rank's part of the vocabulary, as the ranks agreed on it."""

    group: dist.ProcessGroup
    rank: int
    world: int
    offset: int
    vocab: int  # the whole vocabulary

    def call(self, op, e, c, bias, targets, softcap, label_smoothing, z_loss, filter_eps):
        """What ``_library.call(op, ...)`` gives for ``op`` = ferrograd::linear_cross_entropy
        (the call this one replaces) on the whole vocabulary: (row loss, lse) per row of e
        [N, D] for global targets [N] (-1: ignored)."""
        return _VocabParallel.apply(
            e, c, bias, targets, self, softcap, label_smoothing, z_loss, filter_eps
        )


class _VocabParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, e, c, bias, targets, shard, softcap, label_smoothing, z_loss, filter_eps):
        local = targets - shard.offset
        local = torch.where((local >= 0) & (local < c.shape[0]), local, -1)
        want_sum = label_smoothing > 0
        lse, target_logit, logit_sum = _library.call(
            linear_cross_entropy_parts_op, e, c, bias, local, softcap, want_sum
        )
        mine = torch.stack([lse, target_logit] + ([logit_sum] if want_sum else []))
        parts = mine.new_empty(shard.world * mine.shape[0], mine.shape[1])
        dist.all_gather_into_tensor(parts, mine, group=shard.group)
        parts = parts.view(shard.world, *mine.shape)
        # float64 combine: the unsharded loop folds in float64 too.
        lse = torch.logsumexp(parts[:, 0].double(), 0).to(mine.dtype)
        target_logit = parts[:, 1].sum(0)
        logit_sum = parts[:, 2].double().sum(0).to(mine.dtype) if want_sum else None
        row = reference.row_loss(
            lse, target_logit, logit_sum, targets, shard.vocab, label_smoothing, z_loss
        )
        ctx.save_for_backward(e, c, bias, targets, local, lse)
        ctx.options = shard, softcap, label_smoothing, z_loss, filter_eps
        return row, lse

    @staticmethod
    def backward(ctx, grad_row, grad_lse):
        e, c, bias, targets, local, lse = ctx.saved_tensors
        shard, softcap, label_smoothing, z_loss, filter_eps = ctx.options
        coefs = reference.coefficients(
            grad_row, grad_lse, lse, targets >= 0, label_smoothing, z_loss, shard.vocab
        )
        de, dc, dbias = _library.call(
            torch.ops.ferrograd.linear_cross_entropy_backward.default,
            e, c, bias, local, lse, *coefs, softcap, filter_eps, bias is not None,
        )  # fmt: skip
        if ctx.needs_input_grad[0]:  # the same on every rank (agree() compared it)
            dist.all_reduce(de, group=shard.group)
        return de, dc, None if bias is None else dbias, *(None,) * 6


def is_dtensor(x: object) -> bool:
    """Whether x is a DTensor (DTensor is imported for tensor subclasses only)."""
    if type(x) in (torch.Tensor, torch.nn.Parameter):
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def local_shards(e, c, bias):
    """(e, c, bias, group) for a DTensor classifier c sharded on dim 0 over a 1-D device mesh
    (bias: None or sharded like c; e: a plain tensor or replicated on that mesh): their local
    tensors, through which the gradients flow back to the DTensors, and the mesh's group."""
    from torch.distributed.tensor import DTensor, Shard

    mesh = c.device_mesh
    if mesh.ndim != 1 or tuple(c.placements) != (Shard(0),):
        raise ValueError(
            f"{OP}: a DTensor c must be sharded on dim 0 over a 1-D device mesh (the vocabulary "
            f"split over the ranks), got placements {tuple(c.placements)} on a {mesh.ndim}-D mesh"
        )
    if bias is not None:
        if not (
            isinstance(bias, DTensor)
            and bias.device_mesh == mesh
            and bias.placements == c.placements
        ):
            raise ValueError(f"{OP}: with a DTensor c, bias must be None or a DTensor sharded as c")
        bias = bias.to_local()
    if isinstance(e, DTensor):
        if e.device_mesh != mesh or not all(p.is_replicate() for p in e.placements):
            raise ValueError(
                f"{OP}: with a DTensor c, e must be a tensor or replicated on c's mesh"
            )
        e = e.to_local()
    return e, c.to_local(), bias, mesh.get_group()


def _group_rank(group: object) -> tuple[int, int]:
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"{OP}: process_group must be a torch.distributed.ProcessGroup or None, "
            f"got {type(group).__name__}"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{OP}: this process is not a member of process_group")
    return rank, dist.get_world_size(group)


def _describe(x: object, skip_dim0: bool = False) -> str:
    if not isinstance(x, torch.Tensor):
        return type(x).__name__
    shape = ("V_r", *x.shape[1:]) if skip_dim0 and x.dim() else tuple(x.shape)
    return f"{type(x).__name__} {x.dtype} {shape} on {x.device.type}"


def _fingerprint(e, c, targets, bias, options) -> list[tuple[str, str]]:
    """(name, value) of what decides the unsharded function's checks, this rank's shard size
    aside: the ranks must have the same of each."""
    tensors = isinstance(e, torch.Tensor) and isinstance(c, torch.Tensor)
    facts = dict(zip(OPTIONS, options, strict=True))
    facts |= {"e": _describe(e), "c": _describe(c, True), "targets": _describe(targets)}
    facts["bias"] = _describe(bias, True)
    if tensors:
        facts["c has rows"] = c.dim() > 0 and c.shape[0] > 0
        facts["bias has c's rows"] = (
            isinstance(bias, torch.Tensor) and bias.shape[:1] == c.shape[:1]
        )
        facts["every tensor on e's device"] = all(
            t.device == e.device for t in (c, targets, bias) if isinstance(t, torch.Tensor)
        )
        device = e.device.type
        facts["autocast"] = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)
        facts["e.requires_grad"] = torch.is_grad_enabled() and e.requires_grad
    if isinstance(targets, torch.Tensor) and not targets.is_complex():
        flat = targets.reshape(-1).long()
        # Position-weighted sum: different targets, permutations included, in one pass.
        weights = torch.arange(1, flat.numel() + 1, device=flat.device)
        facts["targets' values (weighted sum)"] = int((flat * weights).sum())
    return [(name, repr(value)) for name, value in facts.items()]


def agree(process_group, e, c, targets, bias, options) -> Shard:
    """The ranks' agreement before anything that could fail on one rank only or any
    collective: every rank calls it once per loss with its arguments, unchecked, and the
    options (ignore_index, reduction, shift, softcap, label_smoothing, z_loss, return_lse,
    filter_eps). Raises on every rank when they disagree; otherwise returns this rank's shard,
    whose checks then pass or fail alike on every rank."""
    rank, world = _group_rank(process_group)
    mine = _fingerprint(e, c, targets, bias, options)
    size = c.shape[0] if isinstance(c, torch.Tensor) and c.dim() else 0
    records: list = [None] * world
    dist.all_gather_object(records, (mine, size), group=process_group)
    theirs = [dict(record[0]) for record in records]
    for name, value in mine:
        values = [facts.get(name) for facts in theirs]
        if any(v != value for v in values):
            listed = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ValueError(f"{OP}: the ranks of process_group disagree on {name} ({listed})")
    sizes = [record[1] for record in records]
    return Shard(process_group, rank, world, sum(sizes[:rank]), sum(sizes))
