"""Tiny SD3 / SD3.5 pipelines built with diffusers and transformers, every weight random.

Constant-looking parameters (norm weights, biases, the pos-embed table) are randomised too, so
a re-implementation that drops a bias or recomputes the sin-cos table cannot match by accident.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tiny_tokenizers as tt
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

NUM_MERGES = 400
SPIECE_VOCAB = 400  # an upper bound; the small corpus yields fewer pieces (hard limit off)


@dataclass(frozen=True)
class Variant:
    """What differs between the fixture pipelines."""

    name: str
    qk_norm: str | None
    dual_attention_layers: tuple[int, ...]
    published_tokenizers: bool  # vocab.json/merges.txt/spiece.model vs tokenizer.json only
    clip_legacy_eos: bool  # config eos_token_id 2 (as in the real SD3 CLIP configs): argmax pooling


SD3_TINY = Variant("sd3-tiny", None, (), True, True)
SD35_TINY = Variant("sd35-tiny", "rms_norm", (0, 1), False, False)


@dataclass
class Tokenizers:
    vocab: dict[str, int]
    merges: list[tuple[str, str]]
    spiece: bytes

    @property
    def t5_vocab_size(self) -> int:
        # Like T5 (32100 tokens -> 32128 rows): round the tokenizer size up to a multiple of 32,
        # so the embedding has rows no token reaches.
        n = tt.spiece_size(self.spiece) + tt.T5_EXTRA_IDS
        return 32 * math.ceil(n / 32)


def train_tokenizers() -> Tokenizers:
    corpus = tt.caption_corpus()
    vocab, merges = tt.train_clip_bpe(corpus, NUM_MERGES)
    return Tokenizers(vocab, merges, tt.train_t5_spiece(corpus, SPIECE_VOCAB))


def write_published_tokenizers(folder: Path, toks: Tokenizers) -> None:
    """Writes tokenizer/, tokenizer_2/, tokenizer_3/ in the published file form under folder."""
    for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        shutil.rmtree(folder / sub, ignore_errors=True)
    tt.write_clip_tokenizer(folder / "tokenizer", toks.vocab, toks.merges, pad_token=tt.EOS)
    tt.write_clip_tokenizer(folder / "tokenizer_2", toks.vocab, toks.merges, pad_token="!")
    tt.write_t5_tokenizer(folder / "tokenizer_3", toks.spiece)


def load_tokenizers(folder: Path) -> tuple[CLIPTokenizer, CLIPTokenizer, T5TokenizerFast]:
    return (
        CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        T5TokenizerFast.from_pretrained(folder / "tokenizer_3"),
    )


# ---------------------------------------------------------------- model configs


def transformer_config(v: Variant) -> dict:
    return dict(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        num_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=128,
        caption_projection_dim=32,
        pooled_projection_dim=80,
        out_channels=16,
        pos_embed_max_size=12,
        dual_attention_layers=v.dual_attention_layers,
        qk_norm=v.qk_norm,
    )


def vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,
    )


def clip_config(toks: Tokenizers, hidden: int, act: str, pad_id: int, legacy_eos: bool) -> CLIPTextConfig:
    eos = toks.vocab[tt.EOS]
    return CLIPTextConfig(
        vocab_size=len(toks.vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=hidden,
        num_hidden_layers=3,
        num_attention_heads=hidden // 16,
        max_position_embeddings=tt.CLIP_MAX_LENGTH,
        hidden_act=act,
        layer_norm_eps=1e-5,
        bos_token_id=toks.vocab[tt.BOS],
        eos_token_id=2 if legacy_eos else eos,
        pad_token_id=pad_id,
    )


def t5_config(toks: Tokenizers) -> T5Config:
    return T5Config(
        vocab_size=toks.t5_vocab_size,
        d_model=128,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )


def scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


# ---------------------------------------------------------------- randomisation


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "Norm" in type(module).__name__


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Overwrites every parameter and persistent buffer with seeded random values of sane size."""
    gen = torch.Generator().manual_seed(seed)

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    persistent = set(model.state_dict().keys())
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for name, param in module.named_parameters(recurse=False):
            if _is_norm(module):
                value = 1.0 + 0.1 * randn(param.shape) if name == "weight" else 0.05 * randn(param.shape)
            elif name == "bias" or param.ndim == 1:
                value = 0.05 * randn(param.shape)
            elif isinstance(module, torch.nn.Embedding):
                value = 0.5 * randn(param.shape)
            else:  # Linear / Conv weight: unit-variance outputs for unit-variance inputs
                fan_in = param[0].numel()
                value = randn(param.shape) / math.sqrt(fan_in)
            param.copy_(value)
        for name, buf in module.named_buffers(recurse=False):
            if prefix + name in persistent and buf.is_floating_point():
                buf.copy_(0.5 * randn(buf.shape))


# ---------------------------------------------------------------- pipeline


def build_pipeline(v: Variant, toks: Tokenizers, seed: int, with_t5: bool = True) -> StableDiffusion3Pipeline:
    """Builds the tiny pipeline in memory with randomised weights (tokenizers from the trained files)."""
    transformer = SD3Transformer2DModel(**transformer_config(v))
    vae = AutoencoderKL(**vae_config())
    clip_l = CLIPTextModelWithProjection(
        clip_config(toks, 32, "quick_gelu", toks.vocab[tt.EOS], v.clip_legacy_eos)
    )
    clip_g = CLIPTextModelWithProjection(clip_config(toks, 48, "gelu", toks.vocab["!"], v.clip_legacy_eos))
    t5 = T5EncoderModel(t5_config(toks)) if with_t5 else None
    for offset, model in enumerate((transformer, vae, clip_l, clip_g, t5)):
        if model is not None:
            randomize(model, seed * 100 + offset)
            model.eval()

    with tempfile.TemporaryDirectory(prefix="sd3-ray-tok-") as tmp:
        write_published_tokenizers(Path(tmp), toks)
        tok_l, tok_g, tok_t5 = load_tokenizers(Path(tmp))
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler(),
        vae=vae,
        text_encoder=clip_l,
        tokenizer=tok_l,
        text_encoder_2=clip_g,
        tokenizer_2=tok_g,
        text_encoder_3=t5,
        tokenizer_3=tok_t5 if with_t5 else None,
    )


def save_pipeline(
    pipe: StableDiffusion3Pipeline, folder: Path, v: Variant, toks: Tokenizers, shard: bool
) -> None:
    """Saves with diffusers' save_pretrained (replacing folder); optionally shards transformer and T5."""
    if folder.exists() and any(folder.iterdir()) and not (folder / "model_index.json").exists():
        raise FileExistsError(f"{folder} is not empty and is not a pipeline folder; refusing to replace it")
    shutil.rmtree(folder, ignore_errors=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    if v.published_tokenizers:
        write_published_tokenizers(folder, toks)
        if pipe.tokenizer_3 is None:
            shutil.rmtree(folder / "tokenizer_3")
    if shard:
        for sub, model, size in (
            ("transformer", pipe.transformer, "150KB"),
            ("text_encoder_3", pipe.text_encoder_3, "300KB"),
        ):
            if model is None:
                continue
            shutil.rmtree(folder / sub)
            model.save_pretrained(folder / sub, safe_serialization=True, max_shard_size=size)
            index = [p for p in (folder / sub).iterdir() if p.name.endswith(".index.json")]
            if not index:
                raise RuntimeError(f"{folder / sub}: max_shard_size={size} did not shard")


def pipeline_files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def model_index(folder: Path) -> dict:
    return json.loads((folder / "model_index.json").read_text())
