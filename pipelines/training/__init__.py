"""The training pipeline: DreamBooth fine-tuning of the SD3 transformer, full or LoRA, in one
process, no Ray (`trainer.Trainer(config).run()`). One module per piece: `config`, `devices`,
`data`, `model`, `encodings`, `loss`, `optim`, `checkpoints`, `outputs`, `tracking`.

Importing `config` or `devices` loads no Paddle: the NPU flags must be set before it loads.
"""
