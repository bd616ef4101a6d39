"""SD3's text side: CLIP-L / CLIP-G / T5 v1.1 encoders and their tokenizers.

The only module of the project that imports paddlenlp, so the encoders can be swapped for
another implementation behind the same four loaders. Checkpoints are read in the layout
transformers writes (``config.json`` + ``model.safetensors``, PyTorch tensor layout) and the
outputs reproduce transformers' ``CLIPTextModelWithProjection(output_hidden_states=True)`` and
``T5EncoderModel``. Token ids reproduce transformers 5's tokenizers (which are all built on the
``tokenizers`` library): folders with ``tokenizer.json`` run that file directly; published CLIP
folders (``vocab.json`` + ``merges.txt``) get the same BPE pipeline built from those files, and
published T5 folders (``spiece.model``) run paddlenlp's sentencepiece ``T5Tokenizer``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paddle

from sd3_core import runtime  # noqa: F401  (must run before paddle is imported)
from sd3_core.hub import weights_patterns
from sd3_core.modeling import (
    Config,
    compute_dtype,
    load_torch_state,
    read_json_object,
    resolve_dtype,
    torch_state_from,
)
from sd3_core.safetensors_io import WeightsIndex, open_weights, write_safetensors

__all__ = [
    "ClipTextEncoder",
    "PromptTokenizer",
    "T5Encoder",
    "TokenizedBatch",
    "clip_text_encoder_from_weights",
    "load_clip_text_encoder",
    "load_clip_tokenizer",
    "load_t5_encoder",
    "load_t5_tokenizer",
    "t5_encoder_from_weights",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


# ---------------------------------------------------------------------------------------------
# paddlenlp (imported lazily: ~2 s, global patches, and noise that tokenizer-only users avoid)


@functools.cache
def _paddlenlp() -> Any:
    """Import paddlenlp's CLIP and T5 modules once, without its import-time warnings.

    Importing paddlenlp patches ``paddle.nn.TransformerEncoder(Layer).forward`` process-wide
    (adds ``output_hidden_states``) and adds ``paddle.nn.functional.quick_gelu``; the CLIP
    encoder relies on both.
    """
    import logging

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ccache.*")
        warnings.filterwarnings("ignore", message=".*distutils.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        import paddlenlp.transformers.clip.configuration as clip_configuration
        import paddlenlp.transformers.clip.modeling as clip_modeling
        import paddlenlp.transformers.model_utils as model_utils
        import paddlenlp.transformers.t5.configuration as t5_configuration
        import paddlenlp.transformers.t5.modeling as t5_modeling
        import paddlenlp.transformers.t5.tokenizer as t5_tokenizer
        from paddlenlp.utils.log import logger

    logger.set_level("WARNING")  # its INFO lines ("ftfy not installed", ...) are not ours to show
    logging.getLogger("paddlenlp").setLevel(logging.WARNING)

    class _Modules:
        CLIPTextConfig = clip_configuration.CLIPTextConfig
        CLIPTextTransformer = clip_modeling.CLIPTextTransformer
        T5Config = t5_configuration.T5Config
        T5EncoderModel = t5_modeling.T5EncoderModel
        T5LayerNorm = t5_modeling.T5LayerNorm
        T5Attention = t5_modeling.T5Attention
        T5LayerSelfAttention = t5_modeling.T5LayerSelfAttention
        T5LayerFF = t5_modeling.T5LayerFF
        T5Tokenizer = t5_tokenizer.T5Tokenizer
        no_init_weights = staticmethod(model_utils.no_init_weights)

    return _Modules


# ---------------------------------------------------------------------------------------------
# shared helpers


def _folder(folder: str | os.PathLike, what: str) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: {what} folder not found")
    return path


def _run_dtype(dtype: str | paddle.dtype) -> str:
    """The dtype weights are held and run in: the request, or float32 where the device lacks
    half-precision kernels (Paddle's CPU build; see modeling.compute_dtype)."""
    name = resolve_dtype(dtype)
    return resolve_dtype(compute_dtype(getattr(paddle, name)))


def _save_model(folder: str | os.PathLike, hf_config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / WEIGHTS_NAME, tensors, {"format": "pt"})
    tmp = out / f".{CONFIG_NAME}.tmp"
    tmp.write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, out / CONFIG_NAME)


