"""Compiled CPU kernels where Paddle's own are slow: attention's softmax, GELU (tanh), LayerNorm without affine.

Paddle's CPU ``softmax`` is single-threaded scalar code: on the attention scores of the small benchmark teacher
(``[4, 8, 410, 410]`` fp32) it takes 19 ms where PyTorch's whole fused attention takes 10, and it is about a fifth
of a training step on CPU (``scripts/benchmark.py``). ``cpu_kernels.cc`` has a softmax over the last axis, forward
and backward, vectorised (16-float GCC vectors, a polynomial ``exp``) and split over Paddle's own OpenMP threads:
5.7 ms forward there (2 threads), 15 ms forward and backward against Paddle's 30. The same holds for the SD3
blocks' other two slow CPU ops: GELU with the tanh approximation (``[2, 410, 1024]`` forward and backward: Paddle
10.0 ms, PyTorch 3.9) and the backward of their LayerNorms without weight and bias (``[2, 410, 256]``: Paddle 2.9
ms forward and backward, PyTorch 0.6); :func:`gelu_tanh` and :func:`layer_norm` (used by ``paddle_compat``).

Each function uses its kernel for CPU float32 tensors and falls back to Paddle's op everywhere else. The kernels
are built once per source, CPU model and Paddle version with ``paddle.utils.cpp_extension`` (about 20 s, under a
file lock so that ranks and test workers wait for one build; cached in Paddle's extension folder,
``PADDLE_EXTENSION_DIR`` or ``~/.cache/paddle_extensions``). Where they cannot be built (no C++ compiler), one
warning says so and Paddle's ops are used. ``PCM_CPU_KERNELS=0`` uses Paddle's ops always.

Results are not Paddle's bit for bit (fp32 roundoff: the softmax is within 1e-6 relative of the exact one, GELU
and LayerNorm within a few ulp of Paddle's; tested), and the kernels are deterministic (the same bits for any
thread count; see ``cpu_kernels.cc``).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import warnings

import paddle
import paddle.nn.functional as F

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.cc")
CXX_FLAGS = ["-O3", "-march=native", "-ffp-contract=off"]
# Paddle's OpenMP runtime (MKL's): the kernels' threads are then the ones a matmul just used. Without it (a Paddle
# build that does not ship it) the kernels run on the calling thread.
IOMP = os.path.join(os.path.dirname(paddle.__file__), "libs", "libiomp5.so")


SWITCH = "PCM_CPU_KERNELS"  # "0": Paddle's own kernels
_LOADED: dict = {}  # "module": the built extension, or None where it cannot be built or is switched off


def _openmp_flags() -> tuple:
    """Compiler and linker flags for Paddle's OpenMP runtime (none where the Paddle build does not ship it)."""
    if not os.path.exists(IOMP):
        return [], []
    libs = os.path.dirname(IOMP)
    return ["-fopenmp"], [f"-L{libs}", "-liomp5", f"-Wl,-rpath,{libs}"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return "".join(line for line in f if line.startswith(("model name", "flags")))
    except OSError:
        return ""


def build_name() -> str:
    """The extension's name: a hash of the source, the flags, the CPU (``-march=native``) and Paddle's version."""
    digest = hashlib.sha256()
    flags = [*CXX_FLAGS, *(flag for group in _openmp_flags() for flag in group)]
    with open(SOURCE, "rb") as f:
        source = f.read()
    for part in (source, " ".join(flags).encode(), _cpu_model().encode(), paddle.__version__.encode()):
        digest.update(part + b"\0")
    return "pcm_cpu_kernels_" + digest.hexdigest()[:16]


def _build():
    from paddle.utils.cpp_extension import extension_utils, get_build_directory, load

    name, root = build_name(), get_build_directory()
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(root, name, name + ".so")):  # built before: load it without a setup run
            return extension_utils._import_module_from_library(name, os.path.join(root, name))
        print(f"cpu_kernels: building the CPU kernels once (about 20 s) in {root}", flush=True)
        with contextlib.redirect_stdout(io.StringIO()):
            openmp_cflags, openmp_ldflags = _openmp_flags()
            return load(name=name, sources=[SOURCE], extra_cxx_cflags=CXX_FLAGS + openmp_cflags,
                        extra_ldflags=openmp_ldflags, build_directory=root)


def kernels():
    """The built extension (``None`` when switched off or when it cannot be built: one warning says why)."""
    if "module" not in _LOADED:
        module = None
        if os.environ.get(SWITCH, "1") != "0":
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    module = _build()
            except Exception as error:  # no compiler, no headers, a failed build: Paddle's own ops still work
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                warnings.warn(f"cpu_kernels: could not build the fast CPU kernels ({first_line[:200]}); using "
                              f"Paddle's own ops (slower on CPU). Set {SWITCH}=0 to skip the attempt.")
        _LOADED["module"] = module
    return _LOADED["module"]


def threads() -> int:
    """Threads for one kernel call: ``OMP_NUM_THREADS`` where set (as Paddle's MKL), else the usable cores."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return len(os.sched_getaffinity(0))


def _runs_here(x: paddle.Tensor) -> bool:
    return x.dtype == paddle.float32 and x.place.is_cpu_place() and x.size > 0 and kernels() is not None


def _contiguous(x: paddle.Tensor) -> paddle.Tensor:
    return x if x.is_contiguous() else x.contiguous()


def softmax(x: paddle.Tensor) -> paddle.Tensor:
    """Softmax over the last axis: the compiled kernel for CPU float32 tensors, else ``F.softmax``."""
    if _runs_here(x):
        return kernels().pcm_softmax(_contiguous(x), threads())
    return F.softmax(x, axis=-1)


def gelu_tanh(x: paddle.Tensor) -> paddle.Tensor:
    """GELU with the tanh approximation: the compiled kernel for CPU float32 tensors, else ``F.gelu``."""
    if _runs_here(x):
        return kernels().pcm_gelu_tanh(_contiguous(x), threads())
    return F.gelu(x, approximate=True)


def layer_norm(x: paddle.Tensor, epsilon: float) -> paddle.Tensor:
    """LayerNorm over the last axis without weight and bias: the compiled kernel for CPU float32 tensors, else
    ``F.layer_norm``."""
    if _runs_here(x):
        return kernels().pcm_layer_norm(_contiguous(x), float(epsilon), threads())[0]
    return F.layer_norm(x, x.shape[-1:], epsilon=epsilon)
