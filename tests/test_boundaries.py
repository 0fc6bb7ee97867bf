"""The library stays importable without Prefect or the app layer; the layers import in one direction."""

import subprocess
import sys

CHECK = r"""
import importlib, pkgutil, sys
for name in ("prefect", "flows", "tasks", "app"):
    sys.modules[name] = None  # any import of these now raises ImportError
import streamtune
names = [m.name for m in pkgutil.walk_packages(streamtune.__path__, "streamtune.")]
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("prefect", "flows", "tasks", "app") and sys.modules[m])
assert not leaked, leaked
print(len(names))
"""


def test_every_library_module_imports_without_prefect():
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.strip()) > 30


def test_tasks_do_not_import_flows():
    code = "import sys; sys.modules['flows'] = None; import tasks.stages, tasks.cache, tasks.artifacts, tasks.settings"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_pipeline_params_need_no_prefect():
    code = "import sys; sys.modules['prefect'] = None; from flows.params import PipelineParams; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
