"""ferrograd's CUDA runtime (docs/layers.md).

The kernels of kernels/ travel inside the extension (``_core.kernel_sources()``). At first use a
file is compiled with NVRTC (``cuda.bindings.nvrtc``; works without a GPU or driver) for the
current device, the PTX cached on disk in ``$FERROGRAD_CACHE_DIR`` (default
``~/.cache/ferrograd``) under a key made of the sources, the architecture, the NVRTC version and
the options, loaded with the driver (``cuModuleLoadData``) and launched on
``torch.cuda.current_stream()``. A driver older than the NVRTC refuses its PTX ISA: then the
file is compiled to a cubin for the exact architecture instead.

The cache holds GPU code, so it is private and verified: the directory is created 0700, and one
that is a symlink, not owned by the user or writable by group or others is not used (the kernels
are compiled in memory, with one warning). Each file starts with the sha256 of the PTX it holds,
written with it; a file that is missing, empty, a symlink, unreadable or does not match its digest
is a miss: the PTX is compiled again and the file replaced.

NVRTC warnings surface as ``CompileWarning`` (the tests turn them into failures). Importing
this module never fails; using it without cuda-python, NVRTC, a driver or a GPU raises a
RuntimeError that says which is missing.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import stat
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from .. import _core

__all__ = [
    "KERNEL_VARIANTS",
    "CompileError",
    "CompileWarning",
    "Kernel",
    "cache_key",
    "compile_cubin",
    "compile_ptx",
    "include_dirs",
    "is_available",
    "kernel",
    "multiprocessors",
]

#: The defines each kernel file is built with (every combination is compiled by the tests).
KERNEL_VARIANTS: dict[str, list[dict[str, str]]] = {
    "cce.cu": [{"CCE_T": t} for t in ("float", "__half", "__nv_bfloat16")],
    "shiftquant.cu": [{}],  # one program holds every element type's entry points
    "w4a16.cu": [{"W4_T": "__half"}, {"W4_T": "__nv_bfloat16"}],
}
#: Driver errors that mean "this PTX is too new for me": retry with a cubin.
_PTX_REFUSED = ("CUDA_ERROR_UNSUPPORTED_PTX_VERSION", "CUDA_ERROR_INVALID_PTX")


class CompileError(RuntimeError):
    """NVRTC rejected a kernel file; the message holds its log."""


class CompileWarning(UserWarning):
    """NVRTC compiled a kernel file with warnings; the message holds its log."""


def _bindings():
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError as e:  # pragma: no cover - the package depends on cuda-python
        raise RuntimeError(
            "ferrograd.cuda needs cuda-python (pip install cuda-python): " + str(e)
        ) from e
    return driver, nvrtc


def _check(result, what: str):
    """Unwraps a cuda-python (status, *values) tuple; raises RuntimeError naming the call."""
    status, *values = result
    if int(status) != 0:
        name = getattr(status, "name", str(status))
        raise RuntimeError(f"ferrograd.cuda: {what} failed: {name}")
    return values[0] if len(values) == 1 else tuple(values)


def include_dirs() -> list[str]:
    """The CUDA headers of the pip runtime wheels (pip NVRTC has no cuda_fp16.h built in)."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for root in nvidia.__path__:
        for candidate in ("cu13/include", "cuda_runtime/include", "cu12/include"):
            path = Path(root) / candidate
            if (path / "cuda_fp16.h").exists():
                found.append(str(path))
    return found


def nvrtc_version() -> tuple[int, int]:
    _, nvrtc = _bindings()
    try:
        return _check(nvrtc.nvrtcVersion(), "nvrtcVersion")
    except RuntimeError as e:  # the library itself is missing (cuda-pathfinder's error)
        raise RuntimeError(
            f"ferrograd.cuda needs NVRTC (pip install nvidia-cuda-nvrtc): {e}"
        ) from e


