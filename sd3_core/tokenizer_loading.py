"""The CLIP and T5 tokenizers of an SD3 folder, as transformers 5 loads them.

Folders with ``tokenizer.json`` run that file directly; published CLIP folders (``vocab.json`` +
``merges.txt``) get the BPE pipeline transformers builds from those files, and published T5
folders (``spiece.model``) run paddlenlp's sentencepiece ``T5Tokenizer``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sd3_core.model_config import read_json_object
from sd3_core.paddlenlp_shim import paddlenlp_modules
from sd3_core.prompt_tokenizer import PaddleNLPBackend, PromptTokenizer, TokenizersBackend
from sd3_core.text_encoder_folder import existing_folder

__all__ = ["TOKENIZER_FILES", "load_clip_tokenizer", "load_t5_tokenizer"]

_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_VOCAB_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "spiece.model")
#: What the loaders read from a tokenizer folder.
TOKENIZER_FILES = _VOCAB_FILES + _CONFIG_FILES


def _vocab_files(path: Path) -> list[Path]:
    return [path / n for n in _VOCAB_FILES if (path / n).is_file()]


def _special_tokens(path: Path) -> tuple[dict[str, Any], list[Path]]:
    """tokenizer_config.json overlaid with special_tokens_map.json; values as plain strings."""
    merged: dict[str, Any] = {}
    files = []
    for name in _CONFIG_FILES:
        file = path / name
        if file.is_file():
            merged.update(read_json_object(file))
            files.append(file)

    def plain(v: Any) -> Any:
        if isinstance(v, dict) and "content" in v:  # AddedToken serialisation
            return v["content"]
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    return {k: plain(v) for k, v in merged.items()}, files


def _additional_special(cfg: dict[str, Any]) -> list[str]:
    extra = cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens") or []
    return [t for t in extra if isinstance(t, str)]


def _tokenizer_json(file: Path) -> Any:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception with a serde message
        raise ValueError(f"{file}: cannot read tokenizer.json ({e})") from None
    # PromptTokenizer pads and truncates itself; it needs the full, unpadded ids.
    tok.no_truncation()
    tok.no_padding()
    return tok


def _clip_bpe(path: Path, cfg: dict[str, Any]) -> Any:
    """The BPE pipeline transformers 5's CLIPTokenizer builds from vocab.json + merges.txt."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    bos = cfg.get("bos_token", "<|startoftext|>")
    eos = cfg.get("eos_token", "<|endoftext|>")
    unk = cfg.get("unk_token", "<|endoftext|>")
    pad = cfg.get("pad_token", "<|endoftext|>")
    try:
        vocab, merges = BPE.read_file(str(path / "vocab.json"), str(path / "merges.txt"))
    except Exception as e:
        raise ValueError(f"{path}: cannot read vocab.json / merges.txt ({e})") from None
    tok = Tokenizer(
        BPE(
            vocab,
            merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=unk,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    words = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Special tokens are matched in the raw text before BPE, as in transformers; this is why a
    # "!" in a CLIP-G prompt (pad token "!") becomes id 0 rather than the BPE token "!</w>".
    specials = [t for t in dict.fromkeys([pad, bos, eos, unk, *_additional_special(cfg)]) if t]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.post_processor = processors.RobertaProcessing(
        (eos, tok.token_to_id(eos)), (bos, tok.token_to_id(bos)), trim_offsets=False, add_prefix_space=False
    )
    return tok


def load_clip_tokenizer(folder: str | os.PathLike) -> PromptTokenizer:
    """CLIP BPE tokenizer from ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``."""
    path = existing_folder(folder, "CLIP tokenizer")
    cfg, cfg_files = _special_tokens(path)
    if (path / "tokenizer.json").is_file():
        backend = TokenizersBackend(_tokenizer_json(path / "tokenizer.json"), "</w>")
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        backend = TokenizersBackend(_clip_bpe(path, cfg), "</w>")
    else:
        raise FileNotFoundError(
            f"{path}: no CLIP tokenizer files (need tokenizer.json, or vocab.json + merges.txt)"
        )
    pad = cfg.get("pad_token", "<|endoftext|>")
    return PromptTokenizer(path, backend, cfg, pad, 77, _vocab_files(path) + cfg_files)


def load_t5_tokenizer(folder: str | os.PathLike) -> PromptTokenizer:
    """T5 sentencepiece tokenizer from ``tokenizer.json`` or ``spiece.model``."""
    path = existing_folder(folder, "T5 tokenizer")
    cfg, cfg_files = _special_tokens(path)
    if (path / "tokenizer.json").is_file():
        backend: Any = TokenizersBackend(_tokenizer_json(path / "tokenizer.json"), None)
    elif (path / "spiece.model").is_file():
        nlp = paddlenlp_modules()
        extra = _additional_special(cfg)
        kwargs = {k: cfg[k] for k in ("eos_token", "unk_token", "pad_token") if isinstance(cfg.get(k), str)}
        try:
            tok = nlp.T5Tokenizer(
                str(path / "spiece.model"),
                extra_ids=int(cfg.get("extra_ids", 100 if not extra else 0)),
                additional_special_tokens=extra,
                **kwargs,
            )
        except Exception as e:  # sentencepiece raises RuntimeError/OSError without the path
            raise ValueError(f"{path / 'spiece.model'}: cannot load sentencepiece model ({e})") from None
        # Matches special tokens in the raw text before sentencepiece, as transformers does
        # ("</s>" typed in a prompt is the eos id); paddlenlp only does it in from_pretrained.
        tok.sanitize_special_tokens()
        backend = PaddleNLPBackend(tok)
    else:
        raise FileNotFoundError(f"{path}: no T5 tokenizer files (need tokenizer.json or spiece.model)")
    pad = cfg.get("pad_token", "<pad>")
    return PromptTokenizer(path, backend, cfg, pad, 512, _vocab_files(path) + cfg_files)
