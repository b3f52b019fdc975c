"""One package per primitive: its dispatcher ops (``torch.ops.ferrograd.*``), CPU / CUDA /
reference kernels and public functions (docs/ops.md)."""
