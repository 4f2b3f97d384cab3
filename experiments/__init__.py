"""Hydra configs, datasets, and the training/evaluation engine of assignbench."""
