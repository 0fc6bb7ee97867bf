"""Frozen encoders as token sources for multimodal training.

- Images: patch tokens of an open_clip ViT from one block (`image_layer`, default -2: the penultimate,
  as LLaVA takes them), optionally merged `image_pool` x `image_pool` patches at a time: averaged
  (`image_merge: mean`, width stays) or concatenated (`stack`, width x pool^2, like Qwen2-VL's 2 x 2
  merger: fewer tokens that still see their neighbourhood's layout) or max-pooled (`max`, width stays; with
  `image_pool` >= the grid side, one token per image: each feature's strongest response anywhere, which says
  what is in the picture wherever it is). The class token is left out. The same pass gives the usual L2-normalised CLIP embedding.
- Audio: Whisper encoder frames (50 per second) from one block (`audio_layer`, -1: the final output after
  `ln_post`, what Whisper's decoder attends to), cut to the clip's length and stacked (SLAM-ASR) or
  averaged `audio_factor` at a time: 5 gives 10 tokens per second. Clips longer than 30 s are encoded in
  30 s windows whose tokens are concatenated. `audio_context`: `window` pads each window to 30 s as
  Whisper was trained (a 2 s clip costs as much as 30 s: about 2 s of CPU for tiny.en here); `clip`
  (default) runs the encoder on the clip's own frames only (positions 0..n), 15x cheaper for 2 s clips.

`media_spec(cfg, kinds)` describes both without loading weights (names, layers, pooling, widths); the
feature index and the adapter's `multimodal.json` carry it, so training and generation rebuild the same
encoders. Outputs are float16 arrays of shape (tokens, dim).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading

import numpy as np

import streamtune  # noqa: F401  (OpenBLAS before mlx)

# On CUDA, build_encoders gives torch's image tower a stream of its own: on the legacy default stream
# each tower call waits for (and holds up) the training step's work on MLX's streams
TORCH_SIDE_STREAM = True

SAMPLE_RATE = 16000
FRAMES_PER_SECOND = 50  # Whisper encoder frames: 20 ms each
WINDOW_SAMPLES = 30 * SAMPLE_RATE


def _clip_config(model_name: str) -> dict:
    from streamtune.decode.clip import import_open_clip, resolve_model_name

    return import_open_clip().get_model_config(resolve_model_name(model_name))


def _grid(vision: dict) -> int:
    size = vision.get("image_size", 224)
    size = max(size) if isinstance(size, list | tuple) else size
    return int(size) // int(vision["patch_size"])


def image_spec(cfg) -> dict:
    """What the image tokens are: encoder, block, pooling, tokens per image, width."""
    vision = _clip_config(cfg.clip_model)["vision_cfg"]
    if "patch_size" not in vision or isinstance(vision.get("layers"), list | tuple):
        raise ValueError(f"image tokens need a ViT image tower; {cfg.clip_model} has none")
    _block_index(cfg.image_layer, int(vision["layers"]))
    side = math.ceil(_grid(vision) / cfg.image_pool)
    width = int(vision["width"]) * (cfg.image_pool**2 if cfg.image_merge == "stack" else 1)
    return {
        "encoder": "open_clip",
        "model": cfg.clip_model,
        "pretrained": cfg.clip_pretrained,
        "layer": cfg.image_layer,
        "pool": cfg.image_pool,
        "merge": cfg.image_merge,
        "tokens": side * side,
        "dim": width,
    }


def audio_spec(cfg) -> dict:
    """What the audio tokens are: encoder, block, stacking, tokens per second, width."""
    dims = _whisper_dims(cfg.whisper_model, cfg.cache_dir)
    _block_index(cfg.audio_layer, dims["n_audio_layer"])
    width = dims["n_audio_state"] * (cfg.audio_factor if cfg.audio_pool == "stack" else 1)
    return {
        "encoder": "whisper",
        "model": cfg.whisper_model,
        "layer": cfg.audio_layer,
        "pool": cfg.audio_pool,
        "factor": cfg.audio_factor,
        "context": cfg.audio_context,
        "tokens_per_second": FRAMES_PER_SECOND / cfg.audio_factor,
        "dim": int(width),
    }


def media_spec(cfg, kinds) -> dict:
    """{kind: spec} for the media kinds in `kinds` (image, audio) under DecodeConfig `cfg`."""
    make = {"image": image_spec, "audio": audio_spec}
    unknown = set(kinds) - set(make)
    if unknown:
        raise ValueError(f"unknown media kinds {sorted(unknown)} (known: image, audio)")
    return {k: make[k](cfg) for k in ("image", "audio") if k in kinds}


def _block_index(layer: int, blocks: int) -> int:
    index = layer if layer >= 0 else blocks + layer
    if not 0 <= index < blocks:
        raise ValueError(f"layer {layer} is out of range for an encoder of {blocks} blocks")
    return index


def _whisper_dims(model: str, cache_dir: str | None) -> dict:
    from streamtune.decode.whisper_convert import resolve_whisper

    with open(os.path.join(resolve_whisper(model, cache_dir), "config.json")) as f:
        return json.load(f)


def config_from_spec(spec: dict, **extra):
    """A DecodeConfig that rebuilds the encoders of `spec` (from a feature index or multimodal.json)."""
    from streamtune.config import DecodeConfig

    fields = dict(extra)
    if "image" in spec:
        s = spec["image"]
        fields |= {"clip_model": s["model"], "clip_pretrained": s.get("pretrained")}
        fields |= {"image_layer": s["layer"], "image_pool": s["pool"], "image_merge": s.get("merge", "mean")}
    if "audio" in spec:
        s = spec["audio"]
        fields |= {"whisper_model": s["model"], "audio_layer": s["layer"]}
        fields |= {"audio_pool": s["pool"], "audio_factor": s["factor"]}
        fields |= {"audio_context": s.get("context", "window")}
    return DecodeConfig(**fields, media_tokens=list(spec))


class ImageTokens:
    """CLIP patch tokens (and the image embedding) of prepared image tensors, in one pass."""

    def __init__(self, clip, layer: int = -2, pool: int = 1, merge: str = "mean"):
        self.clip = clip
        self.visual = clip.model.visual
        self.block = _block_index(layer, len(self.visual.transformer.resblocks))
        self.pool = int(pool)
        if merge not in ("mean", "stack", "max"):
            raise ValueError(f"image_merge must be mean, stack or max, got {merge!r}")
        self.merge = merge

    def encode(self, tensors: list) -> tuple[np.ndarray, list[np.ndarray]]:
        """(embeddings (N, D) float32 L2-normalised, [(tokens, width) float16 per image])."""
        torch = self.clip.torch
        embeddings, tokens = [np.zeros((0, self.clip.dim), np.float32)], []
        for b in range(0, len(tensors), self.clip.batch_size):
            batch = torch.stack(tensors[b : b + self.clip.batch_size]).to(self.clip.device)
            with torch.inference_mode():
                out = self.visual.forward_intermediates(batch, indices=[self.block], output_fmt="NCHW")
                feats = out["image_features"].float()
                feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                grid = out["image_intermediates"][0].float()  # (N, width, gh, gw)
                flat = self._merge(grid)  # (N, tokens, width), row-major over the grid
            embeddings.append(feats.cpu().numpy().astype(np.float32))
            tokens += list(flat.cpu().numpy().astype(np.float16))
            self.clip.stats["images"] += len(batch)
            self.clip.stats["batches"] += 1
        return np.concatenate(embeddings), tokens

    def pixel_options(self) -> dict:
        """What `image_pixels` needs to give this tower's input geometry (picklable)."""
        norm = [t for t in self.clip.preprocess.transforms if type(t).__name__ == "Normalize"]
        return {
            "image_size": self.visual.image_size,
            "mean": tuple(float(v) for v in norm[0].mean),
            "std": tuple(float(v) for v in norm[0].std),
        }

    def encode_tokens(self, images: list, batch_size: int = 64) -> list[np.ndarray]:
        """[(tokens, width) float16 per image] only: the tower stops after block `layer` and takes
        `batch_size` images per call (each image's tokens are its own: no cross-image interaction).
        `images`: `clip.prepare` tensors, or `image_pixels` arrays (scaled and normalised on the device)."""
        torch = self.clip.torch
        tokens: list[np.ndarray] = []
        side = getattr(self, "cuda_stream", None)
        for b in range(0, len(images), batch_size):
            chunk = images[b : b + batch_size]
            with contextlib.nullcontext() if side is None else torch.cuda.stream(side):
                tokens += self._tokens(chunk)
        return tokens

    def _tokens(self, chunk: list) -> list[np.ndarray]:
        torch = self.clip.torch
        dtype = next(self.visual.parameters()).dtype
        if isinstance(chunk[0], np.ndarray):
            batch = self._normalise(torch.from_numpy(np.stack(chunk)).to(self.clip.device)).to(dtype)
        else:
            batch = torch.stack(chunk).to(self.clip.device, dtype)
        with torch.inference_mode():
            out = self.visual.forward_intermediates(
                batch, indices=[self.block], stop_early=True, intermediates_only=True, output_fmt="NCHW"
            )
            flat = self._merge(out["image_intermediates"][0].float()).half()
        self.clip.stats["images"] += len(batch)
        self.clip.stats["batches"] += 1
        return list(flat.cpu().numpy())

    def _normalise(self, pixels):
        """(N, H, W, 3) uint8 -> the tower's input: ToTensor's scaling and Normalize, on the device."""
        torch = self.clip.torch
        if not hasattr(self, "_mean"):
            opts = self.pixel_options()
            self._mean = torch.tensor(opts["mean"], device=self.clip.device).view(1, 3, 1, 1)
            self._std = torch.tensor(opts["std"], device=self.clip.device).view(1, 3, 1, 1)
        x = pixels.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
        return x.sub(self._mean).div(self._std)

    def _merge(self, grid):
        """(N, width, gh, gw) patch grid -> (N, tokens, token width)."""
        import torch

        p = self.pool
        if p > 1 and self.merge in ("mean", "max"):
            side = (math.ceil(grid.shape[-2] / p), math.ceil(grid.shape[-1] / p))
            F = torch.nn.functional
            grid = (F.adaptive_avg_pool2d if self.merge == "mean" else F.adaptive_max_pool2d)(grid, side)
        elif p > 1:  # stack: zero-pad to a multiple of p, then each p x p block becomes one token
            grid = torch.nn.functional.pad(grid, (0, -grid.shape[-1] % p, 0, -grid.shape[-2] % p))
            n, w, h, v = grid.shape
            blocks = grid.reshape(n, w, h // p, p, v // p, p).permute(0, 2, 4, 3, 5, 1)
            return blocks.reshape(n, (h // p) * (v // p), p * p * w)
        return grid.flatten(2).transpose(1, 2)


class AudioTokens:
    """Whisper encoder frames of 16 kHz mono clips, cut to length and stacked or pooled."""

    def __init__(
        self,
        model: str,
        layer: int = -1,
        factor: int = 5,
        pool: str = "stack",
        cache_dir: str | None = None,
        whisper=None,
        context: str = "clip",
    ):
        import mlx.core as mx

        from streamtune.decode.whisper_import import skip_package_init

        skip_package_init()  # as the transcriber: mlx_whisper.transcribe's numba + scipy are not needed here
        from mlx_whisper.load_models import load_model

        from streamtune.decode.whisper_convert import resolve_whisper

        if pool not in ("stack", "mean") or factor < 1:
            raise ValueError(f"audio pooling must be stack or mean with factor >= 1, got {pool} x {factor}")
        if context not in ("clip", "window"):
            raise ValueError(f"audio context must be clip or window, got {context!r}")
        self.context = context
        self.model = whisper or load_model(resolve_whisper(model, cache_dir), dtype=mx.float32)
        self.encoder = self.model.encoder
        from mlx_whisper.audio import N_FFT, hanning, mel_filters

        # evaluated here, so that any thread can use them (a lazy array belongs to its stream's thread)
        mx.eval(self.model.parameters(), self.encoder._positional_embedding)
        mx.eval(hanning(N_FFT), mel_filters(self.model.dims.n_mels))
        self.block = _block_index(layer, len(self.encoder.blocks))
        self.final = self.block == len(self.encoder.blocks) - 1
        self.factor, self.pool = int(factor), pool
        self._streams = threading.local()  # an MLX stream belongs to the thread that made it

    def stream(self):
        """This thread's MLX stream for the encoder: safe beside training in another thread."""
        import mlx.core as mx

        if getattr(self._streams, "stream", None) is None:
            self._streams.stream = mx.new_stream(mx.default_device())
        return self._streams.stream

    def _frames(self, windows: list[np.ndarray]) -> np.ndarray:
        """Encoder output of windows of equal length (30 s, or one window of any length up to 30 s)."""
        import mlx.core as mx
        import mlx.nn as nn
        from mlx_whisper.audio import log_mel_spectrogram

        enc = self.encoder
        n_mels = self.model.dims.n_mels
        size = WINDOW_SAMPLES if self.context == "window" else -(-max(w.size for w in windows) // 320) * 320
        padded = [np.pad(w, (0, size - w.size)) for w in windows]
        mel = mx.stack([log_mel_spectrogram(mx.array(w), n_mels) for w in padded])
        x = nn.gelu(enc.conv1(mel.astype(enc.conv1.weight.dtype)))
        x = nn.gelu(enc.conv2(x))
        x = x + enc._positional_embedding[: x.shape[1]].astype(x.dtype)
        for block in enc.blocks[: self.block + 1]:
            x, _, _ = block(x)
        if self.final:
            x = enc.ln_post(x)
        return np.array(x.astype(mx.float32))

    def encode(self, audio: np.ndarray) -> np.ndarray:
        """(tokens, width) float16 for one clip; at least one token, even for silence."""
        return self.encode_many([audio], batch_size=1)[0]

    def encode_many(self, audios: list[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
        """`encode` for several clips. Context `window` pads every window to 30 s (as Whisper was trained)
        and encodes `batch_size` at a time; `clip` encodes only each window's own frames, one at a time
        (no padding, so results never depend on what else is in a batch; a 2 s clip costs 1/15 of a
        window)."""
        import mlx.core as mx

        windows, owner = _windows(audios)
        parts: list[list[np.ndarray]] = [[] for _ in audios]
        batch_size = batch_size if self.context == "window" else 1
        for b in range(0, len(windows), batch_size):
            chunk = windows[b : b + batch_size]
            with mx.stream(self.stream()):  # its own stream: safe beside training in another thread
                frames = self._frames(chunk)
            for i, w, f in zip(owner[b : b + batch_size], chunk, frames, strict=True):
                parts[i].append(self._pool(f, w.size))
        return [np.concatenate(p).astype(np.float16) for p in parts]

    def encode_batch(self, audios: list[np.ndarray], batch_size: int = 32) -> list[np.ndarray]:
        """`encode` for several clips, `batch_size` 30 s windows per encoder call. Context `clip`: each
        window's log-mel is its own (as alone), windows are zero-padded to the longest of the call and
        attention ignores the padding, so every clip's tokens equal `encode`'s within float rounding."""
        import mlx.core as mx

        if self.context == "window":
            return self.encode_many(audios, batch_size)
        windows, owner = _windows(audios)
        parts: list[dict[int, np.ndarray]] = [{} for _ in audios]
        order = sorted(range(len(windows)), key=lambda j: windows[j].size)  # similar lengths: less padding
        for b in range(0, len(order), batch_size):
            chunk = order[b : b + batch_size]
            with mx.stream(self.stream()):
                frames = self._frames_masked([windows[j] for j in chunk])
            for j, f in zip(chunk, frames, strict=True):
                parts[owner[j]][j] = self._pool(f, windows[j].size)
        return [np.concatenate([p[j] for j in sorted(p)]).astype(np.float16) for p in parts]

    def _frames_masked(self, windows: list[np.ndarray]) -> list[np.ndarray]:
        """Encoder output of windows of any lengths (up to 30 s) in one pass: [(frames_i, width)]."""
        import mlx.core as mx
        import mlx.nn as nn

        enc = self.encoder
        mel, frames = _batched_log_mel(windows, self.model.dims.n_mels)
        mel = mel.astype(enc.conv1.weight.dtype)
        # mel frames past a window's end are zero: conv1 sees what its own zero padding gives, and
        # conv2's outputs inside the window never reach past it (stride 2, even frame counts)
        x = nn.gelu(enc.conv1(mel))
        x = nn.gelu(enc.conv2(x))
        x = x + enc._positional_embedding[: x.shape[1]].astype(x.dtype)
        valid = [m // 2 for m in frames]
        keys = mx.arange(x.shape[1])[None, :] < mx.array(valid)[:, None]
        mask = mx.where(keys, 0.0, -mx.inf).astype(x.dtype)[:, None, None, :]  # (B, 1, 1, T)
        for block in enc.blocks[: self.block + 1]:
            x = _masked_block(block, x, mask)
        if self.final:
            x = enc.ln_post(x)
        out = np.array(x.astype(mx.float32))
        return [out[i, :n] for i, n in enumerate(valid)]

    def _pool(self, frames: np.ndarray, samples: int) -> np.ndarray:
        n = max(1, math.ceil(samples * FRAMES_PER_SECOND / SAMPLE_RATE))
        n = min(math.ceil(n / self.factor) * self.factor, frames.shape[0])
        f = frames[:n]
        if n % self.factor:
            f = np.concatenate([f, np.zeros((self.factor - n % self.factor, f.shape[1]), f.dtype)])
        grouped = f.reshape(-1, self.factor, f.shape[1])
        return grouped.reshape(grouped.shape[0], -1) if self.pool == "stack" else grouped.mean(1)


_GEOMETRY: dict = {}


def image_pixels(image, options: dict) -> np.ndarray:
    """(H, W, 3) uint8: open_clip's eval transform of `image` without its tensor conversion and
    normalisation (`ImageTokens.encode_tokens` does those on the device). Picklable inputs, so a
    process pool can run it."""
    key = repr(options)
    if key not in _GEOMETRY:
        from streamtune.decode.clip import import_open_clip

        full = import_open_clip().image_transform(
            options["image_size"], is_train=False, mean=options["mean"], std=options["std"]
        )
        names = [type(t).__name__ for t in full.transforms]
        if names[-2:] not in (["ToTensor", "Normalize"], ["MaybeToTensor", "Normalize"]):
            raise ValueError(f"unexpected open_clip transform {names}")
        _GEOMETRY[key] = full.transforms[:-2]
    for t in _GEOMETRY[key]:
        image = t(image)
    return np.asarray(image.convert("RGB"), np.uint8)


def _batched_log_mel(windows: list[np.ndarray], n_mels: int):
    """mlx_whisper's log_mel_spectrogram of each window (zero-padded to a multiple of 320 samples, as
    `_frames` pads a lone window) in one batch: ((B, frames, n_mels) with zeros past each window's own
    frames, [frames per window]). Reflect padding and the max - 8 dB floor are each window's own."""
    import mlx.core as mx
    from mlx_whisper.audio import HOP_LENGTH, N_FFT, hanning, mel_filters

    from streamtune.decode.whisper import stft_pad

    signals = []
    for w in windows:
        signals.append(
            stft_pad(np.pad(np.asarray(w, np.float32), (0, -(-max(w.size, 1) // 320) * 320 - w.size)))
        )
    frames = [(s.size - N_FFT) // HOP_LENGTH for s in signals]  # stft's frames less the last, as there
    longest = max(s.size for s in signals)
    batch = mx.array(np.stack([np.pad(s, (0, longest - s.size)) for s in signals]))
    count = max(frames)
    strided = mx.as_strided(batch, shape=(len(signals), count, N_FFT), strides=(longest, HOP_LENGTH, 1))
    spectrum = mx.fft.rfft(strided * hanning(N_FFT))
    mel = spectrum.abs().square() @ mel_filters(n_mels).T
    log_spec = mx.maximum(mel, 1e-10).log10()
    valid = (mx.arange(count)[None, :] < mx.array(frames)[:, None])[:, :, None]
    floor = mx.where(valid, log_spec, -mx.inf).max(axis=(1, 2), keepdims=True) - 8.0
    log_spec = (mx.maximum(log_spec, floor) + 4.0) / 4.0
    return mx.where(valid, log_spec, 0.0), frames


def _masked_block(block, x, mask):
    """A Whisper encoder block (mlx_whisper's ResidualAttentionBlock, self-attention only) whose keys
    are masked by `mask` (B, 1, 1, T): 0 where a key is a window's own frame, -inf on padding."""
    import mlx.core as mx
    import mlx.nn as nn

    from streamtune.decode.whisper import attention_heads

    attn = block.attn
    n, t, d = x.shape
    q, k, v = attention_heads(attn, block.attn_ln(x))
    w = mx.softmax(q @ k + mask, axis=-1, precise=True)
    x = x + attn.out((w @ v).transpose(0, 2, 1, 3).reshape(n, t, d))
    return x + block.mlp2(nn.gelu(block.mlp1(block.mlp_ln(x))))


def build_encoders(cfg, kinds) -> dict:
    """{"cfg", "image": ImageTokens, "audio": AudioTokens} for the kinds asked, from DecodeConfig `cfg`
    (one medium at a time: online training and generation)."""
    out = {"cfg": cfg}
    if "image" in kinds:
        import torch

        from streamtune.decode.clip import ClipEmbedder

        # On a CUDA machine the image tower runs there, beside the training step (a data-path thread)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        clip = ClipEmbedder(cfg.clip_model, cfg.clip_pretrained, labels=[], batch_size=1, device=device)
        out["image"] = ImageTokens(clip, cfg.image_layer, cfg.image_pool, cfg.image_merge)
        if device == "cuda" and TORCH_SIDE_STREAM:
            out["image"].cuda_stream = torch.cuda.Stream()
    if "audio" in kinds:
        out["audio"] = AudioTokens(
            cfg.whisper_model,
            cfg.audio_layer,
            cfg.audio_factor,
            cfg.audio_pool,
            cfg.cache_dir,
            context=cfg.audio_context,
        )
    return out


def _windows(audios: list[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    """Every clip cut into 30 s windows, and the clip each window belongs to."""
    windows, owner = [], []
    for i, audio in enumerate(audios):
        audio = np.asarray(audio, np.float32).reshape(-1)
        for s in range(0, max(audio.size, 1), WINDOW_SAMPLES):
            windows.append(audio[s : s + WINDOW_SAMPLES])
            owner.append(i)
    return windows, owner
