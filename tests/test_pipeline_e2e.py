"""The whole pipeline flow, end to end: real S3 server over HTTP, real Prefect flow run, real models."""

import json
import os

import numpy as np
import pytest
from corpus import TINY_CLIP, tiny_clip_config

from streamtune import CloudStreamingDataset, shards
from streamtune.demo.data import generate_demo_source, upload_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, s3server):
    from flows.pipeline import PipelineParams, pipeline

    work = tmp_path_factory.mktemp("e2e")
    generate_demo_source(str(work / "source"), n=6)  # every audio and image format the demo writes
    bucket = s3server.create_bucket("e2e-pipeline")
    os.environ.update(s3server.env())
    upload_dir(str(work / "source"), f"{bucket}/raw")
    params = PipelineParams(
        source_url=f"{bucket}/raw",
        work_url=f"{bucket}/st",
        shard={"max_shard_bytes": 128 << 10},
        # CLIP has no real weights offline: a small random open_clip model (test_clip builds ViT-B-32)
        decode={"clip_model": tiny_clip_config(work)},
        train={"adapter_path": str(work / "adapters"), "iters": 6, "batch_size": 2, "seq_len": 128},
    )
    summary = pipeline(params)
    return summary, bucket, work


def test_summary_fields(pipeline_run):
    summary, _, _ = pipeline_run
    json.dumps(summary)  # serialisable as summary.json
    assert summary["samples"] == 8  # 6 good + 2 broken
    assert summary["shards"] >= 2
    assert summary["decoded"]["audio"] == 6 and summary["decoded"]["image"] == 6
    assert summary["quarantined"] >= 2
    assert summary["flow_run_id"]
    train = summary["train"]
    assert train["steps"] == 6 and train["tokens_per_s"] > 0
    assert train["loss_last"] < 0.7 * train["loss_first"]


def test_features_hold_transcripts_and_embeddings(pipeline_run):
    _, bucket, _ = pipeline_run
    index = shards.read_index(f"{bucket}/st/features")
    assert len(index["shards"]) >= 2
    rows = list(CloudStreamingDataset(f"{bucket}/st/features"))
    good = [r for r in rows if r["transcript"]]
    assert len(good) == 6
    heard = " ".join(r["transcript"].lower() for r in good)
    assert sum(word in heard for word in ("circle", "square", "triangle", "cross", "picture")) >= 2, heard
    emb = np.array([r["clip_embedding"] for r in rows if r["clip_embedding"] is not None], dtype=np.float32)
    assert emb.shape == (6, TINY_CLIP["embed_dim"])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)


def test_adapter_loads_in_mlx_lm(pipeline_run, smollm2_folder):
    import mlx_lm

    summary, _, _ = pipeline_run
    adapter = summary["adapter_path"]
    assert os.path.exists(os.path.join(adapter, "adapters.safetensors"))
    assert os.path.exists(os.path.join(adapter, "adapter_config.json"))
    model, tokenizer = mlx_lm.load(smollm2_folder, adapter_path=adapter)
    text = mlx_lm.generate(model, tokenizer, prompt="A picture of", max_tokens=5)
    assert isinstance(text, str)