def _cache_dir() -> Path:
    # An empty value is unset: Path("") would be the current directory.
    return Path(os.environ.get("FERROGRAD_CACHE_DIR") or Path.home() / ".cache" / "ferrograd")


#: Directories already refused with a warning (warned about once per process).
_refused: set[Path] = set()
#: The first line of a cache file: this prefix and the sha256 of the PTX that follows it.
_DIGEST_PREFIX = b"// ferrograd sha256 "
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _private_cache_dir() -> Path | None:
    """The cache directory, created 0700; None (after one warning) when anyone but the user
    could write there."""
    path = _cache_dir()
    try:
        if not os.path.lexists(path):
            os.makedirs(path, mode=0o700, exist_ok=True)
            os.chmod(path, 0o700)  # makedirs' mode goes through the umask
        st = os.lstat(path)
    except OSError as e:
        return _refuse(path, f"cannot be created ({e})")
    if stat.S_ISLNK(st.st_mode):
        return _refuse(path, "is a symlink")
    if not stat.S_ISDIR(st.st_mode):
        return _refuse(path, "is not a directory")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return _refuse(path, "is not owned by the current user")
    if st.st_mode & 0o022:
        return _refuse(path, "is writable by group or others")
    return path


def _refuse(path: Path, why: str) -> None:
    if path not in _refused:
        _refused.add(path)
        warnings.warn(
            f"ferrograd.cuda: not caching kernels in {str(path)!r}: it {why}; compiling in memory",
            stacklevel=4,
        )


