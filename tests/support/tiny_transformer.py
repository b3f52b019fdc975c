"""A one-block Transformer and its motif task: a small training run for the accuracy tests of
quantized training and the benchmarks' loss columns."""

from __future__ import annotations

import torch

import ferrograd as fg


class TinyTransformer(torch.nn.Module):
    """A one-block causal Transformer built from nn.Linear / nn.LayerNorm (so quantize_model
    swaps every GEMM)."""

    def __init__(self, vocab=16, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Parameter(torch.randn(32, dim) * 0.02)
        self.norm1, self.norm2, self.norm3 = (torch.nn.LayerNorm(dim) for _ in range(3))
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.up = torch.nn.Linear(dim, 4 * dim)
        self.down = torch.nn.Linear(4 * dim, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, ids):
        b, t = ids.shape
        h = self.embed(ids) + self.pos[:t]
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(att.transpose(1, 2).reshape(b, t, -1))
        h = h + self.down(torch.nn.functional.gelu(self.up(self.norm2(h))))
        return self.head(self.norm3(h))


def motif_batch(generator: torch.Generator, rows: int = 32) -> torch.Tensor:
    """Sequences that repeat a random 8-token motif: learnable only through attention."""
    return torch.randint(0, 16, (rows, 8), generator=generator).repeat(1, 4)


def train_tiny(bits: int | None, steps: int = 300) -> float:
    """The mean loss of the last 20 steps of ``fit_tiny``."""
    return fit_tiny(bits, steps)[1]


def fit_tiny(bits: int | None, steps: int = 300) -> tuple[TinyTransformer, float]:
    """Trains TinyTransformer (ShiftQuant at ``bits`` unless None) on motif sequences."""
    torch.manual_seed(0)
    model = TinyTransformer()
    if bits is not None:
        fg.nn.quantize_model(model, bits=bits)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        ids = motif_batch(data)
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, sum(losses[-20:]) / 20
