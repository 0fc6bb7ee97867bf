"""`streamtune generate --image PATH --audio PATH --prompt ...` with a multimodal adapter folder, and the
Python API it wraps; wrong inputs are one-line errors."""

import json

import pytest
from corpus import speech, tiny_clip_config
from helpers import cli_in_process
from PIL import Image, ImageDraw

import streamtune  # noqa: F401
from streamtune.config import DecodeConfig
from streamtune.decode.clip import save_random_checkpoint
from streamtune.train.data import ListSource, Template
from streamtune.train.synthetic import write_random_model
from streamtune.train.trainer import TrainArgs, train


def picture(colour) -> bytes:
    import io

    img = Image.new("RGB", (64, 64), (250, 250, 250))
    ImageDraw.Draw(img).rectangle([12, 12, 52, 52], fill=colour)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A multimodal adapter folder from two real stage-1 steps on raw media (online encoders)."""
    folder = tmp_path_factory.mktemp("mm")
    clip = tiny_clip_config(folder)
    media = DecodeConfig(
        clip_model=clip,
        clip_pretrained=save_random_checkpoint(clip, str(folder / "clip.safetensors"), seed=0),
        media_tokens=["image", "audio"],
    )
    model = write_random_model(str(folder / "tiny"), "tiny", seed=2)
    rows = [
        {
            "sample_id": f"s{i}",
            "image": picture((200, 30 * i, 30)),
            "audio": speech(f"number {i}"),
            "text": "ok",
        }
        for i in range(4)
    ]
    args = TrainArgs(
        model=model,
        adapter_path=str(folder / "adapter"),
        stage="align",
        media_source="online",
        template=Template(prompt="{image}\n{audio}\nWhat is it?", completion="{text}"),
        iters=2,
        batch_size=2,
        seq_len=128,
        save_every=0,
    )
    train(args, ListSource(rows), media=media)
    (folder / "pic.png").write_bytes(rows[0]["image"])
    (folder / "clip.wav").write_bytes(rows[0]["audio"])
    return {"model": model, "adapter": folder / "adapter", "folder": folder}


def test_generate_with_image_and_audio_through_the_cli(adapter, monkeypatch, capsys):
    folder = adapter["folder"]
    base = ["generate", "--model", adapter["model"], "--adapter-path", str(adapter["adapter"])]
    result = cli_in_process(
        monkeypatch, capsys,
        *base,
        "--image", str(folder / "pic.png"),
        "--audio", str(folder / "clip.wav"),
        "--prompt", "<image>\n<audio>\nWhat is it?",
        "--max-tokens", "6",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # the same through the Python API (greedy: the same text), and placeholders default to the front
    from streamtune.train.mm_generate import load_multimodal

    mm = load_multimodal(adapter["model"], str(adapter["adapter"]))
    text = mm.generate("What is it?", image=folder / "pic.png", audio=folder / "clip.wav", max_tokens=6)
    assert text == result.stdout.strip()  # (a random tiny LM may well say nothing)
    # what generation sees: the next-token distribution depends on the picture
    import mlx.core as mx

    from streamtune.train.multimodal import prompt_with_media, sample_embeddings

    def last_logits(png: bytes):
        ids, placed = prompt_with_media(
            mm.tokenizer, "<image>\nWhat is it?", {"image": [mm.encode("image", png)]}
        )
        return mm.net(mx.array(ids)[None], input_embeddings=sample_embeddings(mm.net, ids, placed))[0, -1]

    assert mx.abs(last_logits(picture((200, 0, 0))) - last_logits(picture((0, 0, 200)))).max().item() > 1e-4
    meta = json.loads((adapter["adapter"] / "multimodal.json").read_text())
    assert meta["media"]["image"]["layer"] == -2 and meta["media"]["audio"]["factor"] == 5
    assert meta["media"]["audio"]["model"] == "offline:tiny.en"


@pytest.mark.parametrize(
    "extra, reason",
    [
        (["--image", "/nonexistent/p.png"], "--image: no such file"),
        (["--audio", "{folder}/pic.png"], "expected audio"),
        (["--prompt", "<audio> what?", "--image", "{folder}/pic.png"], "<audio> placeholder"),
    ],
)
def test_bad_media_inputs_are_one_line_errors(adapter, extra, reason, monkeypatch, capsys):
    folder = adapter["folder"]
    extra = [e.format(folder=folder) for e in extra]
    args = ["generate", "--model", adapter["model"], "--adapter-path", str(adapter["adapter"])]
    if "--prompt" not in extra:
        extra += ["--prompt", "hi"]
    result = cli_in_process(monkeypatch, capsys, *args, *extra)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert reason in lines[0] and "Traceback" not in result.stderr


def test_a_text_adapter_is_not_a_multimodal_one(adapter, tmp_path, monkeypatch, capsys):
    train(
        TrainArgs(model=adapter["model"], adapter_path=str(tmp_path / "text"), iters=1, save_every=0),
        [{"transcript": "a", "text": "b"}],
    )
    result = cli_in_process(
        monkeypatch, capsys,
        "generate", "--model", adapter["model"], "--adapter-path", str(tmp_path / "text"),
        "--image", str(adapter["folder"] / "pic.png"), "--prompt", "hi",
    )  # fmt: skip
    assert result.returncode != 0 and "no multimodal.json" in result.stderr


def test_decode_then_two_stages_and_online_through_the_cli(adapter, tmp_path, monkeypatch, capsys):
    import pyarrow as pa

    from streamtune import storage
    from streamtune.shards import RAW_SCHEMA, commit_index, shard_name, write_shard

    rows = [
        {"sample_id": f"s{i}", "image": picture((200, 40 * i, 30)), "audio": speech(f"number {i}"),
         "text": b"a shape", "sources": [f"s{i}.png", f"s{i}.wav"]}
        for i in range(3)
    ]  # fmt: skip
    raw, features = f"file://{tmp_path}/raw", f"file://{tmp_path}/features"
    commit_index(raw, [write_shard(pa.Table.from_pylist(rows, RAW_SCHEMA), storage.join(raw, shard_name(0)))], RAW_SCHEMA)  # fmt: skip
    clip = json.loads((adapter["adapter"] / "multimodal.json").read_text())["media"]["image"]
    decode = ["--clip-model", clip["model"], "--clip-pretrained", clip["pretrained"]]
    result = cli_in_process(
        monkeypatch,
        capsys,
        "decode",
        raw,
        "--out",
        features,
        *decode,
        "--media-tokens",
        "[image, audio]",
        "--no-transcribe",
    )
    assert result.returncode == 0, result.stderr
    common = [
        "--model",
        adapter["model"],
        "--iters",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "128",
        "--save-every",
        "0",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    result = cli_in_process(
        monkeypatch, capsys, "train", features, *common, "--stage", "align", "--adapter-path", str(one)
    )
    assert result.returncode == 0, result.stderr
    result = cli_in_process(monkeypatch, capsys, "train", features, *common, "--stage", "instruct", "--init-adapter", str(one), "--adapter-path", str(two))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads((two / "multimodal.json").read_text())["stage"] == "instruct"
    # online: the raw shards, encoders from the decode section of a pipeline file
    (tmp_path / "p.yaml").write_text(json.dumps({"decode": {"clip_model": clip["model"], "clip_pretrained": clip["pretrained"]}, "train": {}}))  # fmt: skip
    three = tmp_path / "three"
    result = cli_in_process(monkeypatch, capsys, "train", raw, "-c", str(tmp_path / "p.yaml"), *common, "--stage", "align", "--media-source", "online", "--adapter-path", str(three))  # fmt: skip
    assert result.returncode == 0, result.stderr
    meta = json.loads((three / "multimodal.json").read_text())
    assert meta["media"]["image"]["pretrained"] == clip["pretrained"] and set(meta["media"]) == {
        "image",
        "audio",
    }


def test_batched_generation_gives_each_request_its_own_answer(adapter):
    from streamtune.train.mm_generate import load_multimodal

    mm = load_multimodal(adapter["model"], str(adapter["adapter"]))
    folder = adapter["folder"]
    requests = [
        {"prompt": "What is it?", "image": picture((200, 0, 0))},
        {"prompt": "What is it?", "image": picture((0, 0, 200)), "audio": folder / "clip.wav"},
        {"prompt": "Name it.", "image": picture((0, 200, 0))},
        {"prompt": "What is it?", "image": picture((0, 200, 200))},
    ]
    batched = mm.generate_batch(requests, max_tokens=8)
    one_by_one = [mm.generate(r.pop("prompt"), **r, max_tokens=8) for r in [dict(r) for r in requests]]
    assert batched == one_by_one
    assert any(batched), "the tiny LM says something"
