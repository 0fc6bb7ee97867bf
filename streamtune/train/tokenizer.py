"""Byte-level BPE tokenizer rebuilt from GGUF metadata (vocab + merges + chat template)."""

from __future__ import annotations

from mlx_lm.tokenizer_utils import TokenizerWrapper

_CONTROL = 3  # llama.cpp token type of special/control tokens
_USER_DEFINED = 4


def hf_tokenizer_from_gguf(meta: dict):
    """A `transformers.PreTrainedTokenizerFast` equivalent to the GGUF's gpt2-style tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    special = [tokens[i] for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])

    def token(key):
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(idx)] if idx is not None else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=token("bos"),
        eos_token=token("eos"),
        pad_token=token("padding") or token("eos"),
        unk_token=token("unknown"),
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )


def wrap(hf_tokenizer, eos_token_ids=None) -> TokenizerWrapper:
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

    return TokenizerWrapper(hf_tokenizer, BPEStreamingDetokenizer, eos_token_ids=eos_token_ids)
