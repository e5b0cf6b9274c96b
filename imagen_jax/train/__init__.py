"""Training one cascade stage: state, optimizer, step, checkpoints, data sources and the loop.

Imports without TensorFlow (the data pipeline is loaded only when a seqio task is read).
"""

from imagen_jax.train.loop import NonFiniteError, TrainError, TrainSummary, train
from imagen_jax.train.optimizer import OptimizerConfig, make_optimizer
from imagen_jax.train.state import TrainState, create_state
from imagen_jax.train.step import step_signature, train_step
