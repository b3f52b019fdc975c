"""The CUDA runtime on any machine: NVRTC compiles every kernel (PTX and, through NVRTC's own
ptxas, machine code) without errors or warnings, the extension and the wheel carry the sources,
the PTX cache, clear errors without a GPU."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
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
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(KERNELS.glob("*.cu*"))}


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
    # Everything under the package: a top-level kernels/ landed in site-packages/kernels,
    # inside the directory of Hugging Face's `kernels` package (a transformers dependency).
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info"
    assert {n.split("/", 1)[0] for n in names} == {"ferrograd", dist_info}, names
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
    header, body = (tmp_path / f"{key}.ptx").read_text(encoding="utf-8").split("\n", 1)
    assert body == ptx and header.endswith(hashlib.sha256(ptx.encode()).hexdigest())
    assert [p.name for p in tmp_path.iterdir()] == [f"{key}.ptx"]  # no temporary left behind
    # A second call reads the cache (a different, correctly digested PTX stands for it).
    fake = b"// cached"
    digest = hashlib.sha256(fake).hexdigest()
    (tmp_path / f"{key}.ptx").write_bytes(f"// ferrograd sha256 {digest}\n".encode() + fake)
    assert fgcuda.compile_ptx("cce.cu", "compute_80", half) == "// cached"


HALF = {"CCE_T": "__half"}


def cached_file(directory: Path) -> Path:
    return directory / f"{fgcuda.cache_key('cce.cu', 'compute_80', HALF)}.ptx"


def test_the_cache_directory_is_private_whatever_the_umask(tmp_path, monkeypatch):
    directory = tmp_path / "a" / "cache"
    monkeypatch.setenv("FERROGRAD_CACHE_DIR", str(directory))
    old = os.umask(0)
    try:
        fgcuda.compile_ptx("cce.cu", "compute_80", HALF)
    finally:
        os.umask(old)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(cached_file(directory).stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777], ids=oct)
def test_a_directory_others_can_write_is_not_used(tmp_path, monkeypatch, mode):
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(mode)
    monkeypatch.setenv("FERROGRAD_CACHE_DIR", str(directory))
    expected = fgcuda.compile_ptx("cce.cu", "compute_80", HALF, cache=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fgcuda.compile_ptx("cce.cu", "compute_80", HALF) == expected
        assert fgcuda.compile_ptx("cce.cu", "compute_80", HALF) == expected
    assert [str(w.message) for w in caught] == [
        f"ferrograd.cuda: not caching kernels in {str(directory)!r}: it is writable by group or"
        " others; compiling in memory"
    ]
    assert list(directory.iterdir()) == []


def test_a_symlinked_directory_is_not_used(tmp_path, monkeypatch):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    monkeypatch.setenv("FERROGRAD_CACHE_DIR", str(tmp_path / "link"))
    with pytest.warns(UserWarning, match="it is a symlink"):
        assert ".visible .entry" in fgcuda.compile_ptx("cce.cu", "compute_80", HALF)
    assert list(real.iterdir()) == []


def test_a_directory_of_another_user_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("FERROGRAD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.warns(UserWarning, match="is not owned by the current user"):
        assert ".visible .entry" in fgcuda.compile_ptx("cce.cu", "compute_80", HALF)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "replacement", [b"// evil", b"", b"// ferrograd sha256 0123\n// evil", b"\xff\xfe"]
)
def test_a_replaced_empty_or_corrupt_cache_file_is_a_miss(tmp_path, monkeypatch, replacement):
    monkeypatch.setenv("FERROGRAD_CACHE_DIR", str(tmp_path))
    ptx = fgcuda.compile_ptx("cce.cu", "compute_80", HALF)
    path = cached_file(tmp_path)
    good = path.read_bytes()
    path.write_bytes(replacement)
    assert fgcuda.compile_ptx("cce.cu", "compute_80", HALF) == ptx
    assert path.read_bytes() == good  # rewritten


def test_a_tampered_body_under_a_valid_header_is_a_miss(tmp_path, monkeypatch):
    monkeypatch.setenv("FERROGRAD_CACHE_DIR", str(tmp_path))
    ptx = fgcuda.compile_ptx("cce.cu", "compute_80", HALF)
    path = cached_file(tmp_path)
    path.write_bytes(path.read_bytes().replace(b".visible .entry", b".visible .entrx"))
    assert fgcuda.compile_ptx("cce.cu", "compute_80", HALF) == ptx


def test_a_symlinked_cache_file_is_not_followed(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FERROGRAD_CACHE_DIR", str(cache))
    ptx = fgcuda.compile_ptx("cce.cu", "compute_80", HALF)
    path = cached_file(cache)
    target = tmp_path / "elsewhere.ptx"
    target.write_bytes(path.read_bytes())  # even a correctly digested file is not read
    path.unlink()
    path.symlink_to(target)
    target.write_bytes(target.read_bytes().replace(b"cce_forward", b"evil_entry"))
    assert fgcuda.compile_ptx("cce.cu", "compute_80", HALF) == ptx
    assert not path.is_symlink() and b"evil_entry" in target.read_bytes()


def test_an_empty_cache_dir_variable_means_the_default(tmp_path, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("FERROGRAD_CACHE_DIR", "")
    monkeypatch.chdir(cwd)
    fgcuda.compile_ptx("cce.cu", "compute_80", HALF)
    assert list(cwd.iterdir()) == []
    assert cached_file(home / ".cache" / "ferrograd").is_file()


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


def test_compiling_leaves_python_constants_alone():
    """NVRTC writes its (one-byte, empty) log into the buffer it is given: never a shared bytes."""
    fgcuda.compile_ptx("shiftquant.cu", "compute_80", cache=False)
    assert chr(32).encode()[0] == 32  # CPython shares every one-byte bytes (no constant folding)


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