def _build_lazily(build):
    # No random init: the checkpoint overwrites every parameter (T5-XXL would spend seconds
    # and 19 GB initialising float32 weights first). paddlenlp's PretrainedModel runs its own
    # init_weights after __init__, which cannot touch lazy parameters, so that is switched off.
    with paddle.LazyGuard(), _paddlenlp().no_init_weights():
        return build()


class _default_dtype:
    """Build layers with ``dtype`` as Paddle's default (paddlenlp creates some parameters with it)."""

    def __init__(self, dtype: str):
        self.dtype = dtype

    def __enter__(self) -> None:
        self.previous = paddle.get_default_dtype()
        paddle.set_default_dtype(self.dtype)

    def __exit__(self, *exc: Any) -> None:
        paddle.set_default_dtype(self.previous)


# ---------------------------------------------------------------------------------------------
# CLIP text encoder

# paddlenlp's CLIPTextTransformer names -> transformers' CLIPTextModel names.
_CLIP_RENAMES = [
    (r"^text_model\.token_embedding\.", "text_model.embeddings.token_embedding."),
    (r"^text_model\.positional_embedding\.", "text_model.embeddings.position_embedding."),
    (r"^text_model\.transformer\.layers\.(\d+)\.norm1\.", r"text_model.encoder.layers.\1.layer_norm1."),
    (r"^text_model\.transformer\.layers\.(\d+)\.norm2\.", r"text_model.encoder.layers.\1.layer_norm2."),
    (r"^text_model\.transformer\.layers\.(\d+)\.linear1\.", r"text_model.encoder.layers.\1.mlp.fc1."),
    (r"^text_model\.transformer\.layers\.(\d+)\.linear2\.", r"text_model.encoder.layers.\1.mlp.fc2."),
    (r"^text_model\.transformer\.layers\.(\d+)\.self_attn\.", r"text_model.encoder.layers.\1.self_attn."),
    (r"^text_model\.ln_final\.", "text_model.final_layer_norm."),
]
_CLIP_ACTIVATIONS = ("quick_gelu", "gelu", "relu")  # what paddle's TransformerEncoderLayer can run


def _clip_hf_name(name: str) -> str:
    for pattern, repl in _CLIP_RENAMES:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


# transformers' CLIPTextConfig defaults for keys a config.json may omit.
_CLIP_DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}


