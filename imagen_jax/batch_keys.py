"""The names of a batch's fields: one home that the data pipeline, the diffusion core, the models
and the trainer all import (no string literal for them anywhere else; a test checks).

A stage batch (`imagen_jax.data.pipeline.stage_dataset`) holds
  IMAGE             (B, H, W, 3) float32 in [-1, 1], the target at the stage's resolution
  LOWRES            (B, h, w, 3) float32 in [-1, 1], SR stages: the target box-downsampled
  TEXT_EMB          (B, L, D) bfloat16, the frozen encoder's token embeddings (cached mode)
  TOKENS            (B, L) int32, EOS-terminated token ids (on-the-fly mode; cached records too)
  TEXT_MASK         (B, L) bool, True for real tokens
  CAPTION, KEY      the caption text and the example's id (strings, host side only)
A network's condition (`imagen_jax.diffusion.guidance`) is TEXT_EMB, TEXT_MASK and, for SR stages,
the noise-augmented LOWRES with its LOWRES_AUG_LEVEL (B,).
"""

IMAGE = "image"
LOWRES = "lowres"
LOWRES_AUG_LEVEL = "lowres_aug_level"
TEXT_EMB = "text_emb"
TEXT_MASK = "text_mask"
TOKENS = "tokens"
CAPTION = "caption"
KEY = "key"
GROUND_TRUTH = "ground_truth"  # synthetic examples: the scene as JSON (for alignment scoring)
SOURCE_SIZE = "source_size"  # the source image's shorter side in pixels (0: not recorded)
