"""`streamtune train` as a user runs it: settings from YAML and flags, checkpoints next to the adapter, and a
run killed with SIGKILL that `--resume` finishes with the uninterrupted run's adapter, bit for bit."""

import json
import subprocess
import sys

import mlx.core as mx  # noqa: I001
import pytest
import yaml
from helpers import cli_in_process, kill_at_step
from test_train_resume import _write_features

import streamtune  # noqa: F401
from streamtune.config import ConfigError, TrainArgs, build
from streamtune.train import checkpoint
from streamtune.train.synthetic import write_random_model


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "app", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), err


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-train")
    model = write_random_model(str(tmp / "tiny"), "tiny", seed=3)
    features = str(tmp / "features")
    _write_features(features, None)
    config = tmp / "train.yaml"
    settings = {"model": model, "iters": 40, "batch_size": 2, "seq_len": 96, "lr": 1e-3, "warmup": 3,
                "dropout": 0.1, "num_layers": -1, "rank": 4, "save_every": 4, "seed": 7}  # fmt: skip
    config.write_text(yaml.safe_dump(settings))
    return tmp, features, config


def test_killed_run_resumes_to_the_same_adapter(setup):
    tmp, features, config = setup
    uninterrupted = _cli("train", features, "-c", str(config), "--adapter-path", str(tmp / "a"))

    adapter = tmp / "b"  # the run to be killed starts alongside: separate processes, the same bits
    proc = _cli("train", features, "-c", str(config), "--adapter-path", str(adapter))
    ckpt = str(adapter / "checkpoints")  # the default place: next to the adapter
    kill_at_step(proc, lambda: checkpoint.latest(ckpt), 8, poll_s=0.005)
    full, _ = _finish(uninterrupted)
    assert full["steps"] == 40 and full["resumed_from_step"] is None
    assert not (adapter / "adapters.safetensors").exists(), "the run finished before it was killed"
    killed_at = checkpoint.latest(ckpt)["step"]
    assert 8 <= killed_at < 40

    resumed, err = _finish(
        _cli("train", features, "-c", str(config), "--adapter-path", str(adapter), "--resume")
    )
    assert f"resumed from step {killed_at}" in err
    assert resumed["steps"] == 40 and resumed["resumed_from_step"] == killed_at
    assert resumed["loss_last"] == full["loss_last"]
    a = mx.load(str(tmp / "a" / "adapters.safetensors"))
    b = mx.load(str(adapter / "adapters.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert mx.array_equal(a[name], b[name]).item(), name


def test_resume_with_nothing_to_resume_is_an_error(setup, monkeypatch, capsys):
    tmp, features, config = setup
    args = ("train", features, "-c", str(config), "--adapter-path", str(tmp / "empty"), "--resume")
    done = cli_in_process(monkeypatch, capsys, *args)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nothing to resume from" in lines[0] and "Traceback" not in done.stderr
    assert not (tmp / "empty" / "adapters.safetensors").exists()


def test_unknown_flag_names_the_closest(setup, monkeypatch, capsys):
    _, features, _ = setup
    done = cli_in_process(monkeypatch, capsys, "train", features, "--batch-sise", "3")
    assert done.returncode != 0 and "--batch-size" in done.stderr and "Traceback" not in done.stderr


def test_precedence_defaults_yaml_flags():
    args = build(TrainArgs, {"iters": 7, "lr": 3e-4}, overrides={"lr": "2e-4", "packing": False})
    assert (args.iters, args.lr, args.packing, args.rank) == (7, 2e-4, False, TrainArgs().rank)
    from app.settings_flags import parse_flags

    flags = parse_flags(
        TrainArgs, ["--iters=9", "--no-packing", "--lora-keys", "[self_attn.q_proj]", "--qlora"]
    )
    assert flags == {"iters": "9", "packing": False, "lora_keys": ["self_attn.q_proj"], "qlora": True}
    assert build(TrainArgs, {"iters": 7}, overrides=flags).iters == 9


def test_unknown_keys_name_the_closest_valid_one():
    from flows.params import PipelineParams

    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        build(TrainArgs, {"batch_sise": 2})
    with pytest.raises(ConfigError, match="did you mean 'train.iters'"):
        build(PipelineParams, {"source_url": "s3://b/raw", "work_url": "s3://b/w", "iters": 5})
    with pytest.raises(ConfigError, match="did you mean 'whisper_model'"):
        build(PipelineParams, {"source_url": "a", "work_url": "b", "decode": {"whisper_modle": "x"}})
