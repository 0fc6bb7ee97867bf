"""The pipeline's parameters: where data lives, orchestration, and the library's settings sections.

`shard:`, `decode:` and `train:` are the library's own `ShardConfig`, `DecodeConfig` and `TrainArgs`, so the
Prefect run form, YAML files and CLI flags describe the same fields with the same defaults. This module does
not import Prefect (the CLI validates a config without it).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from streamtune.config import ConfigError, DecodeConfig, IndexConfig, Settings, ShardConfig, TrainArgs

Stage = Literal["manifest", "shard", "decode", "index", "train"]


class PipelineParams(Settings):
    """Pipeline parameters (the Prefect UI renders this as the run form). Credentials never go here: they
    come from the AWS environment of the worker (or a profile named in the options)."""

    source_url: str = Field(
        description="Where the raw objects are: s3://bucket/prefix, a folder, any fsspec URL."
    )
    work_url: str = Field(description="Prefix for manifests, shards, features, adapters and checkpoints.")
    source_options: dict[str, Any] = Field(default_factory=dict, description="Non-secret storage options.")
    work_options: dict[str, Any] = Field(default_factory=dict, description="Non-secret storage options.")
    shard: ShardConfig = Field(default_factory=ShardConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    train: TrainArgs = Field(default_factory=TrainArgs)
    index: IndexConfig = Field(default_factory=IndexConfig)
    decode_concurrency: int = Field(1, ge=1, description="Decode tasks at once per model, across runs.")
    task_runner: Literal["threads", "dask", "ray"] = Field(
        "threads", description="Runner of the decode fan-out."
    )
    dask_address: str | None = Field(None, description="Existing Dask scheduler; default a LocalCluster.")
    dask_workers: int = Field(2, ge=1, description="Workers of the local Dask cluster.")
    skip: list[Literal["decode", "index", "train"]] = Field(
        default_factory=list, description="Stages not to run (e.g. [train], [index])."
    )
    incremental: bool = Field(
        False, description="Only objects new or changed since the last committed shard set."
    )
    resume_from: Literal["none", "latest"] = Field(
        "none", description="latest: start training from the adapter a previous run left."
    )
    force: list[Stage] = Field(
        default_factory=list, description="Stages to recompute, ignoring cached results."
    )
    export: list[Literal["peft", "gguf-adapter", "fused-mlx", "fused-gguf", "ollama"]] = Field(
        default_factory=list,
        description="Hand the new adapter off in these formats, under WORK_URL/exports/<adapter version>/.",
    )
    align_iters: int = Field(
        0,
        ge=0,
        description="With train.stage instruct: first train the media projectors alone for this many steps "
        "(stage 1, its own cached task), then projectors and adapters from there (stage 2).",
    )
    retrain_unchanged: bool = Field(
        False,
        description="Train even when features and settings are unchanged (with resume_from: latest, "
        "training continues from the latest adapter); otherwise such a run keeps the adapter it has.",
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("train"), bool):
            raise ConfigError(
                "`train: true|false` is now `skip: [train]` (the `train:` section holds its settings)"
            )
        return data

    @field_validator("source_options", "work_options")
    @classmethod
    def _no_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        from streamtune.storage import secret_keys

        found = secret_keys(value)
        if found:
            raise ValueError(
                f"storage options must not carry credentials ({', '.join(found)}); use the AWS env"
            )
        return value

    @field_validator("train")
    @classmethod
    def _train_options(cls, value: TrainArgs) -> TrainArgs:
        if value.storage_options:
            raise ValueError("train.storage_options: set work_options instead (the pipeline passes them)")
        return value

    def url(self, *parts: str) -> str:
        from streamtune.storage import join

        return join(self.work_url, *parts)

    @property
    def adapter_url(self) -> str:
        return self.train.adapter_path or self.url("adapters")

    @property
    def checkpoint_url(self) -> str:
        return self.train.checkpoint_url or self.url("checkpoints")

    def runs(self, stage: str) -> bool:
        return stage not in self.skip
