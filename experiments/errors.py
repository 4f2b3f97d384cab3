"""The errors a run can end with; ``experiments.train`` records each as a failed run."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is out of range; raised before any data is built or any step is trained.

    The message names the config key and what its valid values are.
    """


class NonFiniteLossError(RuntimeError):
    """Training met a NaN/Inf loss; the message names the iteration and the loss terms."""


class NonFiniteWeightsError(NonFiniteLossError):
    """An optimiser step with a finite loss left NaN/Inf in the model; the message names the tensors.

    Checked before every evaluation and checkpoint, so a diverged model is never scored as a result
    nor saved over the last good checkpoint.
    """


class RunInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; a checkpoint was written and the run can be resumed."""


class DeadlineReached(RunInterrupted):
    """The run's wall-clock ``deadline`` passed: checkpointed like a signal, but the grid goes on (its
    other runs stop the same way, or do not start), so a GPU slot's grids end on time."""


__all__ = ["ConfigError", "DeadlineReached", "NonFiniteLossError", "NonFiniteWeightsError", "RunInterrupted"]
