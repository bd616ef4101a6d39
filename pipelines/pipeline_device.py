"""Where a pipeline's weights live and in which dtype: diffusers' ``pipe.to(...)`` and
``pipe.device``, and its memory switches, each done here or refused with what to write instead.

Paddle computes on the process's current device (``paddle.set_device``): ``pipe.to(device)``
moves every component there and makes it current, so tensors the call creates land beside the
weights.
"""

from __future__ import annotations

import warnings
from typing import Any

import paddle

from sd3_core import devices
from sd3_core.dtypes import cast_layer, dtype_argument, looks_like_dtype
from sd3_core.lora import lora_layers
from sd3_core.text_encoder_folder import cast_encoder

__all__ = ["PipelineDeviceMixin", "to_arguments"]

_MODELS = ("transformer", "vae")
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
_LESS_MEMORY = (
    "the pipeline is held whole on one device (pipe.to('gpu')); for less memory load it with "
    "dtype='float16' or 'bfloat16', drop T5 (from_pretrained(path, text_encoder_3=None, "
    "tokenizer_3=None)), or shard one model over devices (ParallelStableDiffusion3Pipeline with "
    "mp=2, or `sd3 generate --mp 2`)"
)
_ATTENTION = (
    "on GPU attention runs as Paddle's fused scaled_dot_product_attention (no score matrix in "
    "memory); on CPU scores are formed for one sample and a few heads at a time"
)
_UNSLICED = f"diffusers' SD3 transformer has no sliced attention either, and {_ATTENTION}"
_NO_XFORMERS = f"xformers is a PyTorch library, and {_ATTENTION}"


class PipelineDeviceMixin:
    """``to``, ``device`` and diffusers' offload / attention switches for a pipeline whose
    components are ``transformer``, ``vae`` and the text encoders."""

    def _layers(self) -> dict[str, paddle.nn.Layer]:
        names = _MODELS + _TEXT_ENCODERS
        return {n: getattr(self, n) for n in names if getattr(self, n, None) is not None}

    @property
    def device(self) -> str:
        """The device the pipeline computes on (``"cpu"``, ``"gpu:N"``, ``"npu:N"``): an
        accelerator any component is on, else "cpu" (as diffusers' ``pipe.device``)."""
        held = [devices.layer_device(layer) for layer in self._layers().values()]
        return next((d for d in held if d != "cpu"), "cpu")

    def to(
        self,
        *args: Any,
        device: Any = None,
        dtype: Any = None,
        paddle_device: Any = None,
        paddle_dtype: Any = None,
        torch_dtype: Any = None,
        silence_dtype_warnings: bool = False,
    ) -> Any:
        """Move the pipeline to a device and/or cast it to a dtype; returns the pipeline itself.

        As diffusers' ``pipe.to``: ``to("cuda")``, ``to(torch.float16)``, ``to("cuda", "float16")``,
        ``to(device=..., dtype=...)``, and PPDiffusers' ``to(paddle_device=..., paddle_dtype=...)``.
        Devices are read by :func:`sd3_core.devices.paddle_device` (``"cuda:1"`` is ``"gpu:1"``).
        A dtype is held as ``from_pretrained(path, dtype=...)`` holds it: the transformer and the
        VAE in that dtype, the text encoders in it where the device has half-precision kernels
        (float32 on CPU), T5's feed-forward outputs in float32 under float16.
        ``silence_dtype_warnings`` is accepted; no dtype/device pair warns here."""
        del silence_dtype_warnings
        device_name, dtype_name = to_arguments(args, device, dtype, paddle_device, paddle_dtype, torch_dtype)
        changed = False
        if dtype_name is not None:
            changed |= self._cast(dtype_name)
        if device_name is not None:
            changed |= self._move(device_name)
        program = getattr(self, "transformer_program", None)
        if changed and program is not None:  # its weights, dtype or device are the model's no more
            self.enable_inference_optimize(cache_dir=program.cache_dir, threads=program.threads)
        return self

    def _cast(self, dtype: str) -> bool:
        if any(layer.fused for _, layer in lora_layers(self.transformer)):
            raise ValueError(
                f"pipe.to(dtype={dtype!r}): LoRA adapters are fused into the transformer; call "
                "pipe.unfuse_lora() first (and fuse_lora() again after)"
            )
        before = self._dtypes()
        for name, layer in self._layers().items():
            if name in _MODELS:
                cast_layer(layer, dtype)
            else:
                cast_encoder(layer, dtype)
        return self._dtypes() != before

    def _dtypes(self) -> dict[str, list[str]]:
        return {n: [str(p.dtype) for p in layer.parameters()] for n, layer in self._layers().items()}

    def _move(self, device: str) -> bool:
        devices.require_device(device)
        moved = False
        for layer in self._layers().values():
            if devices.layer_device(layer) != device:
                layer.to(device=device)
                moved = True
        if paddle.get_device() != device:
            paddle.set_device(device)
            moved = True
        return moved

    # ---- diffusers' memory switches -------------------------------------------------------------
    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: Any = None) -> None:
        """Refused: offloading is not supported (see the message)."""
        raise NotImplementedError(f"enable_model_cpu_offload is not supported: {_LESS_MEMORY}")

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: Any = None) -> None:
        """Refused: offloading is not supported (see the message)."""
        raise NotImplementedError(f"enable_sequential_cpu_offload is not supported: {_LESS_MEMORY}")

    def enable_group_offload(self, *args: Any, **kwargs: Any) -> None:
        """Refused: offloading is not supported (see the message)."""
        raise NotImplementedError(f"enable_group_offload is not supported: {_LESS_MEMORY}")

    def maybe_free_model_hooks(self) -> None:
        """Nothing to free: no offload hooks are ever installed (diffusers calls it after a run)."""

    def enable_attention_slicing(self, slice_size: str | int | None = "auto") -> None:
        """No effect, as in diffusers, whose SD3 transformer has no sliced attention; warns."""
        _no_effect("enable_attention_slicing", _UNSLICED)

    def disable_attention_slicing(self) -> None:
        _no_effect("disable_attention_slicing", _UNSLICED)

    def enable_xformers_memory_efficient_attention(self, attention_op: Any = None) -> None:
        """No effect: attention already runs fused on accelerators; warns."""
        _no_effect("enable_xformers_memory_efficient_attention", _NO_XFORMERS)

    def disable_xformers_memory_efficient_attention(self) -> None:
        _no_effect("disable_xformers_memory_efficient_attention", _NO_XFORMERS)


