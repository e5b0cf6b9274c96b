"""The evaluations a command runs end to end: sweeps through the cascade (shapes alignment, FID
and CLIP), DrawBench (sampling, rating page, tally), the COCO FID-30K inputs, and their plots."""
