"""The cut cross-entropy loss as a module."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.cce import linear_cross_entropy

__all__ = ["LinearCrossEntropy"]


class LinearCrossEntropy(nn.Module):
    """``fg.linear_cross_entropy`` with its options fixed at construction, like
    ``nn.CrossEntropyLoss``: ``forward(e, c, targets, bias=None)`` where c is the classifier
    weight [V, D] (for example ``lm_head.weight``) and e the hidden states [..., D]; with
    ``process_group``, c is this rank's shard of the vocabulary (vocabulary-parallel)."""

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        softcap: float | None = None,
        reduction: str = "mean",
        shift: int = 0,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        return_lse: bool = False,
        filter_eps: float | str | None = "auto",
        process_group: torch.distributed.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.options = {
            "ignore_index": ignore_index,
            "softcap": softcap,
            "reduction": reduction,
            "shift": shift,
            "label_smoothing": label_smoothing,
            "z_loss": z_loss,
            "return_lse": return_lse,
            "filter_eps": filter_eps,
            "process_group": process_group,
        }

    def forward(
        self,
        e: torch.Tensor,
        c: torch.Tensor,
        targets: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return linear_cross_entropy(e, c, targets, bias=bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(
            f"{k}={v!r}" for k, v in self.options.items() if k != "process_group" or v is not None
        )
