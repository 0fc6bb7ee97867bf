"""Decode fanned out on an existing Dask cluster (2-worker LocalCluster) gives the default runner's outputs."""

import shutil

import numpy as np
import pytest
from corpus import gradient, image_bytes, tiny_clip_config
from PIL import Image

from streamtune.shards import read_index, read_shard_table

pytest_plugins = ["prefect_server"]


def make_source(folder) -> None:
    folder.mkdir()
    for i in range(2):
        img = gradient(96 + 8 * i, 64) if i % 2 else Image.new("RGB", (80, 80), (40 * i, 90, 200 - 30 * i))
        (folder / f"img{i}.png").write_bytes(image_bytes(img, "PNG"))
        (folder / f"img{i}.txt").write_text(f"caption {i}")
    (folder / "note.txt").write_text("a text-only sample")


@pytest.mark.slow
def test_dask_decode_matches_thread_runner(prefect_client, tmp_path):
    from distributed import Client, LocalCluster

    from flows.pipeline import PipelineParams, decode_flow, manifest_flow, shard_flow

    make_source(tmp_path / "src")
    clip = tiny_clip_config(tmp_path)
    common = {
        "source_url": str(tmp_path / "src"),
        "shard": {"max_shard_bytes": 200},
        "decode": {"clip_model": clip},
        "skip": ["train"],
    }
    threads = PipelineParams(work_url=str(tmp_path / "threads"), **common)
    manifest = manifest_flow(threads)
    shards = shard_flow(threads, manifest)
    assert len(shards["new_shards"]) >= 2
    shutil.copytree(tmp_path / "threads" / "shards", tmp_path / "dask" / "shards")

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        on_dask = PipelineParams(
            work_url=str(tmp_path / "dask"),
            task_runner="dask",
            dask_address=cluster.scheduler_address,
            **common,
        )
        by_dask = decode_flow.with_options(task_runner=_runner(on_dask))(on_dask)
        decoders = client.run(lambda: __import__("tasks.stages").stages._DECODERS.__len__())
    by_threads = decode_flow(threads)

    assert sum(decoders.values()) >= 1, decoders  # the decode tasks ran inside the Dask workers
    assert by_dask["decoded"] == by_threads["decoded"] == {"audio": 0, "image": 2}
    a, b = read_index(str(tmp_path / "threads" / "features")), read_index(str(tmp_path / "dask" / "features"))
    assert [(e["path"], e["rows"]) for e in a["shards"]] == [(e["path"], e["rows"]) for e in b["shards"]]
    assert a["rows"] == 3
    for ea, eb in zip(a["shards"], b["shards"], strict=True):
        ta = read_shard_table(str(tmp_path / "threads" / "features"), ea).to_pydict()
        tb = read_shard_table(str(tmp_path / "dask" / "features"), eb).to_pydict()
        emb_a, emb_b = ta.pop("clip_embedding"), tb.pop("clip_embedding")
        scores_a, scores_b = ta.pop("tag_scores"), tb.pop("tag_scores")
        assert ta == tb  # ids, texts, tags, transcripts: identical
        # Dask workers run torch single-threaded: same numbers up to float summation order
        assert [e is None for e in emb_a] == [e is None for e in emb_b]
        for x, y in zip(emb_a + scores_a, emb_b + scores_b, strict=True):
            if x is not None:
                np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)


def _runner(params):
    from flows.pipeline import _task_runner

    return _task_runner(params)
