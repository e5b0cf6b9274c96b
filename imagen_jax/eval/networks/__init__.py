"""The metric networks, in Flax: the FID Inception-v3 and CLIP, loaded from the user's checkpoint
files."""
