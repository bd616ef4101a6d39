"""Prompt encoding for SD3: two CLIPs and T5 to the transformer's joint tokens and pooled vector.

``PromptEncodingMixin`` gives the pipeline diffusers' ``encode_prompt``, with its numerics: CLIP-L and
CLIP-G hidden states side by side, zero-padded to T5's width and followed by T5's tokens; the two
CLIP pooled outputs concatenated.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import paddle

__all__ = [
    "PromptEncodingMixin",
    "as_prompt_list",
    "check_prompt_inputs",
    "clip_prompt_embeds",
    "joint_prompt_embeds",
    "match_batch",
    "t5_prompt_embeds",
]

logger = logging.getLogger(__name__)


def as_prompt_list(value: str | Sequence[str] | None, name: str) -> list[str] | None:
    """``value`` (a prompt or a list of them) as a list; None stays None; TypeError naming ``name``."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"`{name}` must be a str or a list of str, got {type(value).__name__}")


def check_prompt_inputs(
    prompt: Any,
    prompt_embeds: Any,
    pooled_prompt_embeds: Any,
    negative_prompt: Any,
    negative_prompt_embeds: Any,
    negative_pooled_prompt_embeds: Any,
) -> None:
    """Raise a ValueError/TypeError naming the prompt argument that is missing, doubled or mismatched."""
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("pass either `prompt` or `prompt_embeds`, not both")
    if prompt is None and prompt_embeds is None:
        raise ValueError("`prompt` is required (or pass `prompt_embeds` and `pooled_prompt_embeds`)")
    if prompt is not None:
        prompts = as_prompt_list(prompt, "prompt")
        if not prompts:
            raise ValueError("`prompt` is an empty list")
    if prompt_embeds is not None and pooled_prompt_embeds is None:
        raise ValueError("`prompt_embeds` needs `pooled_prompt_embeds` from the same text encoders")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both")
    if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
        raise ValueError("`negative_prompt_embeds` needs `negative_pooled_prompt_embeds`")
    if (
        prompt_embeds is not None
        and negative_prompt_embeds is not None
        and list(prompt_embeds.shape) != list(negative_prompt_embeds.shape)
    ):
        raise ValueError(
            f"`prompt_embeds` {list(prompt_embeds.shape)} and `negative_prompt_embeds` "
            f"{list(negative_prompt_embeds.shape)} must have the same shape"
        )


def match_batch(values: list[str], batch_size: int, name: str) -> list[str]:
    """``values`` repeated to ``batch_size`` if it is one prompt; ValueError if the counts differ."""
    if len(values) == 1 and batch_size > 1:
        return values * batch_size
    if len(values) != batch_size:
        raise ValueError(f"`{name}` has {len(values)} entries but `prompt` has {batch_size}; they must match")
    return values


def _token_ids(tokenizer: Any, prompts: list[str], max_length: int, why: str) -> paddle.Tensor:
    batch = tokenizer(
        prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np"
    )
    removed = [r for r in batch.removed if r]
    if removed:
        logger.warning("The following part of your input was truncated because %s: %s", why, removed)
    return paddle.to_tensor(batch.input_ids, dtype="int64")


