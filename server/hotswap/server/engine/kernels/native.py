"""Builds and loads the C++ kernels (csrc/) on first use, with torch's cpp_extension.

The build is compiled with -march=native, so it belongs to one machine: its
folder is keyed by a hash of the sources, torch's version, the compiler and its
flags and the CPU's feature flags, and a home directory shared by different
machines never loads a mismatched build. cpp_extension keeps a lock file in
that folder, so processes that start together build it once.

Nothing here raises into a caller: any failure (no compiler, no ninja, a
compile error) is logged once and leaves `available()` False with the reason,
and the ops fall back to the torch reference.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger("hotswap.kernels")

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("ops.cpp", "paged_attention.cpp", "lora.cpp", "elementwise.cpp")
HEADERS = ("attention_engines.h", "kernels.h", "parallel.h", "vec.h")
# -fopenmp-simd: vectorisation pragmas. -ffp-contract=fast: cpp_extension
# compiles in ISO C++ mode, where GCC would otherwise not fuse a * b + c into
# an FMA. (-fopenmp is added by _openmp_flags when torch runs on GNU OpenMP.)
CFLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-ffp-contract=fast", "-Wno-psabi")


class _State:
    lock = threading.Lock()
    tried = False
    ok = False
    reason: str | None = "not built yet: call load() or any kernel"
    build_dir: Path | None = None
    parallel = False  # at::parallel_for uses torch's threads (False: one thread)
    seconds = 0.0


def _cpu_flags() -> str:
    """The CPU's feature flags line (x86: 'flags', arm: 'Features'), the part of the
    machine a -march=native build depends on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() + " " + platform.processor()


def _compiler_id() -> str:
    cxx = os.environ.get("CXX", "c++")
    try:
        done = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        return cxx + " " + done.stdout.splitlines()[0] if done.stdout else cxx
    except (OSError, subprocess.SubprocessError):
        return cxx


def _openmp_flags() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(compile, link) flags that make at::parallel_for run on torch's own OpenMP pool.

    With torch's OpenMP backend, at::parallel_for is a header template around
    `#pragma omp parallel`: compiled without -fopenmp it silently runs on one
    thread. With -fopenmp the GOMP_* calls must bind to the runtime torch
    already loaded, not a second one, so the link names that exact file (its
    soname is then what the extension needs, and the loader reuses it)."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return (), ()
    path = torch_libgomp()
    return (("-fopenmp",), (path,)) if path else ((), ())  # none found: stay single-threaded rather than load a second one


def torch_libgomp() -> str | None:
    """The libgomp file torch's parallel regions run on, or None where it cannot be told.

    Other wheels bundle their own copy (sentencepiece's is loaded with the default model's
    tokenizer): the first libgomp mapped into the process is not necessarily torch's, and an
    extension linked to another copy runs its parallel regions on a second pool of threads,
    whose omp_get_max_threads ignores torch.set_num_threads and whose spinning workers
    compete with torch's for the same cores. So the file is the one that defines the
    omp_get_max_threads libtorch_cpu itself resolves."""
    torch_cpu = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        fn = ctypes.CDLL(str(torch_cpu)).omp_get_max_threads  # dlsym: that library and what it links, in order
        for libdl in (None, "libdl.so.2"):  # dladdr: in libc since glibc 2.34, in libdl before
            info = _DlInfo()
            dladdr = getattr(ctypes.CDLL(libdl), "dladdr", None)
            if dladdr is not None and dladdr(ctypes.cast(fn, ctypes.c_void_p), ctypes.byref(info)) and info.dli_fname:
                return os.path.realpath(info.dli_fname.decode())
    except (OSError, AttributeError):
        pass
    try:  # else the first mapped, the best guess when torch's was loaded before any other
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in maps:
        path = line.split()[-1] if "/" in line else ""
        if Path(path).name.startswith("libgomp"):
            return path
    return None


class _DlInfo(ctypes.Structure):
    """glibc's Dl_info, what dladdr fills in."""

    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p), ("dli_sname", ctypes.c_char_p),
                ("dli_saddr", ctypes.c_void_p)]


def build_flags() -> tuple[tuple[str, ...], tuple[str, ...]]:
    omp_c, omp_l = _openmp_flags()
    return CFLAGS + omp_c, omp_l


