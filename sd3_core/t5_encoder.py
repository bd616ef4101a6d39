"""SD3's T5 v1.1 encoder (text_encoder_3): transformers' ``T5EncoderModel`` on paddlenlp's.

Checkpoints are read in the layout transformers writes (see ``text_encoder_folder``), fp8
weights upcast; outputs reproduce ``T5EncoderModel``, in half precision too.
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import numpy as np
import paddle

from sd3_core.model_config import Config
from sd3_core.paddlenlp_shim import build_paddlenlp_model, paddlenlp_modules
from sd3_core.safetensors_io import WeightsIndex
from sd3_core.text_encoder_folder import (
    float16_keeps_float32,
    load_encoder_folder,
    run_dtype,
    save_encoder_folder,
)
from sd3_core.torch_state import load_torch_state, torch_state_from

__all__ = ["T5Encoder", "load_t5_encoder", "t5_encoder_from_weights"]


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


class T5EncoderOutput(NamedTuple):
    """What transformers' ``T5EncoderModel(ids)`` returns, by position (``out[0]``) and by name."""

    last_hidden_state: paddle.Tensor


class T5Encoder(paddle.nn.Layer):
    """transformers' ``T5EncoderModel`` on paddlenlp's: ``encoder(input_ids) -> T5EncoderOutput``.

    No attention mask, as SD3 runs it. State-dict names equal transformers' (``shared.weight``
    is the token table; the encoder's ``embed_tokens`` is the same parameter).
    """

    #: Held in float32 when the rest is float16, as transformers does (T5 v1.1 XXL overflows there).
    FLOAT16_KEEPS_FLOAT32 = ("DenseReluDense.wo",)

    def __init__(self, hf_config: dict[str, Any], source: str = "<config>"):
        super().__init__()
        nlp = paddlenlp_modules()
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

    def forward(
        self,
        input_ids: paddle.Tensor,
        attention_mask: paddle.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> T5EncoderOutput:
        """``return_dict`` (transformers' keyword) changes nothing: the output indexes either way."""
        if attention_mask is not None:
            raise ValueError("attention_mask: SD3's T5 runs without one, as diffusers calls it")
        return T5EncoderOutput(self.model(input_ids=input_ids, return_dict=True).last_hidden_state)

    def state_dict(self, *args: Any, **kwargs: Any):
        # The tied table under one name (``shared.weight``), as transformers saves and loads it.
        state = super().state_dict(*args, **kwargs)
        state.pop("model.encoder.embed_tokens.weight", None)
        return state

    def save_pretrained(self, folder: str | os.PathLike, dtype: str | paddle.dtype | None = None) -> None:
        """Write config.json (as read) and model.safetensors in transformers' names and layout."""
        tensors = {k.removeprefix("model."): v for k, v in torch_state_from(self, dtype).items()}
        save_encoder_folder(folder, dict(self.config), tensors)


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
    nlp = paddlenlp_modules()

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
    return load_encoder_folder(folder, "T5 encoder", t5_encoder_from_weights, dtype)


def t5_encoder_from_weights(
    config: dict[str, Any], weights: WeightsIndex, dtype: str | paddle.dtype, source: str
) -> T5Encoder:
    """A T5 encoder from its config.json dict and transformers-named ``weights`` (fp8 ones upcast)."""
    run = run_dtype(dtype)
    model = build_paddlenlp_model(lambda: T5Encoder(config, source), run)
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
            if float16_keeps_float32(model, name):
                sub.to(dtype="float32")
                weight = weights.get(f"{name.removeprefix('model.')}.weight").astype(np.float32)
                sub.weight.set_value(paddle.to_tensor(np.ascontiguousarray(weight.T)))
    model.eval()
    return model
