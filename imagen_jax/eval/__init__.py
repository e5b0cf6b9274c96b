"""Evaluation in three kinds: `networks` (the FID Inception-v3 and CLIP in Flax), `metrics`
(Fréchet distance, FID of folders, the shapes scorer) and `tasks` (what the `imagen-jax eval`
commands run: sweeps, DrawBench, COCO inputs, plots). No TensorFlow."""
