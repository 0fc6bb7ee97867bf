"""Record files end to end over a real S3 server: chat records train an adapter that mlx-lm loads and that
answers like the records; a Hugging Face save_to_disk folder with an Audio column decodes through Whisper."""

from __future__ import annotations

import json

import pytest

from streamtune import CloudStreamingDataset, storage
from streamtune.config import DecodeConfig, TrainArgs
from streamtune.decode.features import decode_shards
from streamtune.ingest import commit_raw_shards, plan_shards, write_raw_shard
from streamtune.manifest import build_manifest

QA = [
    ("What is the codename of project Heron?", "Blue Lantern."),
    ("Who keeps the north gate?", "Captain Ilsa Moreau."),
]


def ingest(source: str, out: str, so: dict, max_shard_bytes: int = 1 << 20) -> list[dict]:
    table, problems = build_manifest(source, so)
    plans = plan_shards(table, max_shard_bytes=max_shard_bytes)
    results = [write_raw_shard(source, table, p, out, source_options=so, out_options=so) for p in plans]
    commit_raw_shards(out, results, so, append=False, problems=problems)
    return problems + [q for r in results for q in r["quarantine"]]


@pytest.mark.slow  # SmolLM2-135M: 56 s on the shared 2-core CPU
def test_chat_records_train_an_adapter_mlx_lm_loads_and_answers_with(
    bucket, s3opts, tmp_path, smollm2_folder
):
    import mlx_lm

    from streamtune.train.trainer import train

    lines = []
    for i in range(8):  # single- and two-turn chats; every assistant turn is learned
        turns = [QA[i % 2]] if i < 4 else QA
        messages = [
            m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
        ]
        lines.append(json.dumps({"messages": messages}))
    storage.write_bytes(f"{bucket}/raw/qa.jsonl", ("\n".join(lines) + "\n").encode(), s3opts)
    assert not ingest(f"{bucket}/raw", f"{bucket}/shards", s3opts)
    decode_shards(f"{bucket}/shards", f"{bucket}/features", DecodeConfig(), s3opts)
    adapter = str(tmp_path / "adapter")
    # measured on the 2-core CPU: 6 steps already answer both questions; 12 leave a margin
    args = TrainArgs(
        adapter_path=adapter,
        iters=12,
        lr=3e-4,
        lr_schedule="constant",
        batch_size=2,
        seq_len=64,
        save_every=0,
    )
    result = train(args, CloudStreamingDataset(f"{bucket}/features", s3opts, shuffle=True))
    assert result["loss_last"] < 0.2 * result["loss_first"]
    model, tokenizer = mlx_lm.load(smollm2_folder, adapter_path=adapter)
    for question, answer in QA:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        said = mlx_lm.generate(model, tokenizer, prompt=prompt, max_tokens=12)  # greedy
        assert said.strip().startswith(answer), (question, said)


def _wav(sentence: str) -> bytes:
    from streamtune.demo.data import _encode_audio, speak

    return _encode_audio(*speak(sentence), "wav")


@pytest.mark.slow  # Whisper tiny.en: about 25 s
def test_hf_save_to_disk_folder_with_audio_decodes_through_whisper(bucket, s3opts, tmp_path):
    datasets = pytest.importorskip("datasets")
    from streamtune.demo.data import upload_dir

    said = ["Hello world, this is a test.", "One two three four five."]
    ds = datasets.Dataset.from_dict(
        {"audio": [{"bytes": _wav(s), "path": None} for s in said], "text": said, "speaker": ["ann", "bob"]}
    ).cast_column("audio", datasets.Audio())
    ds.save_to_disk(str(tmp_path / "hf"))
    upload_dir(str(tmp_path / "hf"), f"{bucket}/raw/speech", s3opts)
    assert not ingest(f"{bucket}/raw", f"{bucket}/shards", s3opts)
    raw = {r["sample_id"]: r for r in CloudStreamingDataset(f"{bucket}/shards", s3opts)}
    assert set(raw) == {"speech/data-00000-of-00001.arrow#0", "speech/data-00000-of-00001.arrow#1"}
    first = raw["speech/data-00000-of-00001.arrow#0"]
    assert first["audio"][:4] == b"RIFF" and json.loads(first["meta"]) == {"text": said[0], "speaker": "ann"}
    decode_shards(f"{bucket}/shards", f"{bucket}/features", DecodeConfig(), s3opts)
    heard = {
        r["sample_id"]: r["transcript"].lower() for r in CloudStreamingDataset(f"{bucket}/features", s3opts)
    }
    # tiny.en, like mlx_whisper.transcribe, hears espeak's "hello world" as "the long world"
    assert "world" in heard["speech/data-00000-of-00001.arrow#0"]
    # and back out: the feature shard set loads with `datasets` (streaming too)
    from streamtune.records.hf import load_shards

    loaded = load_shards(f"{bucket}/features", s3opts)
    assert sorted(loaded["sample_id"]) == sorted(heard) and set(loaded["transcript"]) == {
        r["transcript"] for r in CloudStreamingDataset(f"{bucket}/features", s3opts)
    }
    assert len(list(load_shards(f"{bucket}/shards", s3opts, streaming=True))) == 2
    assert (
        "3" in heard["speech/data-00000-of-00001.arrow#1"]
        or "three" in heard["speech/data-00000-of-00001.arrow#1"]
    )


def test_hub_parquet_layout_with_image_paths_and_bytes(bucket, s3opts, tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def png(colour) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
        return buf.getvalue()

    features = {"image": {"_type": "Image"}, "label": {"dtype": "string", "_type": "Value"}}
    table = pa.table(
        {
            "image": [
                {"bytes": png("red"), "path": None},
                {"bytes": None, "path": "../images/b.png"},
                {"bytes": None, "path": "../../outside.png"},
            ],
            "label": ["red", "blue", "nowhere"],
        }
    ).replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    put = lambda k, d: storage.write_bytes(f"{bucket}/raw/{k}", d, s3opts)  # noqa: E731
    put("data/train-00000-of-00001.parquet", buf.getvalue())
    put("images/b.png", png("blue"))
    put("README.md", b"---\ndataset_info: ...\n---\n# A dataset card, not a sample\n")
    problems = ingest(f"{bucket}/raw", f"{bucket}/shards", s3opts)
    assert [(q["key"], q["error"]) for q in problems] == [
        ("data/train-00000-of-00001.parquet#2", "media_ref")
    ]
    rows = {r["sample_id"]: r for r in CloudStreamingDataset(f"{bucket}/shards", s3opts)}
    key = "data/train-00000-of-00001.parquet#"
    assert rows[key + "0"]["image"] == png("red") and rows[key + "1"]["image"] == png("blue")
    assert rows[key + "2"]["image"] is None and json.loads(rows[key + "2"]["meta"]) == {"label": "nowhere"}
    assert "README" not in rows  # the dataset card is not a sample
