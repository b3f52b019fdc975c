"""The extension's plumbing: errors, panics, threads, SIMD selection, the op layer's fallbacks
for older torch releases."""

from __future__ import annotations

import ast
import os
import platform
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import ferrograd as fg
from ferrograd import _core


def test_panic_in_a_kernel_becomes_runtime_error():
    with pytest.raises(RuntimeError, match="_panic_for_test: internal error .*boom"):
        _core._panic_for_test("boom")
    # The module keeps working afterwards.
    assert fg.softmax(fg.softmax.__globals__["torch"].zeros(2)).sum().item() == 1.0


@pytest.mark.parametrize("backend", ["openmp", "rayon"])
def test_panic_in_a_parallel_part_becomes_runtime_error(backend):
    """Parts run on torch's OpenMP team when there is one (else on ferrograd's pool); a panic
    on a worker must not unwind through C frames."""
    code = (
        "import ferrograd as fg; from ferrograd import _core\n"
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "assert fg.get_num_threads() == 1\n"  # following torch with either backend
        "fg.set_num_threads(2)\n"
        f"assert fg.cpu_info()['parallel_backend'] == {backend!r}\n"
        "try:\n    _core._panic_for_test('boom', parallel=True)\n"
        "except RuntimeError as e:\n    assert 'boom' in str(e), e\n"
        "else:\n    raise SystemExit('no error')\n"
    )
    env = {**os.environ, "FERROGRAD_NO_OPENMP": "1"} if backend == "rayon" else None
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_core_checks_lengths_and_contiguity():
    x = torch.zeros(6)
    with pytest.raises(ValueError, match="softmax: x has 6 elements"):
        _core.softmax_forward(x, torch.zeros(6), 2, 4, 1)
    with pytest.raises(ValueError, match="softmax: out has"):
        _core.softmax_forward(x, torch.zeros(5), 2, 3, 1)
    with pytest.raises(ValueError, match="softmax: x must be a contiguous"):
        _core.softmax_forward(torch.zeros(12)[::2], torch.zeros(6), 2, 3, 1)
    with pytest.raises(TypeError, match="softmax: x must be a torch.float32 tensor"):
        _core.softmax_forward(torch.zeros(6, dtype=torch.float64), torch.zeros(6), 2, 3, 1)
    with pytest.raises(TypeError, match="softmax: x must be a torch.Tensor, got ndarray"):
        _core.softmax_forward(np.zeros(6, dtype=np.float32), torch.zeros(6), 2, 3, 1)
    with pytest.raises(ValueError, match="softmax: x must be a CPU tensor"):
        _core.softmax_forward(torch.zeros(6, device="meta"), torch.zeros(6), 2, 3, 1)
    with pytest.raises(OverflowError):
        _core.softmax_forward(x, x.clone(), -1, 3, 1)


def test_core_refuses_aliased_outputs_and_leaves_storage_resizable():
    """Outputs may not overlap any other argument, and borrowing a tensor leaves it as it was
    (tensor.numpy() would mark its storage unresizable, which FSDP2 cannot live with)."""
    x = torch.randn(12)
    with pytest.raises(ValueError, match="softmax: out overlaps x"):
        _core.softmax_forward(x, x, 3, 4, 1)
    with pytest.raises(ValueError, match="softmax: out overlaps x"):
        _core.softmax_forward(x[:8], x[4:], 2, 4, 1)
    before = x.clone()
    out = torch.empty(12)
    _core.softmax_forward(x, out, 3, 4, 1)
    assert torch.equal(x, before)
    torch.testing.assert_close(out, torch.softmax(x.view(3, 4), 1).view(-1))
    x.untyped_storage().resize_(0)  # raises if the storage was pinned
    out.untyped_storage().resize_(0)


def test_threads():
    fg.set_num_threads(3)
    assert fg.get_num_threads() == 3
    with pytest.raises(ValueError, match="set_num_threads: n"):
        fg.set_num_threads(0)
    for huge in (1025, 10**6, 2**64):  # refused before any thread starts
        with pytest.raises(ValueError, match=r"set_num_threads: n must be in \[1, 1024\]"):
            fg.set_num_threads(huge)
    for wrong in (2.0, True, "2"):
        with pytest.raises(TypeError, match="set_num_threads: n must be an int or None"):
            fg.set_num_threads(wrong)
    assert fg.get_num_threads() == 3


def test_thread_count_follows_torch_until_pinned():
    """By default the kernels use torch's count as it is at each call; a pinned count stays
    until ``set_num_threads(None)``. The results do not depend on the count."""
    x = torch.randn(64, 1 << 12)
    want = torch.softmax(x.double(), -1)
    fg.set_num_threads(None)
    for n in (1, 3, 2):
        torch.set_num_threads(n)
        assert fg.get_num_threads() == n
        torch.testing.assert_close(fg.softmax(x).double(), want, rtol=1e-6, atol=1e-9)
    fg.set_num_threads(3)
    torch.set_num_threads(1)
    assert fg.get_num_threads() == 3
    torch.testing.assert_close(fg.softmax(x).double(), want, rtol=1e-6, atol=1e-9)
    fg.set_num_threads(None)
    assert fg.get_num_threads() == 1