def _read_cached(path: Path) -> str | None:
    """The PTX of a cache file, or None when it is missing, not a regular file (symlinks are
    not followed), unreadable or does not match the digest written with it."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            header, _, body = f.read().partition(b"\n")
    except OSError:
        return None
    if not body or header != _DIGEST_PREFIX + hashlib.sha256(body).hexdigest().encode():
        return None
    try:
        return body.decode()
    except UnicodeDecodeError:
        return None


def _options(arch: str, defines: Mapping[str, str]) -> list[str]:
    opts = [f"--gpu-architecture={arch}", "--std=c++17"]
    opts += [f"-I{d}" for d in include_dirs()]
    opts += [f"-D{k}={v}" for k, v in sorted(defines.items())]
    return opts


def _check_kernel_file(file: str, sources: Mapping[str, str]) -> None:
    """Only the .cu files are compiled on their own (headers are included by them)."""
    if file not in sources or not file.endswith(".cu"):
        kernels = sorted(n for n in sources if n.endswith(".cu"))
        raise ValueError(f"ferrograd.cuda: no kernel file {file!r} (kernel files: {kernels})")


def cache_key(file: str, arch: str, defines: Mapping[str, str] | None = None) -> str:
    """sha256 of every kernel source, the architecture, the NVRTC version and the options."""
    sources = _core.kernel_sources()
    _check_kernel_file(file, sources)
    h = hashlib.sha256()
    for name, source in sorted(sources.items()):
        h.update(name.encode() + b"\0" + source.encode() + b"\0")
    h.update(repr((file, arch, nvrtc_version(), _options(arch, defines or {}))).encode())
    return h.hexdigest()


def _compile(file: str, arch: str, defines: Mapping[str, str], cubin: bool) -> bytes:
    """PTX or cubin of ``file`` for ``arch`` (compute_XX or sm_XX); a non-empty NVRTC log is
    issued as a CompileWarning."""
    _, nvrtc = _bindings()
    nvrtc_version()  # a clear error when the library is missing
    sources = _core.kernel_sources()
    _check_kernel_file(file, sources)
    headers = {n: s for n, s in sources.items() if n.endswith((".cuh", ".h"))}
    prog = _check(
        nvrtc.nvrtcCreateProgram(
            sources[file].encode(), file.encode(), len(headers),
            [s.encode() for s in headers.values()], [n.encode() for n in headers],
        ),
        "nvrtcCreateProgram",
    )  # fmt: skip
    try:
        opts = [o.encode() for o in _options(arch, defines)]
        status, *_ = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        # Writable buffers: NVRTC writes into them, and `b" " * 1` is CPython's shared b" ".
        log = bytearray(size)
        _check(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
        log_text = log.rstrip(b"\0 ").decode(errors="replace").strip()
        if int(status) != 0:
            raise CompileError(
                f"ferrograd.cuda: NVRTC could not compile {file} for {arch}:\n{log_text}"
            )
        get_size, get = (
            (nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN)
            if cubin
            else (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX)
        )
        out = bytearray(_check(get_size(prog), "nvrtcGet size"))
        _check(get(prog, out), "nvrtcGet code")
        if log_text:
            warnings.warn(
                f"NVRTC warnings for {file} ({arch}, {dict(defines)}):\n{log_text}",
                CompileWarning,
                stacklevel=3,
            )
        return bytes(out)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_ptx(
    file: str, arch: str, defines: Mapping[str, str] | None = None, *, cache: bool = True
) -> str:
    """PTX of a kernels/ file for a virtual architecture such as ``compute_90a``; needs no GPU.
    Cached on disk (a cache hit issues no warnings: they were shown when it was compiled)."""
    defines = dict(defines or {})
    directory = _private_cache_dir() if cache else None
    if directory is not None:
        path = directory / f"{cache_key(file, arch, defines)}.ptx"
        cached = _read_cached(path)
        if cached is not None:
            return cached
    ptx = _compile(file, arch, defines, cubin=False).rstrip(b"\0")
    if directory is not None:
        header = _DIGEST_PREFIX + hashlib.sha256(ptx).hexdigest().encode() + b"\n"
        with tempfile.NamedTemporaryFile(dir=directory, delete=False) as f:  # mode 0600
            f.write(header + ptx)
        os.replace(f.name, path)  # atomic, and replaces a symlink rather than its target
    return ptx.decode()


def compile_cubin(file: str, arch: str, defines: Mapping[str, str] | None = None) -> bytes:
    """Machine code of a kernels/ file for a real architecture such as ``sm_90a`` (NVRTC runs
    ptxas itself; needs no GPU). Not cached: only drivers older than the NVRTC need it."""
    return _compile(file, arch, dict(defines or {}), cubin=True)


def is_available() -> bool:
    """Whether kernels can be launched here (a CUDA GPU, its driver and cuda-python)."""
    if not torch.cuda.is_available():
        return False
    try:
        _bindings()
    except RuntimeError:
        return False
    return True


def multiprocessors(device: torch.device) -> int:
    """The SM count of ``device``: the launch plans size their grids by it."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclass
