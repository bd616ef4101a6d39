"""SD3's CLIP-L / CLIP-G text encoders: transformers' ``CLIPTextModelWithProjection`` on paddlenlp.

Checkpoints are read in the layout transformers writes (see ``text_encoder_folder``) and the
outputs reproduce ``CLIPTextModelWithProjection(output_hidden_states=True)``.
"""

from __future__ import annotations

import os
import re
from typing import Any, NamedTuple

import paddle

from sd3_core.model_config import Config
from sd3_core.paddlenlp_shim import build_paddlenlp_model, paddlenlp_modules
from sd3_core.safetensors_io import WeightsIndex
from sd3_core.text_encoder_folder import load_encoder_folder, run_dtype, save_encoder_folder
from sd3_core.torch_state import load_torch_state, torch_state_from

__all__ = ["ClipTextEncoder", "clip_text_encoder_from_weights", "load_clip_text_encoder"]

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


class CLIPTextModelOutput(NamedTuple):
    """What transformers' ``CLIPTextModelWithProjection(ids, output_hidden_states=True)`` returns,
    by position (``out[0]`` is ``text_embeds``) and by name."""

    text_embeds: paddle.Tensor
    last_hidden_state: paddle.Tensor  # after the final LayerNorm
    hidden_states: tuple[paddle.Tensor, ...]


class ClipTextEncoder(paddle.nn.Layer):
    """transformers' ``CLIPTextModelWithProjection`` on paddlenlp's ``CLIPTextTransformer``.

    ``encoder(input_ids [B, L] int64) -> CLIPTextModelOutput`` (``text_embeds [B, projection_dim]``,
    ``last_hidden_state``, ``hidden_states``); ``hidden_states`` = (embeddings, layer 1, ..., layer N)
    as transformers returns them with
    ``output_hidden_states=True`` (the last one before the final LayerNorm), so
    ``hidden_states[-2]`` is the penultimate layer SD3 uses. The pooled token is chosen as in
    transformers: ``eos_token_id == 2`` (legacy configs, SD3's included) pools the position of
    the largest token id, any other ``eos_token_id`` pools the first position holding it.
    """

    def __init__(self, hf_config: dict[str, Any], source: str = "<config>"):
        super().__init__()
        nlp = paddlenlp_modules()
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

    def forward(
        self,
        input_ids: paddle.Tensor,
        attention_mask: paddle.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> CLIPTextModelOutput:
        """Hidden states are always returned (SD3 reads the penultimate layer), whatever
        ``output_hidden_states`` and ``return_dict`` (transformers' keywords) say."""
        if attention_mask is not None:
            raise ValueError("attention_mask: SD3's CLIP encoders run without one, as diffusers calls them")
        out = self.text_model(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        return CLIPTextModelOutput(
            self.text_projection(out.pooler_output), out.last_hidden_state, tuple(out.hidden_states)
        )

    def save_pretrained(self, folder: str | os.PathLike, dtype: str | paddle.dtype | None = None) -> None:
        """Write config.json (as read) and model.safetensors in transformers' names and layout."""
        tensors = {_clip_hf_name(k): v for k, v in torch_state_from(self, dtype).items()}
        save_encoder_folder(folder, dict(self.config), tensors)


def load_clip_text_encoder(
    folder: str | os.PathLike, dtype: str | paddle.dtype = "float32"
) -> ClipTextEncoder:
    """Load a transformers ``CLIPTextModelWithProjection`` folder (SD3's text_encoder / _2)."""
    return load_encoder_folder(folder, "CLIP text encoder", clip_text_encoder_from_weights, dtype)


def clip_text_encoder_from_weights(
    config: dict[str, Any], weights: WeightsIndex, dtype: str | paddle.dtype, source: str
) -> ClipTextEncoder:
    """A CLIP text encoder from its config.json dict and transformers-named ``weights``."""
    run = run_dtype(dtype)
    model = build_paddlenlp_model(lambda: ClipTextEncoder(config, source), run)
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
