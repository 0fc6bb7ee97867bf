"""A scheduled fine-tune can end with a ready-to-run hand-off: the pipeline's export task writes the new
adapter version as PEFT next to the work data, and a rerun with nothing new trains nothing and says so."""

import json

from test_train_resume import _write_features

import flows  # noqa: F401
from streamtune.train.synthetic import write_random_model


def test_pipeline_trains_then_exports_and_a_noop_rerun_keeps_the_adapter(tmp_path):
    from flows.pipeline import PipelineParams, pipeline

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a caption")
    work = tmp_path / "work"
    _write_features(str(work / "features"), None)  # decoded features already there: decode is skipped
    model = write_random_model(str(tmp_path / "tiny"), "tiny", seed=1)
    params = PipelineParams(
        source_url=str(src),
        work_url=str(work),
        skip=["decode", "index"],
        train={"model": model, "iters": 3, "batch_size": 2, "seq_len": 64, "rank": 4, "num_layers": -1},
        export=["peft"],
    )
    first = pipeline(params)
    version_dir = first["adapter_path"]
    assert first["train"]["steps"] == 3 and "/adapters/" in version_dir
    latest = json.loads((work / "adapters" / "latest.json").read_text())
    assert latest["path"] == version_dir and latest["global_step"] == 3 and len(latest["sha256"]) == 64
    peft_dir = work / "exports" / version_dir.rsplit("/", 1)[-1] / "peft"
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert first["exports"]["peft"] == str(peft_dir) and config["r"] == 4 and config["lora_alpha"] == 4 * 20.0
    assert (peft_dir / "adapter_model.safetensors").stat().st_size > 0

    again = pipeline(params)
    assert again["adapter_path"] == version_dir  # the same adapter stands
    assert again["run"]["training"].startswith("skipped: features and settings unchanged")
