"""The embedded default behind `medres demo` when configs/ is not beside the package."""

DEMO_YAML = """\
# The embedded default behind `make demo`: synthetic chest phantoms (normal / opacity / diffuse),
# trained from scratch (no pretrained file is needed) at 128 px. data.manifest is filled in by
# `medres demo` with the phantom set it generates.
name: demo
data:
  classes: [normal, opacity, diffuse]
  task: multiclass
  image_size: 128
  resize: letterbox
  val_fraction: 0.2
  test_fraction: 0.2
model:
  weights: none
  in_channels: 3
train:
  epochs: 12
  batch_size: 16
  lr: 0.001
  backbone_lr_mult: 1.0
  freeze_epochs: 0
  warmup_epochs: 1
  precision: auto
  seed: 0
eval:
  bootstrap: 500
"""