def test_thread_count_in_a_new_thread_is_torchs():
    """A thread that has not run a torch op yet: torch applies its count there when asked
    (torch 2.10's C call, which ferrograd asks; before it, the OpenMP default stands)."""
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 10):
        pytest.skip("torch_get_num_threads (the stable C ABI) arrived in torch 2.10")
    torch.set_num_threads(1)
    seen = []
    worker = threading.Thread(target=lambda: seen.append(fg.get_num_threads()))
    worker.start()
    worker.join()
    assert seen == [1]


def test_cpu_info_and_level():
    info = fg.cpu_info()
    assert "scalar" in info["supported"]
    assert info["detected"] == info["supported"][-1]
    assert fg.simd_level() in info["supported"]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86_64 only")
def test_measured_clock_is_a_plausible_core_clock():
    # The benchmarks' int8 peak estimates divide by it; a broken chain (reassociated adds, a
    # wrong count) would be off by a factor of 8 or more.
    hz = _core.measured_clock_hz()
    assert 0.3e9 < hz < 7e9


def _run(code: str, simd: str, **env: str) -> subprocess.CompletedProcess:
    env = {"FERROGRAD_SIMD": simd, "PATH": "", **env}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, encoding="utf-8"
    )


def test_forced_simd_path_is_used_and_bad_values_are_rejected():
    code = "import ferrograd as fg; print(fg.simd_level())"
    for level in fg.cpu_info()["supported"]:
        out = _run(code, level)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == level
    bad = _run("import torch, ferrograd as fg; fg.softmax(torch.zeros(3))", "sse9")
    assert bad.returncode != 0
    assert "FERROGRAD_SIMD" in bad.stderr and "ValueError" in bad.stderr


def test_a_run_as_another_cpu_is_kept_apart_in_bench_results():
    # bench/harness.py keys results by CPU and by how a run narrowed it (docs/ops.md).
    bench = str(Path(__file__).resolve().parent.parent / "bench")
    code = f"import sys; sys.path.insert(0, {bench!r}); import harness; "
    code += "print(harness.cpu_key(harness.machine(1)))"
    own = _run(code, "auto")
    assert own.returncode == 0, own.stderr
    assert "run as" not in own.stdout
    off = "avx512bf16"  # a feature whose loss leaves the detected path as it is
    narrowed = _run(code, "scalar", FERROGRAD_DISABLE_FEATURES=off, ATEN_CPU_CAPABILITY="avx2")
    assert narrowed.returncode == 0, narrowed.stderr
    info = fg.cpu_info()
    how = ["scalar"] if info["detected"] != "scalar" else []
    how += [f"without {off}"] if info["features"][off] else []
    want = own.stdout.strip() + " run as " + " ".join([*how, "ATEN_CPU_CAPABILITY=avx2"])
    assert narrowed.stdout.strip() == want


def test_disabled_features_are_off_and_bad_names_are_rejected():
    detected = fg.cpu_info()
    assert detected["disabled"] == []
    show = "import ferrograd as fg; i = fg.cpu_info(); print(i['features']); print(i['disabled'])"
    show += "; print(i['detected'])"
    out = _run(show, "auto", FERROGRAD_DISABLE_FEATURES=" avx512vnni,avx512bf16 ")
    assert out.returncode == 0, out.stderr
    features, disabled, level = out.stdout.splitlines()
    features = ast.literal_eval(features)
    assert not features["avx512vnni"] and not features["avx512bf16"]
    had = [n for n in ("avx512vnni", "avx512bf16") if detected["features"][n]]
    assert ast.literal_eval(disabled) == had
    assert all(features[n] == detected["features"][n] for n in ("avx2", "fma", "avx512f"))
    assert level == detected["detected"]  # the path stays
    # Without AVX-512 F an AVX-512 CPU is an AVX2 one: forcing avx512 is then refused.
    call = "import torch, ferrograd as fg; fg.softmax(torch.zeros(3000))"
    if "avx512" in detected["supported"]:
        forced = _run(show + "; " + call, "avx512", FERROGRAD_DISABLE_FEATURES="avx512f")
        assert forced.stdout.splitlines()[-1] == "avx2"
        assert "FERROGRAD_SIMD" in forced.stderr and "ValueError" in forced.stderr
    bad = _run(call, "auto", FERROGRAD_DISABLE_FEATURES="avx512vnni,sse9")
    assert bad.returncode != 0
    assert "FERROGRAD_DISABLE_FEATURES" in bad.stderr and '"sse9"' in bad.stderr
    assert "ValueError" in bad.stderr


