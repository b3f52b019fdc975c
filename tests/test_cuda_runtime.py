"""The CUDA runtime on any machine: NVRTC compiles every kernel, the extension and the wheel
carry the sources, the PTX cache, clear errors without a GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from ferrograd import _core
from ferrograd import cuda as fgcuda

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels"
ARCHES = ["compute_80", "compute_90a"]


def kernel_files() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(KERNELS.glob("*.cu*"))}


def test_every_kernel_file_has_its_build_variants():
    cu_files = {name for name in kernel_files() if name.endswith(".cu")}
    assert cu_files == set(fgcuda.KERNEL_VARIANTS)


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize(
    "file, defines",
    [(f, d) for f, variants in fgcuda.KERNEL_VARIANTS.items() for d in variants],
    ids=lambda v: v if isinstance(v, str) else "-".join(v.values()),
)
def test_kernels_compile_without_errors_or_warnings(file, defines, arch):
    ptx, log = fgcuda.compile_ptx(file, arch, defines, cache_results=False)
    assert log == "", f"NVRTC warnings for {file} {defines} {arch}:\n{log}"
    assert ".visible .entry" in ptx and "mma.sync.aligned.m16n8k16" in ptx


def test_the_extension_carries_the_kernel_sources():
    assert _core.kernel_sources() == kernel_files()


def test_a_built_wheel_carries_the_kernel_sources(tmp_path):
    """maturin reuses the release build of `make develop`, so this takes about a second."""
    maturin = shutil.which("maturin", path=str(Path(sys.executable).parent))
    assert maturin, "maturin is installed next to this Python (make develop installs it)"
    env = {**os.environ, "VIRTUAL_ENV": str(Path(sys.executable).parent.parent)}
    subprocess.run(
        [maturin, "build", "--release", "-q", "-o", str(tmp_path)],
        cwd=ROOT, env=env, check=True, timeout=900,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("ferrograd-*.whl")
    with zipfile.ZipFile(wheel) as z:
        (lib,) = [n for n in z.namelist() if n.startswith("ferrograd/_core") and ".so" in n]
        binary = z.read(lib)
    for name, source in kernel_files().items():
        assert source.encode() in binary, f"{name} is not embedded in {lib}"


def test_ptx_cache_round_trip_and_key(tmp_path, monkeypatch):
    monkeypatch.setenv("FERROGRAD_CACHE_DIR", str(tmp_path))
    half = {"W4_T": "__half"}
    key = fgcuda.cache_key("w4a16.cu", "compute_80", half)
    assert key != fgcuda.cache_key("w4a16.cu", "compute_90a", half)
    assert key != fgcuda.cache_key("w4a16.cu", "compute_80", {"W4_T": "__nv_bfloat16"})
    ptx, _ = fgcuda.compile_ptx("w4a16.cu", "compute_80", half)
    assert (tmp_path / f"{key}.ptx").read_text() == ptx
    (tmp_path / f"{key}.ptx").write_text("// cached")  # a second call reads the cache
    assert fgcuda.compile_ptx("w4a16.cu", "compute_80", half)[0] == "// cached"


def test_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("FERROGRAD_CACHE_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="no kernel file 'nope.cu'"):
        fgcuda.compile_ptx("nope.cu", "compute_80")
    with pytest.raises(fgcuda.CompileError, match="could not compile w4a16.cu"):
        fgcuda.compile_ptx("w4a16.cu", "compute_80", {"W4_T": "not_a_type"})
    if not torch.cuda.is_available():
        assert not fgcuda.is_available()
        with pytest.raises(RuntimeError, match="needs a CUDA GPU; torch sees none"):
            fgcuda.kernel("w4a16.cu", "w4a16_gemm", {"W4_T": "__half"})
