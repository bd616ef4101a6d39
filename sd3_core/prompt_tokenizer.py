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
    """transformers' ``BatchEncoding`` fields: ``input_ids`` and ``attention_mask`` (int64
    ``[B, L]`` arrays or tensors, or lists); ``removed[i]``: the text truncation cut off from
    prompt ``i`` ("" if none), decoded as diffusers prints it in its warning."""

    input_ids: Any
    attention_mask: Any
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

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
    ) -> TokenizedBatch:
        """Token ids of ``text`` (one string or a list) as transformers' tokenizer call makes them.

        ``padding``: False (ragged lists), "longest" / True, "max_length"; ``truncation``: True /
        "longest_first" cuts at ``max_length`` (default ``model_max_length``; None truncates only
        when ``max_length`` is given, as transformers does); ``return_tensors``: None (lists),
        "np", "pd" (Paddle). SD3 encodes with ``padding="max_length", truncation=True``."""
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings")
        padding = {True: "longest", False: "do_not_pad"}.get(padding, padding)
        if padding not in ("do_not_pad", "longest", "max_length"):
            raise ValueError(
                f"padding={padding!r} is not supported; use False, 'longest' (True) or 'max_length'"
            )
        if truncation not in (None, True, False, "longest_first", "do_not_truncate"):
            raise ValueError(f"truncation={truncation!r} is not supported; use True or False")
        if return_tensors not in (None, "np", "pd"):
            hint = "; torch is not used here" if return_tensors == "pt" else ""
            raise ValueError(
                f"return_tensors={return_tensors!r} is not supported{hint}: use 'pd' (Paddle), 'np' or None"
            )
        if not add_special_tokens:
            raise ValueError(
                "add_special_tokens=False is not supported: SD3's encoders read the special tokens"
            )
        truncate = truncation in (True, "longest_first") or (truncation is None and max_length is not None)
        length = self.model_max_length if max_length is None else int(max_length)
        specials = self._head + self._tail
        if truncate and length <= specials:
            raise ValueError(f"max_length={length} leaves no room for text ({specials} special tokens)")
        rows, removed = [], []
        for t in texts:
            ids = self.encode(t)
            cut = length - self._tail  # keep the head specials and text up to here, then the tail
            if truncate and len(ids) > length:
                removed.append(self.decode(ids[cut : len(ids) - self._tail]))
                ids = ids[:cut] + ids[len(ids) - self._tail :]
            else:
                removed.append("")
            rows.append(ids)
        width = {"do_not_pad": 0, "longest": 0, "max_length": length}[padding]
        width = max([width, *map(len, rows)])
        if padding == "do_not_pad" and len(set(map(len, rows))) > 1:
            if return_tensors is not None:
                raise ValueError(
                    f"return_tensors={return_tensors!r} needs rows of one length: pass padding=True"
                )
            return TokenizedBatch(
                input_ids=rows, attention_mask=[[1] * len(r) for r in rows], removed=removed
            )
        ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        if return_tensors is None:
            return TokenizedBatch(input_ids=ids.tolist(), attention_mask=mask.tolist(), removed=removed)
        if return_tensors == "pd":
            import paddle  # the tokenizers themselves never need Paddle

            return TokenizedBatch(paddle.to_tensor(ids), paddle.to_tensor(mask), removed)
        return TokenizedBatch(input_ids=ids, attention_mask=mask, removed=removed)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Copy the tokenizer files this was loaded from."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        for file in self.files:
            shutil.copyfile(file, out / file.name)
