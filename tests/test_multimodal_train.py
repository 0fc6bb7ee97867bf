"""Two-stage multimodal training on a tiny model, real MLX steps: stage 1 trains only the projector and
makes the model read its media (counterfactual loss); stage 2 starts from it and trains projector and
LoRA at their own learning rates; the text part of the output still loads in mlx-lm."""

import json

import mlx.core as mx  # noqa: I001
import numpy as np
import pytest

import streamtune  # noqa: F401
from streamtune.train.data import ListSource, Template
from streamtune.train.mm_generate import load_multimodal
from streamtune.train.synthetic import write_random_model
from streamtune.train.trainer import TrainArgs, train

CLASSES = ["red", "green", "blue", "yellow"]
SPEC = {"image": {"encoder": "synthetic", "dim": 16, "tokens": 16}}
TEMPLATE = Template(prompt="{image}\nWhat colour is it?", completion="{text}")
PROTOTYPES = np.random.default_rng(0).standard_normal((4, 16, 16))


def rows(n: int, start: int = 0) -> list[dict]:
    rng = np.random.default_rng(start + 1)
    out = []
    for i in range(start, start + n):
        c = (i * 7) % 4
        feats = PROTOTYPES[c] + 0.2 * rng.standard_normal((16, 16))
        out.append({"sample_id": f"s{i}", "image_tokens": feats.astype(np.float16), "text": CLASSES[c]})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_random_model(str(tmp_path_factory.mktemp("m") / "tiny"), "tiny", seed=4)


def args(tiny, path, **kw):
    base = dict(
        model=tiny,
        adapter_path=str(path),
        stage="align",
        template=TEMPLATE,
        iters=40,
        batch_size=4,
        seq_len=96,
        lr=1e-3,
        projector_lr=1e-2,
        warmup=2,
        num_layers=-1,
        rank=4,
        save_every=0,
    )
    return TrainArgs(**(base | kw))


def test_stage1_projector_only_then_stage2_with_lora(tiny, tmp_path):
    held_out = rows(16, start=1000)
    stage1 = tmp_path / "stage1"
    steps = []
    res = train(args(tiny, stage1), ListSource(rows(64), shuffle=True), on_step=steps.append, media=SPEC)
    assert res["steps"] == 40 and res["loss_last"] < res["loss_first"] - 2
    assert all(m["projector_lr"] != m["lr"] for m in steps[3:])
    files = {p.name for p in stage1.iterdir()}
    assert {
        "adapters.safetensors",
        "adapter_config.json",
        "projector.safetensors",
        "multimodal.json",
    } <= files
    meta = json.loads((stage1 / "multimodal.json").read_text())
    assert meta["media"] == SPEC and meta["stage"] == "align" and meta["placeholders"] == {"image": "<image>"}
    lora = mx.load(str(stage1 / "adapters.safetensors"))
    assert lora and all(k.endswith(("lora_a", "lora_b")) for k in lora)
    assert all(mx.all(v == 0).item() for k, v in lora.items() if k.endswith("lora_b")), "LM frozen in stage 1"

    # a frozen random 2-layer LM is a poor reader, but the projector alone makes it use the media
    untrained = tmp_path / "untrained"
    train(args(tiny, untrained, iters=0), rows(4), media=SPEC)
    before = load_multimodal(tiny, str(untrained)).counterfactual(held_out, seq_len=96)
    after = load_multimodal(tiny, str(stage1)).counterfactual(held_out, seq_len=96)
    assert after["samples"] == 16 and abs(before["shuffled"] - before["matched"]) < 0.1, before
    assert after["matched"] < before["matched"] - 2 and after["shuffled"] - after["matched"] > 0.4, after

    # the text part is a plain mlx-lm adapter
    from mlx_lm import load

    net, _ = load(tiny, adapter_path=str(stage1))
    assert net is not None

    stage2 = tmp_path / "stage2"
    res2 = train(
        args(tiny, stage2, stage="instruct", iters=6, init_adapter=str(stage1), lr=5e-3, projector_lr=1e-4),
        ListSource(rows(32, start=500)),
        media=SPEC,
    )
    assert res2["loss_first"] < res["loss_first"] - 2, "stage 2 starts from the stage-1 projector"
    p1, p2 = mx.load(str(stage1 / "projector.safetensors")), mx.load(str(stage2 / "projector.safetensors"))
    assert any(not mx.array_equal(p1[k], p2[k]).item() for k in p1)
    lora2 = mx.load(str(stage2 / "adapters.safetensors"))
    assert any(mx.abs(v).sum().item() > 0 for k, v in lora2.items() if k.endswith("lora_b")), "LoRA trains"
    assert json.loads((stage2 / "multimodal.json").read_text())["stage"] == "instruct"


def test_mismatched_placeholders_name_the_sample(tiny, tmp_path):
    bad = rows(4)
    bad[2] = {**bad[2], "image_tokens": None}
    literal = Template(prompt="<image>\nWhat colour is it?", completion="{text}")
    with pytest.raises(ValueError, match="sample 's2'.*1 <image> placeholder.*0 image"):
        train(args(tiny, tmp_path / "x", iters=2, template=literal), bad, media=SPEC)
    # with the {image} field instead, a sample without an image simply has no image line
    assert train(args(tiny, tmp_path / "x", iters=1), bad, media=SPEC)["steps"] == 1