def build_hash(cflags: tuple[str, ...] | None = None, sources: dict[str, bytes] | None = None, cpu_flags: str | None = None) -> str:
    """Hex digest that names a build folder; any input that changes the binary changes it."""
    if cflags is None:
        cflags = sum(build_flags(), ())
    if sources is None:
        sources = {name: (CSRC / name).read_bytes() for name in SOURCES + HEADERS}
    h = hashlib.sha256()
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + sources[name] + b"\0")
    for part in (torch.__version__, " ".join(cflags), _compiler_id(), _cpu_flags() if cpu_flags is None else cpu_flags):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:20]


def build_directory(root: str | os.PathLike | None = None, cflags: tuple[str, ...] | None = None) -> Path:
    """Where this machine's build lives: <root>/<hash>, root defaulting to $XDG_CACHE_HOME/hotswap/kernels
    (~/.cache/hotswap/kernels)."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    base = Path(root) if root is not None else Path(cache) / "hotswap" / "kernels"
    return base / build_hash(cflags)


def load(root: str | os.PathLike | None = None, verbose: bool = False) -> bool:
    """Builds (first time on this machine) and loads the extension; True when the ops are usable.

    Tried once per process: the ops register globally, so a process holds one build."""
    if _State.tried:
        return _State.ok
    with _State.lock:
        if _State.tried:
            return _State.ok
        start = time.perf_counter()
        try:
            _load(root, verbose)
            _State.ok, _State.reason = True, None
        except Exception as e:  # noqa: BLE001 - any failure means "use the reference"
            _State.ok, _State.reason = False, _short_reason(e)
            log.warning("native CPU kernels unavailable, using the torch reference: %s", _State.reason)
        _State.seconds = time.perf_counter() - start
        _State.tried = True
        return _State.ok


def _load(root: str | os.PathLike | None, verbose: bool) -> None:
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    _put_ninja_on_path()
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    cflags, ldflags = build_flags()
    folder = build_directory(root, cflags + ldflags)
    folder.mkdir(parents=True, exist_ok=True)
    _State.build_dir = folder
    # at::parallel_for is multi-threaded with -fopenmp, or always on a non-OpenMP torch.
    _State.parallel = "-fopenmp" in cflags or "parallel backend: OpenMP" not in torch.__config__.parallel_info()
    cpp_extension.load(
        name="hotswap_kernels",
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cflags=list(cflags),
        extra_ldflags=list(ldflags),
        extra_include_paths=[str(CSRC)],
        build_directory=str(folder),
        is_python_module=False,
        verbose=verbose,
    )
    _register_fakes()


def _put_ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; a venv used without activation has the
    pip-installed one only in its bin folder."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _register_fakes() -> None:
    """Shape-only versions so the ops can be traced by torch.compile; they mutate
    their first argument in place and return nothing."""

    @torch.library.register_fake("hotswap::paged_attention")
    def _(out, query, key_cache, value_cache, block_tables, token_rows, token_positions, scale, sliding_window, softcap=0.0,
          sinks=None):
        return None

    @torch.library.register_fake("hotswap::lora_shrink")
    def _(out, x, a_slots, token_slots, ranks):
        return None

    @torch.library.register_fake("hotswap::lora_expand")
    def _(y, t, b_slots, token_slots, ranks):
        return None

    @torch.library.register_fake("hotswap::lora_apply")
    def _(y, x, a_slots, b_slots, token_slots, ranks, token_scales=None):
        return None

    @torch.library.register_fake("hotswap::rms_norm")
    def _(out, x, weight, eps, weight_first):
        return None

    @torch.library.register_fake("hotswap::row_max")
    def _(values, indices, x):
        return None

    @torch.library.register_fake("hotswap::kv_write")
    def _(k_cache, v_cache, key, value, slots):
        return None

    @torch.library.register_fake("hotswap::rotary")
    def _(q_out, k_out, q, k, cos, sin):
        return None


def _short_reason(e: Exception) -> str:
    """The exception's first line plus the compiler's error lines: a build log can be pages long."""
    lines = str(e).strip().splitlines() or [""]
    errors = [line.strip() for line in lines[1:] if "error" in line.lower()][:8]
    return "\n".join([f"{type(e).__name__}: {lines[0][:300]}", *errors])


def available() -> bool:
    """True once the extension is built and loaded in this process (does not build)."""
    return _State.ok


def unavailable_reason() -> str | None:
    return _State.reason


def build_info() -> dict:
    """Where the build is and how long loading took in this process (for logs and benches)."""
    return {"ok": _State.ok, "reason": _State.reason, "build_dir": str(_State.build_dir), "load_seconds": _State.seconds,
            "parallel": _State.parallel}
