"""The frozen T5 v1.1 text encoder: model, tokenizer, checkpoint loaders, batched encoding.

Imports without TensorFlow; the tokenizer uses seqio when it is installed and sentencepiece directly
otherwise (same model file, same ids).
"""

from imagen_jax.text.t5 import (
  EOS_ID,
  PAD_ID,
  T5_SIZES,
  T5Config,
  T5Encoder,
  relative_position_bucket,
  t5_config,
)
