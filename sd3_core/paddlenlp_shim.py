"""paddlenlp, the only place the project imports it: its modules, and how its models are built.

Imported lazily (process-wide patches and import-time noise that tokenizer-only users avoid), so
the text encoders can be swapped for another implementation behind the same loaders.

paddlenlp's package ``__init__`` imports its whole toolkit (taskflow, data augmentation, Hugging
Face ``datasets``, scikit-learn, pandas): 2.7 s of a replica's cold start, measured, for modules
the encoders never use. So :func:`paddlenlp_modules` registers the package without running that
``__init__`` and imports only ``paddlenlp.transformers`` (0.4 s). The first access to anything
else of the package (``paddlenlp.Taskflow``, ``from paddlenlp import SimpleServer``) runs the real
``__init__`` then, so other code in the process sees the whole package. Where paddlenlp is
already imported, it is used as it is.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import paddle

__all__ = ["build_paddlenlp_model", "paddlenlp_modules"]

_Model = TypeVar("_Model", bound=paddle.nn.Layer)


def _register_package_without_init() -> None:
    """Put a ``paddlenlp`` package in ``sys.modules`` whose ``__init__`` runs on first use of
    any attribute it would define (PEP 562 module ``__getattr__``); submodules import as usual."""
    if "paddlenlp" in sys.modules:
        return
    spec = importlib.util.find_spec("paddlenlp")
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return  # not installed: the plain import below raises the usual error
    package = importlib.util.module_from_spec(spec)
    package.__version__ = importlib.metadata.version("paddlenlp")  # read by its submodules' imports
    running = []

    def finish_init(name: str) -> Any:
        if name.startswith("__") or running:  # dunder probes (copy, pickle), or inside the __init__
            raise AttributeError(f"module 'paddlenlp' has no attribute {name!r}")
        running.append(True)
        del package.__getattr__
        spec.loader.exec_module(package)  # the real __init__; imported submodules are reused
        return getattr(package, name)

    package.__getattr__ = finish_init
    sys.modules["paddlenlp"] = package
    import paddlenlp.data  # noqa: F401  (first, as its __init__ does: its imports are circular otherwise)

    paddle.disable_signal_handler()  # as paddlenlp's __init__ does: the process behaves as before


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
        _register_package_without_init()
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
