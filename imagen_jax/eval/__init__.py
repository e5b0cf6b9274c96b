"""Evaluation: automatic alignment on the synthetic shapes (`shapes`), guidance/thresholding sweeps through the
cascade (`sweep`), and DrawBench sampling, side-by-side rating page and tally (`drawbench`). No TensorFlow."""
