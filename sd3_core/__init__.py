"""The SD3 model math on PaddlePaddle: MM-DiT, flow-match scheduler, VAE, text encoders."""