class ClipTextEncoder(paddle.nn.Layer):
    """transformers' ``CLIPTextModelWithProjection`` on paddlenlp's ``CLIPTextTransformer``.

    ``encoder(input_ids [B, L] int64) -> (text_embeds [B, projection_dim], hidden_states)``;
    ``hidden_states`` = (embeddings, layer 1, ..., layer N) as transformers returns them with
    ``output_hidden_states=True`` (the last one before the final LayerNorm), so
    ``hidden_states[-2]`` is the penultimate layer SD3 uses. The pooled token is chosen as in
    transformers: ``eos_token_id == 2`` (legacy configs, SD3's included) pools the position of
    the largest token id, any other ``eos_token_id`` pools the first position holding it.
    """

    def __init__(self, hf_config: dict[str, Any], source: str = "<config>"):
        super().__init__()
        nlp = _paddlenlp()
        cfg = {**_CLIP_DEFAULTS, **{k: v for k, v in hf_config.items() if k in _CLIP_DEFAULTS}}
        if isinstance(cfg["eos_token_id"], list):  # transformers allows a list; pooling uses an int
            raise ValueError(f"{source}: eos_token_id={cfg['eos_token_id']} (a list) is not supported")
        if cfg["hidden_act"] not in _CLIP_ACTIVATIONS:
            raise ValueError(
                f"{source}: hidden_act={cfg['hidden_act']!r} is not supported; use one of {_CLIP_ACTIVATIONS}"
            )
        self.config = Config(hf_config)  # config.json as read; save_pretrained writes it back
        self.text_model = nlp.CLIPTextTransformer(nlp.CLIPTextConfig(**cfg))
        # paddlenlp builds every LayerNorm with Paddle's default epsilon (1e-5); honour the config.
        for sub in self.text_model.sublayers():
            if isinstance(sub, paddle.nn.LayerNorm):
                sub._epsilon = float(cfg["layer_norm_eps"])
        # A Linear (not paddlenlp's bare [hidden, proj] parameter) keeps transformers' key name
        # and lets the loader transpose it like every other Linear weight.
        self.text_projection = paddle.nn.Linear(cfg["hidden_size"], cfg["projection_dim"], bias_attr=False)

    @property
    def dtype(self) -> paddle.dtype:
        return self.text_projection.weight.dtype

    def forward(self, input_ids: paddle.Tensor) -> tuple[paddle.Tensor, tuple[paddle.Tensor, ...]]:
        out = self.text_model(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        return self.text_projection(out.pooler_output), tuple(out.hidden_states)

    def save_pretrained(self, folder: str | os.PathLike, dtype: str | paddle.dtype | None = None) -> None:
        """Write config.json (as read) and model.safetensors in transformers' names and layout."""
        tensors = {_clip_hf_name(k): v for k, v in torch_state_from(self, dtype).items()}
        _save_model(folder, dict(self.config), tensors)


def load_clip_text_encoder(
    folder: str | os.PathLike, dtype: str | paddle.dtype = "float32"
) -> ClipTextEncoder:
    """Load a transformers ``CLIPTextModelWithProjection`` folder (SD3's text_encoder / _2)."""
    path = _folder(folder, "CLIP text encoder")
    config = read_json_object(path / CONFIG_NAME)
    index = open_weights(path, WEIGHTS_NAME)
    try:
        return clip_text_encoder_from_weights(config, index, dtype, str(path))
    finally:
        index.close()


def clip_text_encoder_from_weights(
    config: dict[str, Any], weights: WeightsIndex, dtype: str | paddle.dtype, source: str
) -> ClipTextEncoder:
    """A CLIP text encoder from its config.json dict and transformers-named ``weights``."""
    run = _run_dtype(dtype)
    with _default_dtype(run):
        model = _build_lazily(lambda: ClipTextEncoder(config, source))
    load_torch_state(
        model,
        weights,
        run,
        source,
        key_map=_clip_hf_name,
        # Checkpoints written by transformers < 4.31 also store this constant buffer.
        ignore_unexpected=[r"^text_model\.embeddings\.position_ids$"],
    )
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# T5 encoder

_T5_KEYS = (
    "vocab_size",
    "d_model",
    "d_kv",
    "d_ff",
    "num_layers",
    "num_heads",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
    "dropout_rate",
    "layer_norm_epsilon",
    "feed_forward_proj",
    "pad_token_id",
    "eos_token_id",
)
_T5_FEED_FORWARD = ("relu", "gated-gelu", "gated-silu")  # what paddlenlp implements


class T5Encoder(paddle.nn.Layer):
    """transformers' ``T5EncoderModel`` on paddlenlp's: ``encoder(input_ids) -> last_hidden_state``.

    No attention mask, as SD3 runs it. State-dict names equal transformers' (``shared.weight``
    is the token table; the encoder's ``embed_tokens`` is the same parameter).
    """

    def __init__(self, hf_config: dict[str, Any], source: str = "<config>"):
        super().__init__()
        nlp = _paddlenlp()
        cfg = {k: hf_config[k] for k in _T5_KEYS if k in hf_config}
        ff = cfg.get("feed_forward_proj", "relu")
        if ff not in _T5_FEED_FORWARD:
            raise ValueError(
                f"{source}: feed_forward_proj={ff!r} is not supported; use one of {_T5_FEED_FORWARD}"
            )
        self.config = Config(hf_config)  # config.json as read; save_pretrained writes it back
        self.model = nlp.T5EncoderModel(nlp.T5Config(**cfg))
        max_distance = int(cfg.get("relative_attention_max_distance", 128))
        for sub in self.model.sublayers():
            if isinstance(sub, nlp.T5Attention):
                # paddlenlp's compute_bias never passes the configured max_distance (uses 128).
                sub._relative_position_bucket = functools.partial(
                    nlp.T5Attention._relative_position_bucket, max_distance=max_distance
                )
        # transformers' T5 numerics in half precision, which paddlenlp's classes lack (see _t5_classes).
        replacements = _t5_classes()
        for sub in self.model.sublayers():
            if type(sub) in replacements:
                sub.__class__ = replacements[type(sub)]
            if isinstance(sub, nlp.T5LayerFF):
                sub.DenseReluDense.wo.register_forward_pre_hook(_input_to_weight_dtype)

    @property
    def dtype(self) -> paddle.dtype:
        return self.model.shared.weight.dtype

    def forward(self, input_ids: paddle.Tensor) -> paddle.Tensor:
        return self.model(input_ids=input_ids, return_dict=True).last_hidden_state

    def state_dict(self, *args: Any, **kwargs: Any):
        # The tied table under one name (``shared.weight``), as transformers saves and loads it.
        state = super().state_dict(*args, **kwargs)
        state.pop("model.encoder.embed_tokens.weight", None)
        return state

    def save_pretrained(self, folder: str | os.PathLike, dtype: str | paddle.dtype | None = None) -> None:
        """Write config.json (as read) and model.safetensors in transformers' names and layout."""
        tensors = {k.removeprefix("model."): v for k, v in torch_state_from(self, dtype).items()}
        _save_model(folder, dict(self.config), tensors)


def _input_to_weight_dtype(layer: paddle.nn.Layer, inputs: tuple) -> tuple | None:
    if inputs[0].dtype == layer.weight.dtype:
        return None  # unchanged
    return (inputs[0].astype(layer.weight.dtype), *inputs[1:])


def _promoted_add(a: paddle.Tensor, b: paddle.Tensor) -> paddle.Tensor:
    # torch's promotion (float16 + float32 -> float32), without paddle's per-call warning.
    if a.dtype != b.dtype:
        a, b = a.astype("float32"), b.astype("float32")
    return a + b


@functools.cache
def _t5_classes() -> dict[type, type]:
    """Subclasses giving paddlenlp's T5 pieces transformers' half-precision behaviour.

    transformers keeps every feed-forward ``wo`` in float32 when T5 loads in float16
    (``_keep_in_fp32_modules``; T5 v1.1 XXL overflows float16 there otherwise): ``wo`` casts its
    input to its weight's dtype (a hook, see T5Encoder) and the residual stream is promoted to
    float32 from then on. Its RMSNorm casts back to a float16 *or* bfloat16 weight's dtype
    (paddlenlp's only handles float16, so bfloat16 would run on in float32).
    """
    nlp = _paddlenlp()

    class T5RMSNorm(nlp.T5LayerNorm):
        def forward(self, hidden_states: paddle.Tensor) -> paddle.Tensor:
            x = hidden_states.astype("float32")
            x = x * paddle.rsqrt(x.pow(2).mean(axis=-1, keepdim=True) + self.variance_epsilon)
            return self.weight * x.astype(self.weight.dtype)

    class T5LayerSelfAttention(nlp.T5LayerSelfAttention):
        def forward(self, hidden_states, attention_mask=None, position_bias=None, cache=None, **kwargs):
            out = self.SelfAttention(
                self.layer_norm(hidden_states),
                mask=attention_mask,
                position_bias=position_bias,
                cache=cache,
                **kwargs,
            )
            return (_promoted_add(hidden_states, self.dropout(out[0])),) + tuple(out[1:])

    class T5LayerFF(nlp.T5LayerFF):
        def forward(self, hidden_states: paddle.Tensor) -> paddle.Tensor:
            x = self.DenseReluDense(self.layer_norm(hidden_states))
            return _promoted_add(hidden_states, self.dropout(x))

    return {
        nlp.T5LayerNorm: T5RMSNorm,
        nlp.T5LayerSelfAttention: T5LayerSelfAttention,
        nlp.T5LayerFF: T5LayerFF,
    }


def load_t5_encoder(folder: str | os.PathLike, dtype: str | paddle.dtype = "float32") -> T5Encoder:
    """Load a transformers ``T5EncoderModel`` folder (SD3's text_encoder_3, T5 v1.1 XXL)."""
    path = _folder(folder, "T5 encoder")
    config = read_json_object(path / CONFIG_NAME)
    index = open_weights(path, WEIGHTS_NAME)
    try:
        return t5_encoder_from_weights(config, index, dtype, str(path))
    finally:
        index.close()


def t5_encoder_from_weights(
    config: dict[str, Any], weights: WeightsIndex, dtype: str | paddle.dtype, source: str
) -> T5Encoder:
    """A T5 encoder from its config.json dict and transformers-named ``weights`` (fp8 ones upcast)."""
    run = _run_dtype(dtype)
    with _default_dtype(run):
        model = _build_lazily(lambda: T5Encoder(config, source))
    # transformers >= 4.x saves only ``shared.weight``; older files may also (or only)
    # hold the tied ``encoder.embed_tokens.weight``.
    table = "shared.weight" if "shared.weight" in weights else "encoder.embed_tokens.weight"
    load_torch_state(
        model,
        weights,
        run,
        source,
        key_map=lambda k: table if k == "model.shared.weight" else k.removeprefix("model."),
        ignore_unexpected=[r"^encoder\.embed_tokens\.weight$"],
    )
    if run == "float16":  # as transformers: the feed-forward output projections stay float32
        for name, sub in model.named_sublayers():
            if name.endswith("DenseReluDense.wo"):
                sub.to(dtype="float32")
                weight = weights.get(f"{name.removeprefix('model.')}.weight").astype(np.float32)
                sub.weight.set_value(paddle.to_tensor(np.ascontiguousarray(weight.T)))
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# tokenizers


@dataclass(frozen=True)
class TokenizedBatch:
    """``input_ids`` int64 ``[B, max_length]``; ``removed[i]``: the text truncation cut off
    from prompt ``i`` ("" if none), decoded as diffusers prints it in its warning."""

    input_ids: np.ndarray
    removed: list[str]


class _TokenizersBackend:
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


class _PaddleNLPBackend:
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


_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_VOCAB_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "spiece.model")
#: What the loaders read from a text-encoder / tokenizer folder (patterns, as Hub downloads take them).
ENCODER_FILES = (CONFIG_NAME, *weights_patterns(WEIGHTS_NAME))
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
    path = _folder(folder, "CLIP tokenizer")
    cfg, cfg_files = _special_tokens(path)
    if (path / "tokenizer.json").is_file():
        backend = _TokenizersBackend(_tokenizer_json(path / "tokenizer.json"), "</w>")
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        backend = _TokenizersBackend(_clip_bpe(path, cfg), "</w>")
    else:
        raise FileNotFoundError(
            f"{path}: no CLIP tokenizer files (need tokenizer.json, or vocab.json + merges.txt)"
        )
    pad = cfg.get("pad_token", "<|endoftext|>")
    return PromptTokenizer(path, backend, cfg, pad, 77, _vocab_files(path) + cfg_files)


def load_t5_tokenizer(folder: str | os.PathLike) -> PromptTokenizer:
    """T5 sentencepiece tokenizer from ``tokenizer.json`` or ``spiece.model``."""
    path = _folder(folder, "T5 tokenizer")
    cfg, cfg_files = _special_tokens(path)
    if (path / "tokenizer.json").is_file():
        backend: Any = _TokenizersBackend(_tokenizer_json(path / "tokenizer.json"), None)
    elif (path / "spiece.model").is_file():
        nlp = _paddlenlp()
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
        backend = _PaddleNLPBackend(tok)
    else:
        raise FileNotFoundError(f"{path}: no T5 tokenizer files (need tokenizer.json or spiece.model)")
    pad = cfg.get("pad_token", "<pad>")
    return PromptTokenizer(path, backend, cfg, pad, 512, _vocab_files(path) + cfg_files)
