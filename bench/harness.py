"""Shared benchmark machinery: timing, machine facts, copy bandwidth, tables and JSON results."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import ferrograd as fg

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(fn: Callable[[], object], repeats: int = 7, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    repeats: int = 7,
    warmup: int = 1,
    faults: dict[str, float] | None = None,
) -> dict[str, float]:
    """Median wall time of each function, timing them in turn within every round so that drift
    on a shared machine (neighbours, frequency) affects all of them alike. The order rotates
    from round to round: what a call leaves behind falls on each function in turn. glibc hands
    freed blocks of a few MB back to the system (heap trimming), and the next allocation of that
    size faults its pages in again (0.3-1 us a page on a VM): in a fixed order the same function
    paid for them every round (a 1024 x 512 float32 L1LayerNorm's backward took 590 us in place
    of 215 beside nn.LayerNorm's, 512 faults against none). With ``faults`` (a dict), also
    each function's median minor page faults per call into it."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in fns}
    counts: dict[str, list[int]] = {name: [] for name in fns}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            before = _minor_faults()
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
            counts[name].append(_minor_faults() - before)
    if faults is not None:
        faults.update({name: statistics.median(c) for name, c in counts.items()})
    return {name: statistics.median(ts) for name, ts in times.items()}


def _minor_faults() -> int:
    """Minor page faults of this process so far (every thread's)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def compiled_fresh(fn):
    """``fn`` (a function or module) through torch.compile (inductor) with a fresh dynamo cache:
    every case compiles its own graphs (one per shape, dtype and grad mode), where the default
    limit of 8 recompiles per code object would fall back to eager after a few cases. Compiles
    in this process: the compile worker pool's processes stayed busy through the timings that
    followed (an L1RMSNorm forward measured 2.0 ms instead of 0.41 ms)."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    inductor_config.compile_threads = 1
    return torch.compile(fn, dynamic=False)


def strongest_torch(fwd: dict[str, float], both: dict[str, float]) -> dict:
    """Sets ``t["torch"]`` to the faster of ``t["eager"]`` and ``t["compiled"]`` in the forward
    and forward + backward times, and returns the row fields that say which won and keep both
    (in microseconds)."""
    row = {}
    for phase, t in (("fwd", fwd), ("fwdbwd", both)):
        t["torch"] = min(t["eager"], t["compiled"])
        row[f"{phase}_baseline"] = "compiled" if t["compiled"] < t["eager"] else "eager"
    for phase, t in (("fwd", fwd), ("fwdbwd", both)):
        row |= {f"{phase}_{kind}_us": t[kind] * 1e6 for kind in ("eager", "compiled")}
    return row


def gpu_time(fn: Callable[[], object], repeats: int = 20, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` on the GPU, synchronizing around each run."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gpu_kernel_time(fn: Callable[[], object], repeats: int = 20) -> float:
    """Seconds of device work per ``fn()``: the kernels, copies and memsets the profiler saw,
    without the host's launch cost (``gpu_time`` has it: small kernels are launch-bound there).
    NaN where the profiler saw no device work."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    device_us = sum(
        e.self_device_time_total for e in prof.key_averages() if e.device_type == DeviceType.CUDA
    )
    return device_us / repeats / 1e6 if device_us > 0 else float("nan")


def device_copy_bandwidth() -> float:
    """Bytes per second of a 512 MiB device-to-device copy (read + write)."""
    src = torch.empty(1 << 28, device="cuda", dtype=torch.float16)
    return 2 * src.numel() * src.element_size() / gpu_time(src.clone, repeats=10)


#: The CPU flags a run records (those that choose kernels here or in torch).
FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
         "avx512_bf16", "amx_tile")  # fmt: skip


def _cpu_facts() -> tuple[str, str, list[str]]:
    """(model name, "family F model M", the FLAGS present) from /proc/cpuinfo."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())
                if name.strip() == "flags":
                    break
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or "unknown"
    family = f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"
    flags = fields.get("flags", "").split()
    return model, family, [f for f in FLAGS if f in flags]


def cpu_has_bf16() -> bool:
    """BF16 dot-product instructions (AVX512-BF16 or AMX-BF16): where bf16 autocast is the
    strongest torch configuration. oneDNN runs bf16 on any AVX-512 CPU, emulated; without
    AVX-512 (Zen 3) torch's bf16 matmul ran 8x slower than its float32 one and a bf16-autocast
    nn.Linear step at 4096 x 1024 -> 4096 took a minute, so it is never the baseline there."""
    # (every CPU with AMX tiles has AMX-BF16; FLAGS keeps amx_tile for the results' CPU key)
    return any(f in _cpu_facts()[2] for f in ("avx512_bf16", "amx_tile"))


def _cache_sizes() -> dict[str, str]:
    sizes = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            sizes[f"L{level}{'' if kind == 'Unified' else kind[0].lower()}"] = (
                (index / "size").read_text().strip()
            )
        except OSError:
            continue
    return sizes


#: torch's CPU allocator gives allocations of 2 MiB and more transparent huge pages when set.
HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"


def with_huge_pages() -> None:
    """Restarts this process with ``THP_MEM_ALLOC_ENABLE=1`` unless the variable is set already
    (set it to 0 to measure the default allocator). torch reads it at its first allocation, so
    it cannot be switched on in a running process. Large fresh tensors otherwise page-fault 4 KiB
    at a time: measured on a 2-vCPU Zen 5 VM, a fresh 64 MiB float32 copy took 18-75 ms against
    5 ms with huge pages, and torch's bf16 training step of bench/model.py ran 2.4x faster with
    them (ferrograd's 1.1x). The strongest torch configuration therefore has them on. Not for
    every op: on a Zen 4 VM torch._int_mm at 2048^3 took 39 ms with them against 20 ms without
    (its fresh 16 MiB output faulted in as huge pages each call), so the op benchmarks run on
    their own (python bench/<name>.py) keep torch's default allocator unless the variable is
    set; bench/results/*.json record which in machine.huge_pages."""
    if HUGE_PAGES in os.environ or not sys.platform.startswith("linux"):
        return
    os.environ[HUGE_PAGES] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)


def machine(threads: int) -> dict:
    model, family, flags = _cpu_facts()
    return {
        "cpu": model,
        "cpu_family_model": family,
        "cpu_flags": flags,
        "caches": _cache_sizes(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "simd_path": fg.simd_level(),
        # A run as another CPU (docs/ops.md, "Runs as another CPU"): ferrograd's path forced or
        # features turned off, torch's held back by its own variables; part of the run's key.
        "run_as": _run_as(),
        "huge_pages": os.environ.get(HUGE_PAGES, "unset"),
        # glibc's tunables where a run set them (e.g. MALLOC_TRIM_THRESHOLD_): they decide
        # whether freed outputs go back to the system and fault in again on the next call.
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")} or "default",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "ferrograd": fg.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def copy_bandwidth(numel: int = 1 << 28) -> float:
    """Bytes per second of ``dst.copy_(src)`` on float32 buffers far larger than the caches,
    counting one read and one write per element: the limit for memory-bound kernels."""
    src = torch.randn(numel)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), repeats=5)
    return 2 * 4 * numel / seconds


class Bench:
    """One benchmark's run: same thread count for ferrograd and torch, rows, table, JSON."""

    def __init__(self, name: str, threads: int | None = None) -> None:
        self.name = name
        self.threads = threads or torch.get_num_threads()
        torch.set_num_threads(self.threads)  # ferrograd's kernels follow it
        self.rows: list[dict] = []
        self._bandwidth: float | None = None

    @property
    def bandwidth(self) -> float:
        if self._bandwidth is None:
            self._bandwidth = copy_bandwidth()
        return self._bandwidth

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(self._format([row], header=len(self.rows) == 1), flush=True)

    @staticmethod
    def _format(rows: list[dict], header: bool) -> str:
        keys = list(rows[0])
        cells = [[_fmt(r[k]) for k in keys] for r in rows]
        widths = [max(len(k), 12) for k in keys]
        lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths, strict=True))] if header else []
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
        return "\n".join(lines)

    def save(self, notes: dict | None = None, rows: list[dict] | None = None) -> Path:
        """This run (``rows``: default this bench's) into bench/results/<name>.json."""
        run = {
            "machine": machine(self.threads),
            "copy_bandwidth_GBps": round(self.bandwidth / 1e9, 2),
            "notes": notes or {},
            "rows": self.rows if rows is None else rows,
        }
        return save_run(self.name, run)


#: Variables that hold torch's kernels to fewer instructions than the CPU has.
TORCH_ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def _run_as() -> str | None:
    """How this run differs from the CPU as it is, or None: ferrograd's forced SIMD path, the
    features FERROGRAD_DISABLE_FEATURES turned off and torch's instruction variables."""
    info = fg.cpu_info()
    parts = []
    if fg.simd_level() != info["detected"]:
        parts.append(fg.simd_level())
    if info["disabled"]:
        parts.append("without " + ",".join(info["disabled"]))
    parts += [f"{v}={os.environ[v]}" for v in TORCH_ISA_VARIABLES if v in os.environ]
    return " ".join(parts) or None


def cpu_key(facts: dict) -> str:
    """The CPU a run belongs to: model name, family and model numbers (VMs report several
    generations as plain "AMD EPYC") and the kernel-choosing flags; for a run as another CPU,
    how (``run_as``)."""
    family = facts.get("cpu_family_model")
    key = f"{facts['cpu']}{f' ({family})' if family else ''} [{' '.join(facts['cpu_flags'])}]"
    return key + (f" run as {facts['run_as']}" if facts.get("run_as") else "")


def save_run(name: str, run: dict) -> Path:
    """Writes ``run`` (with its "machine") into bench/results/<name>.json under its CPU's key,
    keeping the runs of other CPUs; files in the earlier layouts (one run, or runs keyed by
    model name) are carried over under their machines' keys."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    if "by_cpu" in doc:
        runs = doc["by_cpu"]
    elif "machine" in doc:
        runs = {cpu_key(doc["machine"]): doc}
    else:
        runs = {cpu_key(v["machine"]): v for v in doc.values() if isinstance(v, dict)}
    key = cpu_key(run["machine"])
    runs[key] = run
    path.write_text(json.dumps({"benchmark": name, "by_cpu": runs}, indent=2) + "\n")
    print(f"wrote {path} [{key}]")
    return path


def gpu_section(name: str, threads: int | None, run: Callable[[Bench], None]) -> dict:
    """Runs ``run`` into bench/results/<name>_gpu.json when torch sees a GPU; returns the note
    for the CPU results saying where the GPU figures are (or that there are none)."""
    if not torch.cuda.is_available():
        return {"gpu": "no GPU in this run"}
    bench = Bench(f"{name}_gpu", threads)
    run(bench)
    bench.save({"device": torch.cuda.get_device_name()})
    return {"gpu": f"see {name}_gpu.json"}


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)
