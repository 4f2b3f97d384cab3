"""Hydra configs, datasets, and the training/evaluation engine of assignbench."""

from . import resolvers as _resolvers  # noqa: F401  (registers the config resolvers)
