"""Fresh CPU outputs backed by transparent huge pages (rust/memory.rs says why), and the size
of this CPU's last-level cache."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .. import _core

#: From this size every glibc allocation is a fresh mapping (its mmap threshold grows with the
#: blocks a process frees, up to 32 MiB). Smaller blocks come, after the first few calls, from
#: memory the process has already faulted in, where advice changes nothing but the heap's
#: mappings (measured on Zen 4: 16 MiB outputs 0.95-1.0x with advice, 32 MiB and up 1.3-2.9x).
_SMALLEST = 32 << 20
#: One huge page: for outputs of ops that spend milliseconds per MiB written (a GEMM), where
#: the advice (1-2.5 us) costs nothing measurable and the blocks that glibc does hand back
#: (it trims the heap top as other ops free memory) fault in 512 times less often.
HUGE_PAGE = 2 << 20


def fresh(t: torch.Tensor, smallest: int = _SMALLEST) -> torch.Tensor:
    """``t``, a tensor just allocated and not yet written, its memory advised as transparent
    huge pages when it holds at least ``smallest`` bytes, so that its first writes fault once
    per 2 MiB instead of once per 4 KiB page. Tensor subclasses (a FakeTensor while tracing)
    have no memory of their own to advise."""
    if t.nbytes >= smallest and type(t) is torch.Tensor:
        _core.advise_huge_pages(t)
    return t


@functools.cache
def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """The largest cache this CPU reports (Linux sysfs; ``default`` where it reports none)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (entry / "size").read_text().strip()
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
        except (OSError, ValueError):  # (an unreadable or unexpected entry: not a size)
            continue
    return max(sizes, default=default)
