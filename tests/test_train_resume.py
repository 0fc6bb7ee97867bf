"""Kill -9 while training from feature shards on S3, resume from the S3 checkpoint, and get the uninterrupted
run's adapter bit for bit."""

import json
import random
import subprocess
import sys

import mlx.core as mx  # noqa: I001
import pytest
from helpers import kill_at_step

import streamtune  # noqa: F401
from streamtune import storage
from streamtune.train import checkpoint
from streamtune.train.synthetic import write_random_model

WORKER = r"""
import json, sys, time
import streamtune
from streamtune import CloudStreamingDataset
from streamtune.train.trainer import TrainArgs, train

cfg = json.loads(sys.argv[1])
data = CloudStreamingDataset(cfg["features"], cfg["so"], shuffle=True, seed=5)
args = TrainArgs(model=cfg["model"], adapter_path=cfg["adapter"], iters=8, batch_size=2, seq_len=96,
                 lr=1e-3, warmup=3, dropout=0.1, num_layers=-1, rank=4, grad_accum=2, save_every=2,
                 checkpoint_url=cfg["ckpt"], storage_options=cfg["so"], resume=cfg["resume"], seed=7,
                 compile=False)
slow = cfg.get("slow", 0.0)
res = train(args, data, on_step=lambda m: time.sleep(slow))
print(json.dumps({"steps": res["steps"], "losses": res["losses"]}))
"""


def _write_features(url, storage_options):
    import pyarrow as pa

    from streamtune.shards.writer import ShardSetWriter

    rows = [
        {
            "sample_id": f"r{i}",
            "transcript": "say " * (2 + i % 9),
            "tags": ["a", "b"][: 1 + i % 2],
            "text": f"caption {i} " + "z" * (i % 7),
        }
        for i in range(30)
    ]
    schema = pa.schema(
        [
            ("sample_id", pa.string()),
            ("transcript", pa.string()),
            ("tags", pa.list_(pa.string())),
            ("text", pa.string()),
        ]
    )
    writer = ShardSetWriter(url, schema, storage_options, max_shard_rows=8)
    writer.write(pa.Table.from_pylist(rows, schema))
    writer.close()


def _run(cfg, **kw):
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw
    )


def _finish(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]
    return json.loads(out.decode().strip().splitlines()[-1])


def test_kill_and_resume_gives_identical_adapter(tmp_path, bucket, s3opts):
    model = write_random_model(str(tmp_path / "tiny"), "tiny", seed=3)
    features = f"{bucket}/features"
    _write_features(features, s3opts)
    base = {"model": model, "so": s3opts, "resume": False, "features": features}
    uninterrupted = _run({**base, "adapter": str(tmp_path / "a"), "ckpt": f"{bucket}/full"})

    ckpt = f"{bucket}/killed"  # the run to be killed starts alongside: separate processes, the same bits
    kill_after = random.Random().choice([2, 4, 6])
    proc = _run({**base, "adapter": str(tmp_path / "b"), "ckpt": ckpt, "slow": 0.3})
    kill_at_step(proc, lambda: checkpoint.latest(ckpt, s3opts), kill_after)
    full = _finish(uninterrupted)
    assert not (tmp_path / "b" / "adapters.safetensors").exists()
    killed_at = checkpoint.latest(ckpt, s3opts)["step"]
    assert killed_at < 8

    resumed = _finish(_run({**base, "adapter": str(tmp_path / "b"), "ckpt": ckpt, "resume": True}))
    assert resumed["steps"] == full["steps"] == 8
    assert resumed["losses"] == full["losses"]
    a = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "b" / "adapters.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert mx.array_equal(a[name], b[name]).item(), name
    # old checkpoints are pruned; the committed one is complete
    fs, root = storage.get_fs(ckpt, s3opts)
    steps = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if "step-" in p)
    assert steps == ["step-00000006", "step-00000008"]


def test_resume_with_no_checkpoint_starts_fresh(tmp_path):
    assert checkpoint.latest(str(tmp_path / "none")) is None
    assert checkpoint.load(str(tmp_path / "none")) is None


@pytest.mark.parametrize("bad", [{"save_every": -1}, {"fine_tune_type": "bitfit"}, {"batch_size": 0}])
def test_bad_arguments_are_rejected(tmp_path, bad):
    from streamtune.train.trainer import TrainArgs, train

    model = write_random_model(str(tmp_path / "tiny"), "tiny")
    with pytest.raises(ValueError):
        train(
            TrainArgs(model=model, adapter_path=str(tmp_path / "x"), **bad),
            [{"text": "a", "transcript": "b"}],
        )