def test_cached_tokens_of_the_wrong_width_are_a_clear_error(tiny, tmp_path):
    with pytest.raises(ValueError, match="sample 's0'.*image_tokens has shape"):
        train(args(tiny, tmp_path / "y", iters=1), rows(2), media={"image": {"dim": 8}})
    with pytest.raises(ValueError, match="needs encoder tokens"):
        train(args(tiny, tmp_path / "z", iters=1), rows(2))


def test_projector_inputs_are_standardised_by_the_first_rows_and_stay_frozen(tiny, tmp_path):
    data = rows(64)
    for r in data:  # a large shared component, as encoder tokens have
        r["image_tokens"] = (r["image_tokens"].astype(np.float32) * 3 + 40).astype(np.float16)
    source = ListSource(data, shuffle=True)
    first = [data[i] for i in source._order()[:32]]
    out = tmp_path / "stage1"
    train(args(tiny, out, iters=3, projector_norm_samples=32), source, media=SPEC)

    w = mx.load(str(out / "projector.safetensors"))
    tokens = np.concatenate([r["image_tokens"].astype(np.float64) for r in first])
    shift, scale = np.array(w["image.shift"]), np.array(w["image.scale"])
    np.testing.assert_allclose(shift, tokens.mean(0), rtol=1e-5)
    standardised = (tokens - shift) * scale
    np.testing.assert_allclose(standardised.std(0), 1.0, atol=1e-3)
    assert json.loads((out / "multimodal.json").read_text())["projector_norm"] is True

    # stage 2 keeps the fitted statistics (frozen) while the projector's layers learn
    stage2 = tmp_path / "stage2"
    train(args(tiny, stage2, stage="instruct", iters=3, init_adapter=str(out)), ListSource(data), media=SPEC)
    w2 = mx.load(str(stage2 / "projector.safetensors"))
    assert mx.array_equal(w2["image.shift"], w["image.shift"]) and mx.array_equal(
        w2["image.scale"], w["image.scale"]
    )
    assert not mx.array_equal(w2["image.layers.0.weight"], w["image.layers.0.weight"])
    loaded = load_multimodal(tiny, str(stage2)).net.projectors.image
    assert mx.array_equal(loaded.shift, w2["image.shift"])

    with pytest.raises(ValueError, match="projector_norm"):
        train(
            args(
                tiny, tmp_path / "x", stage="instruct", iters=1, init_adapter=str(out), projector_norm=False
            ),
            ListSource(data),
            media=SPEC,
        )


def test_peek_leaves_a_resumable_dataset_where_it_was():
    from streamtune.train.data import peek

    source = ListSource(rows(8), shuffle=True)
    it = iter(source)
    next(it)
    assert [r["sample_id"] for r in peek(source, 3)] == [r["sample_id"] for r in list(iter(source))[:3]]


def test_media_lr_gives_a_medium_its_own_projector_learning_rate(tiny, tmp_path):
    spec = {"image": SPEC["image"], "audio": {"encoder": "synthetic", "dim": 8, "tokens": 2}}
    template = Template(prompt="{image}\n{audio}\nWhat colour is it?", completion="{text}")
    data = [r | {"audio_tokens": np.ones((2, 8), np.float16) * (i % 3)} for i, r in enumerate(rows(16))]
    weights = {}
    for name, media_lr in (("init", None), ("shared", {}), ("own", {"audio": 1e-9})):
        out = tmp_path / name
        kw = dict(template=template, iters=0 if media_lr is None else 3, media_lr=media_lr or {})
        train(args(tiny, out, **kw), ListSource(data), media=spec)
        weights[name] = mx.load(str(out / "projector.safetensors"))

    def moved(name: str, kind: str) -> float:
        keys = [k for k in weights["init"] if k.startswith(f"{kind}.layers")]
        assert keys
        return max(mx.abs(weights[name][k] - weights["init"][k]).max().item() for k in keys)

    assert moved("shared", "image") > 1e-3 and moved("shared", "audio") > 1e-3
    # the image projector keeps projector_lr (its later steps see a different audio projector)
    assert moved("own", "image") == pytest.approx(moved("shared", "image"), rel=0.05)
    assert moved("own", "audio") < 1e-6  # its own AdamW at 1e-9
    with pytest.raises(ValueError, match="media_lr names"):
        train(
            args(tiny, tmp_path / "bad", template=template, media_lr={"video": 1e-3}),
            ListSource(data),
            media=spec,
        )