class Kernel:
    """A loaded kernel function; call it with the grid, block and typed arguments."""

    name: str
    function: object
    device: int
    context: object
    #: The dynamic shared memory the function has been allowed so far (48 KiB needs no opt-in).
    max_shared_mem: int = 48 * 1024

    def __call__(
        self,
        grid: Sequence[int],
        block: Sequence[int],
        args: Sequence[object],
        shared_mem: int = 0,
    ) -> None:
        """Launches on torch's current stream of the kernel's device. ``args``, in the order of
        the kernel's parameters: tensors (passed as device pointers), ``ctypes`` values as they
        are (c_void_p(0) for a null pointer, c_longlong for a 64-bit integer...), Python ints as
        int32 and floats as float32."""
        driver, _ = _bindings()
        params = [self._param(i, a) for i, a in enumerate(args)]
        pointers = (ctypes.c_void_p * max(len(params), 1))(*(ctypes.addressof(p) for p in params))
        if int(_check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")) != int(self.context):
            _check(driver.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")
        if shared_mem > self.max_shared_mem:
            attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            _check(
                driver.cuFuncSetAttribute(self.function, attr, shared_mem),
                f"cuFuncSetAttribute({self.name}, {shared_mem} bytes of shared memory)",
            )
            self.max_shared_mem = shared_mem
        stream = driver.CUstream(torch.cuda.current_stream(self.device).cuda_stream)
        gx, gy, gz = (*grid, 1, 1)[:3]
        bx, by, bz = (*block, 1, 1)[:3]
        _check(
            driver.cuLaunchKernel(
                self.function, gx, gy, gz, bx, by, bz, shared_mem, stream,
                ctypes.addressof(pointers), 0,
            ),
            f"cuLaunchKernel({self.name})",
        )  # fmt: skip

    def _param(self, index: int, a: object) -> ctypes._SimpleCData:
        if isinstance(a, torch.Tensor):
            if a.device != torch.device("cuda", self.device):
                raise ValueError(
                    f"{self.name}: argument {index} is on {a.device}, not cuda:{self.device}"
                )
            return ctypes.c_void_p(a.data_ptr())
        if isinstance(a, ctypes._SimpleCData):
            return a
        if isinstance(a, bool) or not isinstance(a, (int, float)):
            raise TypeError(f"{self.name}: cannot pass argument {index}, a {type(a).__name__}")
        if isinstance(a, float):
            return ctypes.c_float(a)
        if not -(2**31) <= a < 2**31:
            raise ValueError(f"{self.name}: argument {index} = {a} does not fit an int32")
        return ctypes.c_int(a)


def _architecture(device: int) -> tuple[str, str]:
    """(virtual, real) architecture names of ``device``: compute_90a / sm_90a on Hopper."""
    major, minor = torch.cuda.get_device_capability(device)
    suffix = "a" if (major, minor) == (9, 0) else ""
    return f"compute_{major}{minor}{suffix}", f"sm_{major}{minor}{suffix}"


@cache
def _context(device: int):
    """The primary context of ``device`` (the one torch uses), made current on this thread."""
    driver, _ = _bindings()
    torch.cuda.init()
    try:
        _check(driver.cuInit(0), "cuInit")
    except RuntimeError as e:  # also cuda-pathfinder's "driver library not found"
        raise RuntimeError(f"ferrograd.cuda needs the NVIDIA driver: {e}") from e
    dev = _check(driver.cuDeviceGet(device), "cuDeviceGet")
    ctx = _check(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
    _check(driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    return ctx


@cache
def _module(file: str, defines: tuple[tuple[str, str], ...], device: int):
    driver, _ = _bindings()
    _context(device)
    virtual, real = _architecture(device)
    status, module = driver.cuModuleLoadData(
        compile_ptx(file, virtual, dict(defines)).encode() + b"\0"
    )
    if getattr(status, "name", "") in _PTX_REFUSED:  # a driver older than the NVRTC
        cubin = compile_cubin(file, real, dict(defines))
        module = _check(driver.cuModuleLoadData(cubin), f"cuModuleLoadData({file} cubin, {real})")
    elif int(status) != 0:
        raise RuntimeError(f"ferrograd.cuda: cuModuleLoadData({file}) failed: {status.name}")
    return module


@cache
def _kernel(file: str, name: str, defines: tuple[tuple[str, str], ...], device: int) -> Kernel:
    driver, _ = _bindings()
    module = _module(file, defines, device)
    function = _check(
        driver.cuModuleGetFunction(module, name.encode()), f"cuModuleGetFunction({file}:{name})"
    )
    return Kernel(name, function, device, _context(device))


def kernel(file: str, name: str, defines: Mapping[str, str] | None = None) -> Kernel:
    """The kernel ``name`` of kernels/``file`` built with ``defines`` for the current device
    (compiled, loaded and looked up once per process and device)."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"ferrograd.cuda: {file}:{name} needs a CUDA GPU; torch sees none")
    defines_key = tuple(sorted((defines or {}).items()))
    return _kernel(file, name, defines_key, torch.cuda.current_device())
