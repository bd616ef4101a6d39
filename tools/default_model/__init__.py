"""The embedded default model's recipe: synthetic shapes data, its classifier, VAE and transformer training."""
