"""The metrics: the Fréchet distance (FID of folders and statistics) and the synthetic-shapes
scorer."""
