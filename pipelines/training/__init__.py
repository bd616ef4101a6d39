"""The training pipeline (DreamBooth fine-tuning of the SD3 transformer, full or LoRA) in one
process, no Ray: `config`, `devices`, `data`, `optim`, `checkpoints`, `tracking`.

Importing `config` or `devices` loads no Paddle: the NPU flags must be set before it loads.
"""