def clip_prompt_embeds(
    tokenizer: Any,
    text_encoder: Any,
    prompts: list[str],
    max_length: int,
    num_images_per_prompt: int,
    clip_skip: int | None,
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """``(hidden states [B*n, L, D], pooled [B*n, P])`` of one CLIP: the penultimate layer, or
    ``clip_skip`` layers before it; each prompt's rows repeated ``num_images_per_prompt`` times."""
    ids = _token_ids(
        tokenizer, prompts, max_length, f"CLIP can only handle sequences up to {max_length} tokens"
    )
    out = text_encoder(ids)
    pooled, hidden_states = out.text_embeds, out.hidden_states
    depth = 2 if clip_skip is None else clip_skip + 2
    if depth > len(hidden_states):
        raise ValueError(
            f"clip_skip={clip_skip} is larger than the text encoder's {len(hidden_states) - 1} layers"
        )
    embeds = hidden_states[-depth]
    return (
        paddle.repeat_interleave(embeds, num_images_per_prompt, axis=0),
        paddle.repeat_interleave(pooled, num_images_per_prompt, axis=0),
    )


def t5_prompt_embeds(
    tokenizer: Any,
    text_encoder: Any,
    prompts: list[str],
    num_images_per_prompt: int,
    max_sequence_length: int,
) -> paddle.Tensor:
    """T5's last hidden state ``[B*n, max_sequence_length, D]``, rows repeated as for CLIP."""
    ids = _token_ids(
        tokenizer, prompts, max_sequence_length, f"`max_sequence_length` is {max_sequence_length} tokens"
    )
    return paddle.repeat_interleave(text_encoder(ids).last_hidden_state, num_images_per_prompt, axis=0)


def joint_prompt_embeds(
    clip_l: tuple[paddle.Tensor, paddle.Tensor],
    clip_g: tuple[paddle.Tensor, paddle.Tensor],
    t5: paddle.Tensor,
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """``(prompt_embeds, pooled_prompt_embeds)`` from the two CLIPs' ``(hidden, pooled)`` and T5's
    tokens (zeros when T5 is dropped), in the first CLIP's dtype."""
    (embed_1, pooled_1), (embed_2, pooled_2) = clip_l, clip_g
    clip = paddle.concat([embed_1, embed_2.astype(embed_1.dtype)], axis=-1)
    width = t5.shape[-1]
    if clip.shape[-1] > width:
        raise ValueError(
            f"CLIP features ({clip.shape[-1]}) are wider than the T5 / joint attention width ({width}): "
            "the text encoders do not belong to this transformer"
        )
    pad = paddle.zeros([clip.shape[0], clip.shape[1], width - clip.shape[-1]], dtype=clip.dtype)
    clip = paddle.concat([clip, pad], axis=-1)
    embeds = paddle.concat([clip, t5.astype(clip.dtype)], axis=-2)
    pooled = paddle.concat([pooled_1, pooled_2.astype(pooled_1.dtype)], axis=-1)
    return embeds, pooled


class PromptEncodingMixin:
    """Mixed into :class:`StableDiffusion3Pipeline`: diffusers' ``encode_prompt``.

    Needs the three tokenizers and text encoders (T5's may be None), ``tokenizer_max_length``,
    ``transformer`` (for T5's width when T5 is dropped) and ``folder_defaults``."""

    def _encode_one_side(
        self,
        prompt: list[str],
        prompt_2: list[str],
        prompt_3: list[str],
        num_images_per_prompt: int,
        clip_skip: int | None,
        max_sequence_length: int,
    ) -> tuple[paddle.Tensor, paddle.Tensor]:
        length = self.tokenizer_max_length
        clip_l = clip_prompt_embeds(
            self.tokenizer, self.text_encoder, prompt, length, num_images_per_prompt, clip_skip
        )
        clip_g = clip_prompt_embeds(
            self.tokenizer_2, self.text_encoder_2, prompt_2, length, num_images_per_prompt, clip_skip
        )
        if self.text_encoder_3 is None:
            t5 = paddle.zeros(
                [
                    len(prompt_3) * num_images_per_prompt,
                    max_sequence_length,
                    self.transformer.config.joint_attention_dim,
                ],
                dtype=self.text_encoder.dtype,
            )
        else:
            t5 = t5_prompt_embeds(
                self.tokenizer_3, self.text_encoder_3, prompt_3, num_images_per_prompt, max_sequence_length
            )
        return joint_prompt_embeds(clip_l, clip_g, t5)

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        device: Any = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        prompt_embeds: paddle.Tensor | None = None,
        negative_prompt_embeds: paddle.Tensor | None = None,
        pooled_prompt_embeds: paddle.Tensor | None = None,
        negative_pooled_prompt_embeds: paddle.Tensor | None = None,
        clip_skip: int | None = None,
        max_sequence_length: int | None = None,
    ) -> tuple[paddle.Tensor, paddle.Tensor | None, paddle.Tensor, paddle.Tensor | None]:
        """Returns (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds).

        `device` is accepted for diffusers compatibility; Paddle places tensors on its current device.
        """
        del device
        _, max_sequence_length = self.folder_defaults(max_sequence_length=max_sequence_length)
        prompts = as_prompt_list(prompt, "prompt")
        batch_size = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        if prompt_embeds is None:
            p2 = match_batch(as_prompt_list(prompt_2, "prompt_2") or prompts, batch_size, "prompt_2")
            p3 = match_batch(as_prompt_list(prompt_3, "prompt_3") or prompts, batch_size, "prompt_3")
            prompt_embeds, pooled_prompt_embeds = self._encode_one_side(
                prompts, p2, p3, num_images_per_prompt, clip_skip, max_sequence_length
            )
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            neg = match_batch(
                as_prompt_list(negative_prompt, "negative_prompt") or [""], batch_size, "negative_prompt"
            )
            neg_2 = match_batch(
                as_prompt_list(negative_prompt_2, "negative_prompt_2") or neg, batch_size, "negative_prompt_2"
            )
            neg_3 = match_batch(
                as_prompt_list(negative_prompt_3, "negative_prompt_3") or neg, batch_size, "negative_prompt_3"
            )
            # clip_skip is not applied to the negative side (diffusers does the same).
            negative_prompt_embeds, negative_pooled_prompt_embeds = self._encode_one_side(
                neg, neg_2, neg_3, num_images_per_prompt, None, max_sequence_length
            )
        return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds
