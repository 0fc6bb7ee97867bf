"""A small CLIP that learns to see the demo's drawings: contrastive training from random init.

No pretrained CLIP weights exist offline, so zero-shot tags and text->frame search would be noise. This
trains an open_clip model (a small convolutional image tower, a 2-layer text tower) on drawings of the
demo's colours and shapes (random sizes, places, backgrounds, noise; `streamtune.demo.multimodal.render`)
against captions. Every step scores each picture against the whole caption vocabulary — every colour x
shape, every colour alone, every shape alone, each in a random phrasing — with one softmax per group
(image -> its caption among all colour x shape captions, among the colour captions, among the shape
captions): every wrong caption is a negative in every batch, and the shape group gets as much weight as
the colour one (with one softmax over everything, colour is learned in minutes and shape never).

The result is an ordinary open_clip config (.json) + state dict (.safetensors), loaded through
`DecodeConfig(clip_model=config, clip_pretrained=checkpoint)`. `trained_clip` caches both under
`<cache_dir>/clip/<hash of the recipe>/` so reruns (the demo, tests) train once.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from streamtune.demo.data import COLOURS, SHAPES, draw_shape

TEMPLATES = ("a {}", "a photo of a {}.", "{}", "a drawing of a {}", "a {} on screen")
# search queries wrap the visual words in talk ("... while a blue square is on screen"): captions are
# sometimes framed by words that say nothing about the picture, so the text tower learns to look past them
FILLER = ("where", "the", "narrator", "speaker", "talks", "says", "about", "during", "when", "someone",
          "mentions", "report", "plan", "news", "meeting", "interview", "and", "of", "that", "this", "new",
          "city", "money", "weather", "show", "me", "find", "moments", "clips", "all", "discusses", "topic")  # fmt: skip
FRAMES = ("{} while a {} is on screen", "{} with a {} visible", "{} and a {} is shown", "a {} {}")


def caption_text(caption: str, rng: np.random.Generator) -> str:
    """One phrasing of a caption: a template, half the time framed by unrelated words."""
    if rng.random() < 0.5:
        return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(caption)
    words = " ".join(FILLER[int(i)] for i in rng.integers(0, len(FILLER), int(rng.integers(2, 9))))
    frame = FRAMES[int(rng.integers(len(FRAMES)))]
    return frame.format(caption, words) if frame.startswith("a ") else frame.format(words, caption)


@dataclass(frozen=True)
class ClipRecipe:
    steps: int = 450
    batch_size: int = 32
    lr: float = 2e-3
    image_size: int = 32
    width: int = 16
    embed_dim: int = 64
    text_width: int = 64
    seed: int = 0
    colour_probe: float = 0.5  # colour comes easily; shape gets the weight (held-out shape 0.79 -> 0.93)
    shape_probe: float = 3.0

    def model_config(self) -> dict:
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size,
                "layers": [1, 1, 1, 1],
                "width": self.width,
                "head_width": 32,
            },
            "text_cfg": {
                "context_length": 32,
                "vocab_size": 49408,
                "width": self.text_width,
                "heads": 2,
                "layers": 2,
            },
        }

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "colours": COLOURS, "shapes": SHAPES, "v": 2}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def captions() -> list[tuple[str, str | None, str | None]]:
    """The caption vocabulary: (text without template, colour or None, shape or None)."""
    out = [(f"{c} {s}", c, s) for c in COLOURS for s in SHAPES]
    out += [(f"{c} shape", c, None) for c in COLOURS]
    out += [(s, None, s) for s in SHAPES]
    return out


def drawing(colour: str, shape: str, rng: np.random.Generator, size: int) -> Image.Image:
    """A shape of 20-85 % of the canvas anywhere on a plain or two-tone background, maybe a distractor
    line or text stripe, then pixel noise; wider than the demo's renderer so frames of other footage fit."""
    bg = (
        tuple(int(v) for v in rng.integers(170, 256, 3))
        if rng.random() < 0.3
        else (int(rng.integers(200, 256)),) * 3
    )
    if rng.random() < 0.2:
        bg = tuple(int(v) for v in rng.integers(0, 70, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    s = max(6, int(size * rng.uniform(0.2, 0.85)))
    x0, y0 = (int(rng.integers(0, max(1, size - s))) for _ in range(2))
    fill = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in COLOURS[colour])
    bar = max(int(s * rng.uniform(0.1, 0.2)), 1) if shape == "cross" else 0  # drawn only for a cross
    draw_shape(d, shape, x0, y0, s, fill, bar)
    if rng.random() < 0.3:
        d.text((int(rng.integers(0, size // 2)), int(rng.integers(0, size - 10))), "text", fill=(90, 90, 90))
    noise = rng.normal(0, rng.uniform(0, 14), (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))


def _batch(rng: np.random.Generator, n: int, image_size: int, preprocess):
    import torch

    colours, shapes, tensors = [], [], []
    for _ in range(n):
        c, s = list(COLOURS)[int(rng.integers(len(COLOURS)))], SHAPES[int(rng.integers(len(SHAPES)))]
        size = int(image_size * rng.choice([2, 3, 4]))  # drawn larger, scaled down like real frames
        tensors.append(preprocess(drawing(c, s, rng, size)))
        colours.append(c)
        shapes.append(s)
    return torch.stack(tensors), colours, shapes


def _targets(colours: list[str], shapes: list[str], caps) -> list[tuple[list[int], list[int]]]:
    """Per caption group (colour x shape, colour, shape): its caption columns and each image's right one."""
    groups = []
    for kind in ("both", "colour", "shape"):
        cols = [
            j
            for j, (_, c, s) in enumerate(caps)
            if kind
            == {(True, True): "both", (True, False): "colour", (False, True): "shape"}[
                (c is not None, s is not None)
            ]
        ]
        right = []
        for c, s in zip(colours, shapes, strict=True):
            right.append(
                next(k for k, j in enumerate(cols) if caps[j][1] in (None, c) and caps[j][2] in (None, s))
            )
        groups.append((cols, right))
    return groups


def train_clip(out_dir: str, recipe: ClipRecipe = ClipRecipe(), log=None) -> tuple[str, str]:
    """Train from random init; writes out_dir/<name>.json (open_clip config) and out_dir/<name>.safetensors.
    Returns (config path, checkpoint path)."""
    import torch
    from safetensors.torch import save_file

    from streamtune.decode.clip import import_open_clip, resolve_model_name

    open_clip = import_open_clip()

    os.makedirs(out_dir, exist_ok=True)
    name = f"streamtune-shapes-{recipe.key()}"
    config_path = os.path.join(out_dir, f"{name}.json")
    with open(config_path, "w") as f:
        json.dump(recipe.model_config(), f)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread per process: the small ops spend more on syncing than on work
    torch.manual_seed(recipe.seed)
    model = open_clip.create_model(resolve_model_name(config_path), pretrained=None)
    model.train()
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
    tokenizer = open_clip.get_tokenizer(name)
    # probes on the image features (not saved): without them the towers settle on colour and never find
    # shape within a few hundred steps; with them the image tower separates shapes and the text tower follows
    probes = torch.nn.ModuleList(
        [torch.nn.Linear(recipe.embed_dim, len(COLOURS)), torch.nn.Linear(recipe.embed_dim, len(SHAPES))]
    )
    opt = torch.optim.AdamW([*model.parameters(), *probes.parameters()], lr=recipe.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=recipe.steps, pct_start=0.1)
    rng = np.random.default_rng(recipe.seed)
    caps = captions()
    t0 = time.perf_counter()
    for step in range(recipe.steps):
        images, colours, shapes = _batch(rng, recipe.batch_size, recipe.image_size, preprocess)
        texts = [caption_text(c, rng) for c, _, _ in caps]
        features = model.encode_image(images)
        img = torch.nn.functional.normalize(features, dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        loss = sum(
            torch.nn.functional.cross_entropy(logits[:, cols], torch.tensor(right))
            for cols, right in _targets(colours, shapes, caps)
        )
        for probe, names, labels, weight in (
            (probes[0], list(COLOURS), colours, recipe.colour_probe),
            (probes[1], SHAPES, shapes, recipe.shape_probe),
        ):
            target = torch.tensor([names.index(x) for x in labels])
            loss = loss + weight * torch.nn.functional.cross_entropy(probe(features), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100.0))
        if log and (step % 25 == 0 or step == recipe.steps - 1):
            log(f"step {step} loss {loss.item():.4f} {time.perf_counter() - t0:.0f}s")
    torch.set_num_threads(threads)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    checkpoint = os.path.join(out_dir, f"{name}.safetensors")
    save_file(state, checkpoint + ".tmp")
    os.replace(checkpoint + ".tmp", checkpoint)
    return config_path, checkpoint


def trained_clip(
    cache_dir: str | None = None, recipe: ClipRecipe = ClipRecipe(), log=None
) -> tuple[str, str]:
    """(config, checkpoint) of the recipe's model, trained once and kept under cache_dir/clip/<key>/."""
    import fcntl

    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "streamtune")
    out_dir = os.path.join(cache_dir, "clip", recipe.key())
    name = f"streamtune-shapes-{recipe.key()}"
    config, checkpoint = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.safetensors")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test workers train once
        if not os.path.exists(checkpoint):
            train_clip(out_dir, recipe, log=log)
    return config, checkpoint


def zero_shot_accuracy(config: str, checkpoint: str, n: int = 120, seed: int = 1234, render=None) -> dict:
    """Colour and shape accuracy on new drawings (another seed), each picture against all colour x shape
    captions "a photo of a {colour} {shape}."; `render(colour, shape, rng)` overrides the drawing."""
    from streamtune.decode.clip import ClipEmbedder

    clip = ClipEmbedder(config, pretrained=checkpoint)
    rng = np.random.default_rng(seed)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    truth = [pairs[int(rng.integers(len(pairs)))] for _ in range(n)]
    draw = render or (lambda c, s, r: drawing(c, s, r, int(r.choice([64, 96, 160, 224]))))
    emb = clip.embed_images([draw(c, s, rng) for c, s in truth])
    text = clip.embed_text([f"a photo of a {c} {s}." for c, s in pairs])
    best = [pairs[j] for j in np.argmax(emb @ text.T, axis=1)]
    colour = sum(b[0] == t[0] for b, t in zip(best, truth, strict=True))
    shape = sum(b[1] == t[1] for b, t in zip(best, truth, strict=True))
    both = sum(b == t for b, t in zip(best, truth, strict=True))
    return {"n": n, "colour": colour / n, "shape": shape / n, "both": both / n}
