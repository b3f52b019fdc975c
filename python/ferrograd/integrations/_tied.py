"""One gradient buffer for a tied input embedding and output head.

When the head shares its weight with the input embedding, autograd holds two V x D gradients of
it at once: the head's dC (from the cut cross-entropy) waits in the weight's input buffer while
the embedding's backward builds its own dense V x D gradient, and only then are they summed. At
vocabulary 128k and width 512 that is 263 MB in float32, the largest transient of a training
step once the logits are gone. Here the head's gradient is handed to the embedding's backward,
which adds its rows into it with ``index_add_``: one buffer, the same sum (the rows are added
in another order, so results may differ in the last bits).

A model forward that computes the loss arms a :class:`Pairing` on the embedding module; the
embedding's forward takes it (only a plain ``nn.Embedding`` without ``max_norm``,
``scale_grad_by_freq`` or ``sparse``, in eager mode with gradients on), and the loss passes the
head's weight through :class:`HeadHandOff`. The hand-off works in either order of the two
backward nodes: if the embedding's backward already ran in this backward pass, the head's
gradient flows on as usual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

#: The instance attribute through which a model forward arms its embedding.
_ARMED = "_ferrograd_tied_pairing"


class Pairing:
    """One model forward's embedding call and loss: the head's gradient in transit, and how
    many backward passes each side has run (a retained graph runs them again)."""

    __slots__ = ("embedded", "grad", "handoffs", "embeddings")

    def __init__(self) -> None:
        self.embedded = False
        self.grad: torch.Tensor | None = None
        self.handoffs = 0
        self.embeddings = 0


class EmbeddingRows(torch.autograd.Function):
    """F.embedding whose backward adds its rows into the head's gradient when one was handed
    over (else into zeros, as torch's dense embedding backward)."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, pairing):
        ctx.save_for_backward(ids)
        ctx.weight_meta = (weight.shape, weight.dtype, weight.device)
        ctx.padding_idx, ctx.pairing = padding_idx, pairing
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        pairing = ctx.pairing
        pairing.embeddings += 1
        grad, pairing.grad = pairing.grad, None
        shape, dtype, device = ctx.weight_meta
        if grad is None:
            grad = torch.zeros(shape, dtype=dtype, device=device)
        rows = ids.reshape(-1)
        values = grad_out.reshape(rows.numel(), shape[1]).to(dtype)
        if ctx.padding_idx is not None:  # the padding row gets no gradient, as in torch
            keep = rows != ctx.padding_idx
            rows, values = rows[keep], values[keep]
        grad.index_add_(0, rows, values)
        return None, grad, None, None


class HeadHandOff(torch.autograd.Function):
    """The head's weight as it is; its gradient is handed to the embedding's backward."""

    @staticmethod
    def forward(ctx, weight, pairing):
        ctx.weight_meta = (weight.shape, weight.dtype, weight.device)
        ctx.pairing = pairing
        return weight.view_as(weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        pairing = ctx.pairing
        pairing.handoffs += 1
        plain = type(grad) is torch.Tensor and grad.is_contiguous()
        if (
            pairing.embeddings >= pairing.handoffs  # the embedding's backward already ran
            or not plain
            or (grad.shape, grad.dtype, grad.device) != ctx.weight_meta
        ):
            return grad, None
        pairing.grad = grad
        return None, None


def _eligible(embedding: nn.Module) -> bool:
    return (
        type(embedding) is nn.Embedding
        and embedding.max_norm is None
        and not embedding.scale_grad_by_freq
        and not embedding.sparse
    )


def install(model: nn.Module) -> None:
    """Lets the model's input embedding take an armed pairing (its instance forward)."""
    embedding = model.get_input_embeddings()
    if not _eligible(embedding):
        return

    def forward(self, ids):
        if torch.compiler.is_compiling():  # traced graphs: torch's own (arm() arms none)
            return nn.Embedding.forward(self, ids)
        pairing = self.__dict__.pop(_ARMED, None)
        if (
            pairing is None
            or not torch.is_grad_enabled()
            or not self.weight.requires_grad
            or not _eligible(self)
        ):
            return nn.Embedding.forward(self, ids)
        pairing.embedded = True
        return EmbeddingRows.apply(ids, self.weight, self.padding_idx, pairing)

    embedding.forward = forward.__get__(embedding)


def arm(model: nn.Module) -> Pairing | None:
    """A pairing for this forward where the head is tied to an installed embedding."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if (
        "forward" not in embedding.__dict__
        or head is None
        or embedding.weight is not head.weight
        or torch.compiler.is_compiling()
    ):
        return None
    pairing = Pairing()
    embedding.__dict__[_ARMED] = pairing
    return pairing


def head_weight(model: nn.Module, weight: torch.Tensor, pairing: Pairing | None) -> torch.Tensor:
    """The head's weight for the loss: through the hand-off where the embedding took the
    pairing in this forward. Disarms the embedding either way (it may not have been called:
    ``inputs_embeds``)."""
    if pairing is None:
        return weight
    model.get_input_embeddings().__dict__.pop(_ARMED, None)
    if not pairing.embedded:
        return weight
    return HeadHandOff.apply(weight, pairing)
