"""Packages' submodules without their package `__init__` (mlx-whisper's, and torchvision's for open_clip).

`import mlx_whisper.audio` (or any submodule) first runs `mlx_whisper/__init__.py`, which imports
`mlx_whisper.transcribe` -> `mlx_whisper.timing` -> numba and scipy: about 150 MB of resident memory that
the batched transcriber never uses (it needs `audio`, `decoding`, `load_models`, `tokenizer`, `whisper`).
Likewise open_clip needs `torchvision.transforms` and `torchvision.ops.misc`, but `torchvision/__init__.py`
imports every model, dataset and op, and `torchvision.ops` imports `torch._dynamo` (with sympy): ~160 MB.
`skip_package_init(name)` registers the package as a bare module (its `__path__` only, `__init__` not run),
so submodules import as usual and cost only their own imports.

Reading `mlx_whisper.transcribe`, `mlx_whisper.__version__` or any other name that is not a submodule
then runs the real `__init__` in that module, so `import mlx_whisper; mlx_whisper.transcribe(...)` keeps
working afterwards in the same process (the reference comparisons do that).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

PACKAGE = "mlx_whisper"
WHOLE = {"mlx_whisper": {"transcribe"}}  # submodules the real __init__ binds a function of the same name over


def skip_package_init(package: str = PACKAGE) -> None:
    """Make later `import package.X` skip `package/__init__.py` (no-op once the package is loaded)."""
    if package in sys.modules:
        return
    parent, _, child = package.rpartition(".")
    if parent and parent not in sys.modules:
        return
    spec = importlib.util.find_spec(package)
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return  # not installed as a regular package: let the normal import fail or succeed
    pkg = importlib.util.module_from_spec(spec)  # __name__, __path__, __file__, __spec__; body not run
    folder = spec.submodule_search_locations[0]
    whole = WHOLE.get(package, set())

    def full_package(name: str):
        # `from . import whisper` (load_models) probes hasattr(pkg, "whisper") before importing it:
        # submodule names import just that submodule. `transcribe` is both a submodule and the function
        # the real __init__ binds over it, so it (like anything else public) loads the whole package.
        path = os.path.join(folder, name)
        submodule = os.path.exists(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py"))
        if submodule and name not in whole:
            return importlib.import_module(f"{package}.{name}")
        if name.startswith("__") and name != "__version__":
            raise AttributeError(name)
        del pkg.__getattr__
        spec.loader.exec_module(pkg)
        return getattr(pkg, name)

    pkg.__getattr__ = full_package
    sys.modules[package] = pkg
    if parent:
        setattr(sys.modules[parent], child, pkg)
