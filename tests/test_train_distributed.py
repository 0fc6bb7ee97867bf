"""Data-parallel training with mx.distributed (ring backend on loopback) matches one process."""

import json
import subprocess
import sys

import mlx.core as mx  # noqa: I001
import pytest
from helpers import launch_two_ranks, mlx_launch

import streamtune  # noqa: F401
from streamtune.train.synthetic import write_random_model

WORKER = r"""
import json, sys
import streamtune
import mlx.core as mx
from streamtune.train.trainer import TrainArgs, train

cfg = json.loads(sys.argv[1])
rows = [
    {"sample_id": f"r{i}", "transcript": "hear " * (2 + i % 11), "tags": ["x", "y", "z"][: 1 + i % 3],
     "text": f"caption {i} " + "q" * (i % 6)}
    for i in range(24)
]
args = TrainArgs(model=cfg["model"], adapter_path=cfg["adapter"], iters=3, batch_size=2, seq_len=128,
                 lr=1e-3, warmup=1, num_layers=-1, rank=4, seed=1, compile=False)
res = train(args, rows)
rank = mx.distributed.init().rank()
with open(cfg["out"] + f".{rank}", "w") as f:
    json.dump({"losses": res["losses"], "world": res["world_size"], "tokens": res["tokens"]}, f)
"""


@pytest.mark.skipif(mlx_launch() is None, reason="mlx.launch not installed")
def test_two_processes_match_one(tmp_path):
    model = write_random_model(str(tmp_path / "tiny"), "tiny", seed=2)
    one = {"model": model, "adapter": str(tmp_path / "one"), "out": str(tmp_path / "one.json")}
    two = {"model": model, "adapter": str(tmp_path / "two"), "out": str(tmp_path / "two.json")}
    single_run = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(one)])  # alongside the ranks
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    launch_two_ranks(script, json.dumps(two), timeout=300)
    assert single_run.wait(timeout=300) == 0
    single = json.loads((tmp_path / "one.json.0").read_text())
    r0 = json.loads((tmp_path / "two.json.0").read_text())
    r1 = json.loads((tmp_path / "two.json.1").read_text())
    assert single["world"] == 1 and r0["world"] == r1["world"] == 2
    assert r0["losses"] == r1["losses"], "every rank sees the global loss"
    assert r0["tokens"] == single["tokens"]
    assert r0["losses"] == pytest.approx(single["losses"], rel=1e-4)
    assert single["losses"][-1] < single["losses"][0]
    a = mx.load(str(tmp_path / "one" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    for name in a:
        assert mx.allclose(a[name], b[name], rtol=1e-3, atol=1e-5).item(), name
