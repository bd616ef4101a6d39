"""paddlenlp, the only place the project imports it: its modules, and how its models are built.

Imported lazily (about 2 s, process-wide patches, and import-time noise that tokenizer-only
users avoid), so the text encoders can be swapped for another implementation behind the same
loaders.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import paddle

__all__ = ["build_paddlenlp_model", "paddlenlp_modules"]

_Model = TypeVar("_Model", bound=paddle.nn.Layer)


@functools.cache
def paddlenlp_modules() -> Any:
    """Import paddlenlp's CLIP and T5 modules once, without its import-time warnings.

    Importing paddlenlp patches ``paddle.nn.TransformerEncoder(Layer).forward`` process-wide
    (adds ``output_hidden_states``) and adds ``paddle.nn.functional.quick_gelu``; the CLIP
    encoder relies on both.
    """
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


def build_paddlenlp_model(build: Callable[[], _Model], dtype: str) -> _Model:
    """``build()`` with lazy, uninitialised parameters and ``dtype`` as Paddle's default dtype.

    No random init: the checkpoint overwrites every parameter (T5-XXL would spend seconds and
    19 GB initialising float32 weights first). paddlenlp's PretrainedModel runs its own
    init_weights after __init__, which cannot touch lazy parameters, so that is switched off.
    paddlenlp creates some parameters with the default dtype, hence setting it.
    """
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        with paddle.LazyGuard(), paddlenlp_modules().no_init_weights():
            return build()
    finally:
        paddle.set_default_dtype(previous)