def test_kernels_release_the_gil():
    x = torch.randn(1 << 24)
    out = torch.empty_like(x)
    state = {"inside": False, "done": False}

    def work():
        state["inside"] = True
        try:
            _core.softmax_forward(x, out, 1, x.numel(), 1)  # tens of milliseconds
        finally:
            state["inside"] = False
            state["done"] = True

    worker = threading.Thread(target=work)
    worker.start()
    spins_while_inside = 0
    while not state["done"]:
        # This loop can only make progress during the kernel if the kernel released the GIL.
        spins_while_inside += state["inside"]
    worker.join()
    assert spins_while_inside > 10_000


def test_kernels_work_in_a_forked_child():
    import multiprocessing

    import torch

    fg.set_num_threads(2)  # pinned: the parent's pool starts (no OpenMP team in the child)
    fg.softmax(torch.randn(4, 1 << 16))
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_softmax_sums_in_child).get(timeout=120)  # hangs if broken
    pinned, pinned_total, following, following_total = got
    assert (pinned, following) == (2, 1)
    assert abs(pinned_total - 64.0) < 1e-3 and abs(following_total - 64.0) < 1e-3


def _softmax_sums_in_child() -> tuple[int, float, int, float]:
    """The thread count and a softmax's sum in a forked child as a DataLoader worker sets it
    up (torch's own OpenMP pool is not fork-safe, so it runs one thread): with the count the
    parent pinned (on the child's own pool), then following torch's."""
    import torch

    torch.set_num_threads(1)
    x = torch.randn(64, 1 << 16)
    pinned = fg.get_num_threads()
    pinned_total = float(fg.softmax(x).sum(dtype=torch.float64))
    fg.set_num_threads(None)
    return pinned, pinned_total, fg.get_num_threads(), float(fg.softmax(x).sum(dtype=torch.float64))


def _thp_mode() -> str | None:
    """The THP mode in brackets ("always", "madvise", "never"), None off Linux."""
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")]


def _thp_eligible(address: int) -> bool | None:
    """THPeligible of the mapping holding ``address`` in /proc/self/smaps."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "THPeligible:":
            return line.split()[1] == "1"
    return None


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="no THP on this system")
def test_fresh_outputs_are_advised_as_huge_pages_and_keep_their_values():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ferrograd.ops._memory import fresh

    huge = 2 << 20
    t = torch.empty(64 << 20, dtype=torch.uint8)
    assert fresh(t) is t
    inside = -(-t.data_ptr() // huge) * huge
    assert _thp_eligible(inside) in (True, None)  # None: no THPeligible field (Linux < 5.0)
    # Advice never changes memory: a written tensor keeps its values when advised again.
    t.copy_(torch.arange(t.numel()) % 251)
    assert _core.advise_huge_pages(t)
    assert torch.equal(t[:1000], torch.arange(1000) % 251)
    assert not _core.advise_huge_pages(torch.empty(16))  # no whole huge page inside
    assert not _core.advise_huge_pages(torch.empty(64 << 20, dtype=torch.uint8, device="meta"))
    with FakeTensorMode(), warnings.catch_warnings():  # no pointer to read: torch warns
        warnings.simplefilter("error")
        fake = torch.empty(64 << 20, dtype=torch.uint8)
        assert fresh(fake) is fake
    # An op's output of that size comes out right (a float64 reference).
    x = torch.randn(2, (32 << 20) // 8 + 5)
    torch.testing.assert_close(fg.softmax(x, -1).double(), torch.softmax(x.double(), -1))


def test_huge_page_advice_can_be_turned_off():
    code = (
        "import torch, ferrograd._core as c; "
        "print(c.advise_huge_pages(torch.empty(64 << 20, dtype=torch.uint8)))"
    )
    env = dict(os.environ, FERROGRAD_HUGE_PAGES="0")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, encoding="utf-8"
    )
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.skipif(
    not hasattr(torch._C, "_any_requires_grad"), reason="no torch function to compare with"
)
def test_the_any_requires_grad_fallback_answers_as_torch():
    """ops/_compat.py's version for torch 2.5 to 2.7, against torch's own where it exists."""
    from ferrograd.ops import _compat

    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2)
    cases = [
        (), (b,), (a,), (a[:1],), (a.detach(),), (1.0, None, b, "x"), (b, [b, a]), ([b],),
        ([],), ([1, 2],), (b, [b, None]), ((a,),),
    ]  # fmt: skip
    for args in cases:
        assert _compat._any_requires_grad(*args) == torch._C._any_requires_grad(*args), args
    # A list that does not start with a tensor: torch does not look into it; the fallback does
    # and answers True, which sends the call down the autograd path (right either way).
    assert _compat._any_requires_grad([None, a]) and not torch._C._any_requires_grad([None, a])
