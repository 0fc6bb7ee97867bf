"""Hugging Face `datasets` interop.

Into streamtune: a `datasets.save_to_disk` folder (Arrow stream files + `dataset_info.json`/`state.json`)
or a Hub-style Parquet layout (`data/train-00000-of-00001.parquet`, `Audio`/`Image` columns with embedded
bytes or relative paths) is a source like any other: `build_manifest("s3://bucket/my-dataset")`. A Hub
dataset is the URL `hf://datasets/<org>/<name>` (fsspec's HfFileSystem from `huggingface_hub`; needs the
hub, so it is not exercised by the tests here).

Out of streamtune: a shard set is Arrow IPC files, so `datasets` loads the committed shards directly
(`load_shards`; `streaming=True` streams them).
"""

from __future__ import annotations

from typing import Any

from streamtune import shards, storage


def data_files(shards_url: str, storage_options: dict | None = None) -> list[str]:
    """URLs of the shards `shards_url/index.json` commits (uncommitted files under the prefix left out)."""
    index = shards.read_index(shards_url, storage_options)
    return [storage.join(shards_url, e["path"]) for e in index["shards"]]


def load_shards(shards_url: str, storage_options: dict | None = None, **kwargs: Any):
    """A shard set (raw or features) as a `datasets.Dataset` (an IterableDataset with streaming=True)."""
    import datasets

    return datasets.load_dataset(
        "arrow",
        data_files={"train": data_files(shards_url, storage_options)},
        split="train",
        storage_options=storage.resolve_options(shards_url, storage_options),
        **kwargs,
    )