def to_arguments(
    args: tuple[Any, ...],
    device: Any = None,
    dtype: Any = None,
    paddle_device: Any = None,
    paddle_dtype: Any = None,
    torch_dtype: Any = None,
) -> tuple[str | None, str | None]:
    """``(Paddle device name, dtype name)`` that ``pipe.to(*args, ...)`` asks for (None: not
    asked), read as diffusers and PPDiffusers read them; conflicting or extra ones are errors."""
    dtypes = [a for a in args if looks_like_dtype(a)]
    places = [a for a in args if not looks_like_dtype(a)]
    if len(args) > 2 or len(dtypes) > 1 or len(places) > 1:
        raise TypeError(f"pipe.to{tuple(args)!r}: pass at most one device and one dtype")
    if (dtypes and dtype is not None) or (places and device is not None):
        raise TypeError("pipe.to got the same thing as an argument and as a keyword; pass one")
    given = {"device": places[0] if places else device, "paddle_device": paddle_device}
    named = {k: devices.paddle_device(v) for k, v in given.items() if v is not None}
    if len(set(named.values())) > 1:
        raise ValueError(f"conflicting devices {named}: pass one of device=, paddle_device=")
    dtype = dtypes[0] if dtypes else dtype
    wants_dtype = any(d is not None for d in (dtype, paddle_dtype, torch_dtype))
    dtype_name = dtype_argument(dtype, paddle_dtype, torch_dtype) if wants_dtype else None
    return next(iter(named.values()), None), dtype_name


def _no_effect(method: str, why: str) -> None:
    warnings.warn(f"{method}() has no effect here: {why}", UserWarning, stacklevel=3)
