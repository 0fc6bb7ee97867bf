"""One definition of every setting: the docs table, the Prefect form and YAML files all follow it."""

from pathlib import Path

import pytest
import yaml

from flows.params import PipelineParams
from streamtune.config import ConfigError, DecodeConfig, TrainArgs, build

ROOT = Path(__file__).resolve().parent.parent


def test_reference_doc_is_generated_from_the_definitions():
    from app.config_doc import render

    assert (ROOT / "docs" / "configuration.md").read_text() == render(), (
        "docs/configuration.md is stale: python -m app.config_doc > docs/configuration.md"
    )


def test_pipeline_nests_the_library_sections_with_the_same_defaults():
    params = PipelineParams(source_url="s3://b/raw", work_url="s3://b/w")
    assert params.train == TrainArgs() and params.decode == DecodeConfig()
    schema = PipelineParams.model_json_schema()  # the Prefect run form
    assert {"shard", "decode", "train", "source_url", "force", "skip"} <= set(schema["properties"])
    train_form = schema["$defs"]["TrainArgs"]["properties"]
    assert train_form["iters"]["default"] == TrainArgs().iters and train_form["lr"]["description"]
    assert "storage_options" not in train_form  # runtime only, never in a form or a config file


def test_shipped_configs_validate():
    PipelineParams(**yaml.safe_load((ROOT / "examples" / "pipeline.yaml").read_text()))
    deployments = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())["deployments"]
    for d in deployments:
        PipelineParams(**dict(d["parameters"]["params"], source_url="s3://b/raw", work_url="s3://b/w"))


def test_old_flat_keys_point_to_their_section():
    base = {"source_url": "s3://b/raw", "work_url": "s3://b/w"}
    with pytest.raises(ConfigError, match="did you mean 'shard.max_shard_bytes'"):
        build(PipelineParams, base | {"max_shard_bytes": 1})
    with pytest.raises(ConfigError, match=r"skip: \[train\]"):
        build(PipelineParams, base | {"train": False})


def test_bad_values_are_one_line_errors():
    with pytest.raises(ConfigError, match="TrainArgs: lr"):
        build(TrainArgs, {"lr": 0})
    with pytest.raises(ConfigError, match="train.fine_tune_type"):
        build(PipelineParams, {"source_url": "a", "work_url": "b", "train": {"fine_tune_type": "bitfit"}})
    with pytest.raises(ConfigError, match="credentials"):
        build(PipelineParams, {"source_url": "a", "work_url": "b", "work_options": {"secret": "x"}})


def test_template_is_set_from_yaml():
    args = build(
        TrainArgs, {"template": {"prompt": "Q: {transcript}", "completion": "{text}", "system": "Be brief."}}
    )
    assert args.template.system == "Be brief." and args.settings()["template"]["prompt"] == "Q: {transcript}"
