"""Tiny tokenizers for the SD3 fixtures, trained here because nothing can be downloaded.

CLIP: a byte-level BPE laid out exactly like OpenAI CLIP's vocab.json (256 byte characters, the
same with ``</w>``, one token per merge in merge order, then ``<|startoftext|>`` and
``<|endoftext|>`` so eos has the highest id). T5: a sentencepiece unigram model with T5's special
ids (pad 0, eos 1, unk 2, no bos); transformers appends the 100 ``<extra_id_N>`` sentinels.
"""

from __future__ import annotations

import collections
import io
import json
from pathlib import Path

import regex
import sentencepiece as spm

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
T5_EXTRA_IDS = 100

# CLIP's pre-tokenizer pattern (lower-cased text): contractions, letter runs, single digits,
# punctuation runs.
_CLIP_WORD = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")

_SUBJECTS = [
    "a red fox",
    "an old lighthouse",
    "a small wooden boat",
    "two cats",
    "a golden retriever",
    "a bowl of ramen",
    "a castle",
    "an astronaut",
    "a vintage car",
    "a cup of coffee",
    "a mountain lake",
    "a robot",
    "a field of sunflowers",
    "a city street",
    "a snowy forest",
    "a teddy bear",
    "a glass bottle",
    "an owl",
    "a bicycle",
    "a painting of a woman",
]
_PLACES = [
    "on a beach",
    "in the rain",
    "at sunset",
    "under the stars",
    "in a busy market",
    "on the moon",
    "in a quiet library",
    "near a river",
    "in the desert",
    "on a rooftop",
]
_STYLES = [
    "photograph",
    "oil painting",
    "watercolor",
    "digital art",
    "35mm film",
    "studio lighting",
    "highly detailed",
    "cinematic",
    "pencil sketch",
    "8k, sharp focus",
]
_EXTRA = [
    "The quick brown fox jumps over the lazy dog.",
    "A photo of a cat holding a sign that says hello world",
    "Stable Diffusion 3 draws images from text prompts.",
    "It's a beautiful day; we're going to the park, aren't we?",
    "There are 12 apples, 3 oranges and 1 banana on the table.",
    "Portrait of an elderly man with a grey beard, dramatic light",
    "A café in Paris with people drinking coffee outside",
    "Children playing football in the street after school",
    "An ancient temple covered in green moss and vines",
    "Macro shot of a dew drop on a spider web in the morning",
]


def caption_corpus() -> list[str]:
    """A deterministic English caption corpus (a few hundred lines)."""
    lines = []
    for i, subject in enumerate(_SUBJECTS):
        for j, place in enumerate(_PLACES):
            style = _STYLES[(i + 3 * j) % len(_STYLES)]
            lines.append(f"{subject} {place}, {style}")
    return lines + _EXTRA


# ---------------------------------------------------------------- CLIP byte-level BPE


def byte_unicode_table() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table, in CLIP's vocab order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _clip_words(text: str) -> list[str]:
    text = regex.sub(r"\s+", " ", text).strip().lower()
    return _CLIP_WORD.findall(text)


def train_clip_bpe(corpus: list[str], num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Trains byte-level BPE with CLIP's ``</w>`` word ends; returns (vocab, merges).

    Ties are broken by the pair's string order so the result is deterministic.
    """
    table = byte_unicode_table()
    base = [table[b] for b in table]  # insertion order is CLIP's order
    vocab_list = base + [c + "</w>" for c in base]
    known = set(vocab_list)

    word_counts = collections.Counter()
    for line in corpus:
        for word in _clip_words(line):
            chars = [table[b] for b in word.encode("utf-8")]
            word_counts[tuple(chars[:-1] + [chars[-1] + "</w>"])] += 1
    words = dict(word_counts)

    merges: list[tuple[str, str]] = []
    banned: set[tuple[str, str]] = set()
    while len(merges) < num_merges:
        pairs = collections.Counter()
        for symbols, count in words.items():
            for pair in zip(symbols[:-1], symbols[1:], strict=True):
                if pair not in banned:
                    pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = best[0] + best[1]
        if merged in known:  # a second route to an existing token would alias two ids
            banned.add(best)
            continue
        merges.append(best)
        known.add(merged)
        vocab_list.append(merged)
        new_words = {}
        for symbols, count in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + count
        words = new_words
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    # CLIP-style loaders may rebuild the vocab from merges.txt alone; that must give the same ids.
    rebuilt = base + [c + "</w>" for c in base] + [a + b for a, b in merges] + [BOS, EOS]
    if rebuilt != vocab_list or len(vocab) != len(vocab_list):
        raise RuntimeError("CLIP BPE vocab is not the merges-derived layout")
    return vocab, merges


def _clip_added_token(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def write_clip_tokenizer(
    folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str
) -> None:
    """Writes the published CLIP tokenizer files (vocab.json, merges.txt, configs) into folder.

    SD3's ``tokenizer`` pads with ``<|endoftext|>``, its ``tokenizer_2`` pads with ``!``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    added = {str(vocab[BOS]): _clip_added_token(BOS), str(vocab[EOS]): _clip_added_token(EOS)}
    if pad_token not in (BOS, EOS):
        added = {str(vocab[pad_token]): _clip_added_token(pad_token), **added}
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": CLIP_MAX_LENGTH,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }
    special = {
        "bos_token": {**_clip_added_token(BOS), "normalized": True},
        "eos_token": {**_clip_added_token(EOS), "normalized": False},
        "pad_token": {**_clip_added_token(pad_token), "normalized": False},
        "unk_token": {**_clip_added_token(EOS), "normalized": False},
    }
    for entry in special.values():
        entry.pop("special")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- T5 sentencepiece unigram


def train_t5_spiece(corpus: list[str], vocab_size: int) -> bytes:
    """Trains a sentencepiece unigram model with T5's special ids; returns the model bytes."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        normalization_rule_name="nmt_nfkc",
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return buffer.getvalue()


def write_t5_tokenizer(folder: Path, model_bytes: bytes) -> None:
    """Writes the published T5 tokenizer files (spiece.model + configs), as in SD3's tokenizer_3."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model_bytes)
    extra = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    config = {
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "extra_ids": T5_EXTRA_IDS,
        "legacy": True,
        "model_max_length": T5_MAX_LENGTH,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    }
    special = {
        "additional_special_tokens": extra,
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def spiece_size(model_bytes: bytes) -> int:
    """Number of pieces in a sentencepiece model."""
    return spm.SentencePieceProcessor(model_proto=model_bytes).get_piece_size()
