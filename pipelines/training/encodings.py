"""The frozen encoders' outputs for training samples: text embeddings at the run's T5 length and
VAE latents (a posterior sample, shifted and scaled), each cached when the config asks for it."""

from __future__ import annotations

import numpy as np
import paddle

from pipelines.stable_diffusion_3 import StableDiffusion3Pipeline
from pipelines.training.config import TrainConfig
from pipelines.training.data import Entry
from sd3_core.training import encode_latents


class SampleEncoder:
    """Encodes prompts (``config.cache_text_embeddings``: once per prompt) and entries
    (``config.cache_latents``: the posterior's mean and std once per entry)."""

    def __init__(self, pipe: StableDiffusion3Pipeline, config: TrainConfig) -> None:
        self.pipe = pipe
        self.config = config
        self.text_cache: dict[str, tuple[paddle.Tensor, paddle.Tensor]] = {}
        self.latent_cache: dict[tuple[str, int], tuple[paddle.Tensor, paddle.Tensor]] = {}

    def text(self, prompts: list[str]) -> tuple[paddle.Tensor, paddle.Tensor]:
        """``(prompt_embeds, pooled_embeds)`` of ``prompts``, float32."""
        c = self.config
        todo = sorted({p for p in prompts if p not in self.text_cache})
        if todo:
            with paddle.no_grad():
                embeds, _, pooled, _ = self.pipe.encode_prompt(
                    todo, do_classifier_free_guidance=False, max_sequence_length=c.max_sequence_length
                )
            fresh = {
                p: (embeds[i].astype("float32"), pooled[i].astype("float32")) for i, p in enumerate(todo)
            }
            if not c.cache_text_embeddings:
                return (
                    paddle.stack([fresh[p][0] for p in prompts]),
                    paddle.stack([fresh[p][1] for p in prompts]),
                )
            self.text_cache.update(fresh)
        return (
            paddle.stack([self.text_cache[p][0] for p in prompts]),
            paddle.stack([self.text_cache[p][1] for p in prompts]),
        )

    def latents(self, entries: list[tuple[str, int, Entry]], vae_noise: np.ndarray) -> paddle.Tensor:
        """Latents of entries (keyed ("i"|"c", index)) with the given posterior noise."""
        vae = self.pipe.vae
        shift = vae.config.get("shift_factor") or 0.0
        scale = vae.config.scaling_factor
        with paddle.no_grad():
            if self.config.cache_latents:
                todo = [(k, i, e) for k, i, e in entries if (k, i) not in self.latent_cache]
                if todo:
                    posterior = vae.encode(
                        paddle.to_tensor(np.stack([e.pixels for _, _, e in todo])).astype(vae.dtype)
                    ).latent_dist
                    for j, (k, i, _) in enumerate(todo):
                        self.latent_cache[(k, i)] = (
                            posterior.mean[j].astype("float32"),
                            posterior.std[j].astype("float32"),
                        )
                mean = paddle.stack([self.latent_cache[(k, i)][0] for k, i, _ in entries])
                std = paddle.stack([self.latent_cache[(k, i)][1] for k, i, _ in entries])
                return ((mean + std * paddle.to_tensor(vae_noise)) - shift) * scale
            pixels = paddle.to_tensor(np.stack([e.pixels for _, _, e in entries]))
            return encode_latents(vae, pixels, noise=vae_noise).astype("float32")
