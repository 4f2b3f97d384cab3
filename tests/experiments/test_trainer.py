"""Trainer.run_step's loss check: every step with sync_every=1, once per sync_every steps otherwise."""

import itertools

import pytest
import torch

from experiments.errors import NonFiniteLossError
from experiments.trainer import Trainer, TrainState


def linear_trainer(sync_every, bad_iteration, max_iter=8):
    """A trainer of a 2->1 linear model whose loss is NaN at ``bad_iteration`` (1-based)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    calls = itertools.count(1)

    def criterion(out, targets):
        poison = float("nan") if next(calls) == bad_iteration else 1.0
        return {"loss_a": out.square().mean() * poison, "loss_b": out.abs().mean()}, {}

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    batches = iter(lambda: (torch.ones(3, 2), [{}]), None)
    return Trainer(model, model, criterion, optimizer, scheduler, batches, torch.device("cpu"),
                   TrainState(iter=0, max_iter=max_iter), sync_every=sync_every)


def test_every_step_is_checked_before_its_backward_pass():
    trainer = linear_trainer(sync_every=1, bad_iteration=3)
    trainer.run_step(), trainer.run_step()
    weights = trainer.model.weight.detach().clone()
    with pytest.raises(NonFiniteLossError, match=r"iteration 3: loss_a=nan, loss_b="):
        trainer.run_step()
    assert trainer.state.iter == 2 and torch.equal(trainer.model.weight, weights)  # the NaN step did not train


def test_deferred_check_names_the_bad_iteration_at_the_next_sync():
    trainer = linear_trainer(sync_every=4, bad_iteration=6)
    steps = [trainer.run_step() for _ in range(5)]
    assert [s.synced for s in steps] == [False, False, False, True, False]
    with pytest.raises(NonFiniteLossError, match=r"iteration 6: loss_a=nan"):
        for _ in range(3):
            trainer.run_step()
    assert trainer.state.iter == 8  # reported at the check after iteration 8, not before


def test_the_last_iteration_is_always_checked():
    trainer = linear_trainer(sync_every=5, bad_iteration=7, max_iter=7)
    for _ in range(6):
        trainer.run_step()
    with pytest.raises(NonFiniteLossError, match="iteration 7"):
        trainer.run_step()


def test_a_passed_deadline_checkpoints_and_stops_after_the_step():
    import time

    from experiments.errors import DeadlineReached
    from experiments.hooks import StopSignalHook

    saved = []
    trainer = linear_trainer(sync_every=1, bad_iteration=0)
    hook = StopSignalHook(lambda: saved.append(trainer.state.iter), deadline=time.time() - 1)
    hook.trainer = trainer
    trainer.hooks = [hook]
    with pytest.raises(DeadlineReached, match="deadline passed at iteration 1; checkpoint written"):
        trainer.train()
    assert saved == [1] and trainer.state.iter == 1
