"""Scale tooling beside the trainer: the chip table, FLOPs and MFU, the TPU compile check, the
benchmark and the host-RAM watch. It builds the trainer's own step (`imagen_jax.train.setup`);
nothing in the trainer's step builder depends on it."""
