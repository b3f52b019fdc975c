"""The CUDA runtime on any machine: NVRTC compiles every kernel (PTX and, through NVRTC's own
ptxas, machine code) without errors or warnings, the extension and the wheel carry the sources,
the PTX cache, clear errors without a GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from ferrograd import _core
from ferrograd import cuda as fgcuda

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels"
VARIANTS = [(f, d) for f, variants in fgcuda.KERNEL_VARIANTS.items() for d in variants]
#: The tensor-core instruction each kernel file is built around.
MMA_SHAPES = {"cce.cu": "m16n8k16", "shiftquant.cu": "m16n8k32", "w4a16.cu": "m16n8k16"}


def kernel_files() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(KERNELS.glob("*.cu*"))}


def variant_id(v):
    return v if isinstance(v, str) else "-".join(v.values())


def test_every_kernel_file_has_its_build_variants():
    cu_files = {name for name in kernel_files() if name.endswith(".cu")}
    assert cu_files == set(fgcuda.KERNEL_VARIANTS)


@pytest.mark.parametrize("arch", ["compute_80", "compute_90a"])
@pytest.mark.parametrize("file, defines", VARIANTS, ids=variant_id)
def test_kernels_compile_to_ptx_without_errors_or_warnings(file, defines, arch):
    with warnings.catch_warnings():
        warnings.simplefilter("error", fgcuda.CompileWarning)
        ptx = fgcuda.compile_ptx(file, arch, defines, cache=False)
    assert ".visible .entry" in ptx
    if defines.get("CCE_T") != "float":  # float32 cut cross-entropy runs on FMA
        assert f"mma.sync.aligned.{MMA_SHAPES[file]}" in ptx


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("file, defines", VARIANTS, ids=variant_id)
def test_kernels_assemble_without_errors_or_warnings(file, defines, arch):
    """ptxas checks what PTX generation does not: the inline asm operands, register limits."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", fgcuda.CompileWarning)
        cubin = fgcuda.compile_cubin(file, arch, defines)
    assert cubin.startswith(b"\x7fELF")


def test_the_extension_carries_the_kernel_sources():
    assert _core.kernel_sources() == kernel_files()


def test_a_built_wheel_carries_the_kernel_sources_and_nothing_test_only(tmp_path):
    """The wheel is built without the cargo feature `dev` that `make develop` turns on (cargo
    keeps both builds: a few minutes the first time, about a second afterwards)."""
    maturin = shutil.which("maturin", path=str(Path(sys.executable).parent))
    assert maturin, "maturin is installed next to this Python (make develop installs it)"
    env = {**os.environ, "VIRTUAL_ENV": str(Path(sys.executable).parent.parent)}
    subprocess.run(
        [maturin, "build", "--release", "-q", "-o", str(tmp_path)],
        cwd=ROOT, env=env, check=True, timeout=900,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("ferrograd-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (lib,) = [n for n in names if n.startswith("ferrograd/_core") and ".so" in n]
        binary = z.read(lib)
    for name, source in kernel_files().items():
        assert source.encode() in binary, f"{name} is not embedded in {lib}"
    # Test and benchmark machinery stays out: GPU emulators, probes, baselines.
    for probe in (b"_panic_for_test", b"measured_clock_hz", b"softmax_three_pass"):
        assert probe not in binary, probe
    modules = [n for n in names if n.endswith(".py")]
    assert any(n.endswith("ops/softmax/reference.py") for n in modules), modules
    for name in modules:
        assert not any(word in name for word in ("emulat", "mma", "support", "test")), name


def test_ptx_cache_round_trip_and_key(tmp_path, monkeypatch):
    monkeypatch.setenv("FERROGRAD_CACHE_DIR", str(tmp_path))
    half = {"CCE_T": "__half"}
    key = fgcuda.cache_key("cce.cu", "compute_80", half)
    assert key == fgcuda.cache_key("cce.cu", "compute_80", dict(half))
    assert key != fgcuda.cache_key("cce.cu", "compute_90a", half)
    assert key != fgcuda.cache_key("cce.cu", "compute_80", {"CCE_T": "__nv_bfloat16"})
    assert key != fgcuda.cache_key("w4a16.cu", "compute_80", half)
    ptx = fgcuda.compile_ptx("cce.cu", "compute_80", half)
    assert (tmp_path / f"{key}.ptx").read_text() == ptx
    assert [p.name for p in tmp_path.iterdir()] == [f"{key}.ptx"]  # no temporary left behind
    (tmp_path / f"{key}.ptx").write_text("// cached")  # a second call reads the cache
    assert fgcuda.compile_ptx("cce.cu", "compute_80", half) == "// cached"


def test_the_cache_key_follows_the_sources(monkeypatch):
    before = fgcuda.cache_key("cce.cu", "compute_80", {"CCE_T": "float"})
    edited = {**_core.kernel_sources(), "common.cuh": "// edited"}
    monkeypatch.setattr(_core, "kernel_sources", lambda: edited)
    assert fgcuda.cache_key("cce.cu", "compute_80", {"CCE_T": "float"}) != before


def test_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("FERROGRAD_CACHE_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="no kernel file 'common.cuh'"):
        fgcuda.compile_ptx("common.cuh", "compute_80")  # a header is compiled through the .cu
    with pytest.raises(ValueError, match="no kernel file 'nope.cu'"):
        fgcuda.compile_ptx("nope.cu", "compute_80")
    with pytest.raises(fgcuda.CompileError, match="could not compile cce.cu"):
        fgcuda.compile_ptx("cce.cu", "compute_80", {"CCE_T": "not_a_type"})
    with pytest.raises(fgcuda.CompileError, match="-DCCE_T=float"):
        fgcuda.compile_ptx("cce.cu", "compute_80")


def test_warnings_surface_as_compile_warnings(monkeypatch):
    sources = {**_core.kernel_sources(), "warns.cu": 'extern "C" __global__ void k() { int x; }'}
    monkeypatch.setattr(_core, "kernel_sources", lambda: sources)
    with pytest.warns(fgcuda.CompileWarning, match="declared but never referenced"):
        fgcuda.compile_ptx("warns.cu", "compute_80", cache=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less behaviour")
def test_launching_without_a_gpu_raises_a_clear_error():
    assert not fgcuda.is_available()
    with pytest.raises(RuntimeError, match="needs a CUDA GPU; torch sees none"):
        fgcuda.kernel("cce.cu", "cce_forward", {"CCE_T": "__half"})


def test_without_cuda_python_only_use_fails(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # makes the import fail
    assert not fgcuda.is_available()
    with pytest.raises(RuntimeError, match="needs cuda-python"):
        fgcuda.compile_ptx("cce.cu", "compute_80", {"CCE_T": "float"}, cache=False)