def test_projector_kind_per_medium_round_trips_through_the_output_folder(tiny, tmp_path):
    spec = {"image": SPEC["image"], "audio": {"encoder": "synthetic", "dim": 8, "tokens": 2}}
    template = Template(prompt="{image}\n{audio}\nWhat colour is it?", completion="{text}")
    data = [r | {"audio_tokens": np.ones((2, 8), np.float16) * (i % 3)} for i, r in enumerate(rows(8))]
    out = tmp_path / "out"
    train(
        args(tiny, out, template=template, iters=2, projector={"image": "linear"}),
        ListSource(data),
        media=spec,
    )
    assert json.loads((out / "multimodal.json").read_text())["projector"] == {"image": "linear"}
    projectors = load_multimodal(tiny, str(out)).net.projectors
    assert len(projectors.image.layers) == 1 and len(projectors.audio.layers) == 3  # audio: mlp by default
    with pytest.raises(ValueError, match="projector names"):
        train(
            args(tiny, tmp_path / "bad", template=template, projector={"video": "linear"}),
            ListSource(data),
            media=spec,
        )


def test_projector_whitening_decorrelates_the_standardised_tokens(tiny, tmp_path):
    data = rows(64)
    mixing = np.random.default_rng(3).standard_normal((16, 16)) * np.linspace(0.1, 3, 16)
    for r in data:  # strongly correlated features with a few dominant directions
        r["image_tokens"] = (r["image_tokens"].astype(np.float32) @ mixing + 5).astype(np.float16)
    tokens = np.concatenate([r["image_tokens"].astype(np.float64) for r in data])
    for lift in (0.0, 1.0):
        out = tmp_path / f"w{lift}"
        kw = dict(iters=1, projector_whiten=lift, projector_norm_samples=64)
        train(args(tiny, out, **kw), ListSource(data, shuffle=True), media=SPEC)
        w = mx.load(str(out / "projector.safetensors"))
        standardised = (tokens - np.array(w["image.shift"])) * np.array(w["image.scale"])
        white = standardised @ np.array(w["image.whiten"], np.float64)
        eig = np.linalg.eigvalsh(np.corrcoef(tokens.T))  # the reference: numpy's correlation matrix
        got = np.sort(np.linalg.eigvalsh(np.cov(white.T, bias=True)))
        np.testing.assert_allclose(got, eig / (eig + lift * eig.mean()), atol=2e-3)
    np.testing.assert_allclose(np.cov(white.T, bias=True), np.cov(white.T, bias=True).T, atol=1e-6)
    assert json.loads((out / "multimodal.json").read_text())["projector_whiten"] == 1.0

    # stage 2 keeps the matrix frozen and generation rebuilds it; a run without whitening cannot start there
    stage2 = tmp_path / "stage2"
    train(
        args(tiny, stage2, stage="instruct", iters=2, init_adapter=str(out), projector_whiten=1.0),
        ListSource(data),
        media=SPEC,
    )
    assert mx.array_equal(mx.load(str(stage2 / "projector.safetensors"))["image.whiten"], w["image.whiten"])
    assert mx.array_equal(load_multimodal(tiny, str(stage2)).net.projectors.image.whiten, w["image.whiten"])
    with pytest.raises(ValueError, match=r"whitening \[.image.\]"):
        train(
            args(tiny, tmp_path / "x", stage="instruct", iters=1, init_adapter=str(out)),
            ListSource(data),
            media=SPEC,
        )

    # one medium whitened, the other only standardised; an unknown medium or a negative lift is an error
    spec = {"image": SPEC["image"], "audio": {"encoder": "synthetic", "dim": 8, "tokens": 2}}
    template = Template(prompt="{image}\n{audio}\nWhat colour is it?", completion="{text}")
    noisy = np.random.default_rng(5).standard_normal((len(data), 2, 8))
    both = [r | {"audio_tokens": noisy[i].astype(np.float16)} for i, r in enumerate(data)]
    one = tmp_path / "one"
    kw = dict(template=template, iters=1, projector_whiten={"image": 0.5})
    train(args(tiny, one, **kw), ListSource(both), media=spec)
    w = mx.load(str(one / "projector.safetensors"))
    assert "image.whiten" in w and "audio.whiten" not in w and "audio.scale" in w
    with pytest.raises(ValueError, match="projector_whiten names"):
        train(
            args(tiny, tmp_path / "v", template=template, projector_whiten={"video": 1.0}),
            ListSource(both),
            media=spec,
        )
    with pytest.raises(ValueError, match=">= 0"):
        args(tiny, tmp_path / "n", projector_whiten=-1.0)
    # full whitening fitted on fewer tokens than features (one row: 16 tokens, rank 15) stays bounded:
    # no direction is scaled by more than 1 / sqrt(1e-4 x the mean eigenvalue)
    few = tmp_path / "few"
    train(
        args(tiny, few, iters=1, projector_whiten=0.0, projector_norm_samples=1), ListSource(data), media=SPEC
    )
    gain = np.linalg.norm(np.array(mx.load(str(few / "projector.safetensors"))["image.whiten"]), 2)
    assert np.isfinite(gain) and gain <= 101, gain

    # both media whitened: stage 2 starts from stage 1
    both_dir, kw = tmp_path / "both", dict(template=template, projector_whiten=1.0)
    train(args(tiny, both_dir, iters=1, **kw), ListSource(both), media=spec)
    res = train(
        args(tiny, tmp_path / "both2", stage="instruct", iters=1, init_adapter=str(both_dir), **kw),
        ListSource(both),
        media=spec,
    )
    assert res["steps"] == 1
