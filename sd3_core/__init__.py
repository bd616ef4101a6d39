"""The SD3 model math on PaddlePaddle: MM-DiT, flow-match scheduler, VAE, text encoders."""

from sd3_core import runtime  # noqa: F401  (must run before paddle is imported)
