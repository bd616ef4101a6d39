"""Fixed-length prompt tokenization that reproduces transformers 5's tokenizers.

``PromptTokenizer`` pads and truncates as transformers does with ``padding="max_length",
truncation=True`` over a backend: a ``tokenizers.Tokenizer`` (what transformers 5 builds every
tokenizer on), or paddlenlp's sentencepiece ``T5Tokenizer`` for folders without
``tokenizer.json``. ``tokenizer_loading`` builds them from a folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PaddleNLPBackend", "PromptTokenizer", "TokenizedBatch", "TokenizersBackend"]


@dataclass(frozen=True)
class TokenizedBatch:
    """``input_ids`` int64 ``[B, max_length]``; ``removed[i]``: the text truncation cut off
    from prompt ``i`` ("" if none), decoded as diffusers prints it in its warning."""

    input_ids: np.ndarray
    removed: list[str]


class TokenizersBackend:
    """A ``tokenizers.Tokenizer`` used the way transformers 5 uses it."""

    def __init__(self, tokenizer: Any, strip_word_suffix: str | None):
        self.tokenizer = tokenizer
        self.strip_word_suffix = strip_word_suffix
        self.is_bpe = type(tokenizer.model).__name__ == "BPE"

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def special_layout(self) -> tuple[int, int]:
        mask = self.tokenizer.encode("a").special_tokens_mask
        head = next((i for i, m in enumerate(mask) if not m), len(mask))
        tail = next((i for i, m in enumerate(reversed(mask)) if not m), len(mask))
        return head, tail

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def decode(self, ids: Sequence[int]) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=False)
        if self.strip_word_suffix:  # transformers' CLIPTokenizer patches decode the same way
            text = text.replace(self.strip_word_suffix, " ").strip()
        return text


class PaddleNLPBackend:
    """paddlenlp's sentencepiece T5Tokenizer (for folders without tokenizer.json)."""

    is_bpe = False

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, truncation=False)["input_ids"])

    def special_layout(self) -> tuple[int, int]:
        return 0, 1  # text, then </s>

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.get_vocab().get(token)

    def decode(self, ids: Sequence[int]) -> str:
        # As transformers' Metaspace decoder: pieces joined verbatim, "▁" -> " ", one leading
        # space dropped. (paddlenlp's decode puts spaces around special tokens such as <unk>.)
        text = "".join(self.tokenizer.convert_ids_to_tokens(list(ids))).replace("\u2581", " ")
        return text[1:] if text.startswith(" ") else text


_CLEAN_UP = [
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
]


class PromptTokenizer:
    """Pads/truncates prompts to a fixed length exactly as transformers does with
    ``padding="max_length", truncation=True`` (specials kept: CLIP bos..eos, T5 ...</s>)."""

    def __init__(
        self,
        folder: Path,
        backend: Any,
        config: dict[str, Any],
        pad_token: str,
        default_max_length: int,
        files: Sequence[Path],
    ):
        self.folder = folder
        self.backend = backend
        self.pad_token = pad_token
        pad_id = backend.token_id(pad_token)
        if pad_id is None:
            raise ValueError(f"{folder}: pad token {pad_token!r} is not in the vocabulary")
        self.pad_token_id = int(pad_id)
        self.model_max_length = int(config.get("model_max_length", default_max_length))
        # transformers 5 applies its WordPiece-era space clean-up ("a ," -> "a,") to decoded
        # text only when the folder asks for it, and never to BPE (CLIP) unless forced.
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False)) and (
            not backend.is_bpe
            or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
        )
        self.files = list(files)
        self._head, self._tail = backend.special_layout()

    def encode(self, text: str) -> list[int]:
        """All ids of ``text`` with special tokens, untruncated."""
        return self.backend.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens kept), as transformers' ``decode`` returns it."""
        text = self.backend.decode([int(i) for i in ids])
        if self.clean_up_spaces:
            for before, after in _CLEAN_UP:
                text = text.replace(before, after)
        return text

    def __call__(self, texts: Sequence[str], max_length: int | None = None) -> TokenizedBatch:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not a single string")
        length = self.model_max_length if max_length is None else int(max_length)
        specials = self._head + self._tail
        if length <= specials:
            raise ValueError(f"max_length={length} leaves no room for text ({specials} special tokens)")
        rows = np.full((len(texts), length), self.pad_token_id, dtype=np.int64)
        removed = []
        for i, text in enumerate(texts):
            ids = self.encode(text)
            cut = length - self._tail  # keep the head specials and text up to here, then the tail
            if len(ids) > length:
                removed.append(self.decode(ids[cut : len(ids) - self._tail]))
                ids = ids[:cut] + ids[len(ids) - self._tail :]
            else:
                removed.append("")
            rows[i, : len(ids)] = ids
        return TokenizedBatch(input_ids=rows, removed=removed)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Copy the tokenizer files this was loaded from."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        for file in self.files:
            shutil.copyfile(file, out / file.name)
