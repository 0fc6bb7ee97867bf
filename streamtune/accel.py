"""Make MLX fast on Linux CPUs.

MLX's Linux CPU wheel links a reference BLAS. Loading an optimised BLAS with RTLD_GLOBAL before
`mlx.core` is imported lets its symbols win (about 30x on f32 matmul). Importing `streamtune`
runs this once; it is a no-op on macOS, when no OpenBLAS is installed, or when mlx is already loaded.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)

_loaded: str | None = None


def preload_blas() -> str | None:
    """Load OpenBLAS globally if possible; return the path loaded (or None)."""
    global _loaded
    if _loaded or sys.platform != "linux" or os.environ.get("STREAMTUNE_NO_BLAS_PRELOAD"):
        return _loaded
    if "mlx.core" in sys.modules:
        return None
    paths = [os.environ["STREAMTUNE_BLAS"]] if os.environ.get("STREAMTUNE_BLAS") else []
    paths += list(_CANDIDATES) + glob.glob("/usr/lib/*/libopenblas*.so*")
    for path in paths:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
            except OSError:
                continue
            _loaded = path
            return path
    return None


def default_dtype() -> str:
    """f32 on CPU (bf16/f16 are emulated and slow there), bf16 on GPU."""
    return "bfloat16" if _has_gpu() else "float32"


def _has_gpu() -> bool:
    import mlx.core as mx

    try:
        return mx.default_device().type == mx.DeviceType.gpu
    except AttributeError:  # older mlx
        return str(mx.default_device()).startswith("Device(gpu")
