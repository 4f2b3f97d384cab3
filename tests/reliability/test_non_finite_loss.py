"""A non-finite loss stops its run, keeps what the run had, and never stops the grid.

Defined behaviour: when the total loss of a step is NaN or Inf, the engine raises before the
backward pass, so no optimiser step and no checkpoint is taken from it. The run is recorded in
``metrics.json`` as ``status: failed`` with the iteration and every loss term in ``error``; the
last checkpoint written before the fault stays byte for byte as it was, ``stats.csv`` keeps the
rows of the finished iterations; a single run exits with status 1 and a multirun goes on with the
next variant. Divergence here is real (``schedule.base_lr=1e6``), not injected.

A step whose loss was finite can still leave NaN/Inf in the weights; the engine checks them before
every evaluation and checkpoint and fails the run the same way (``NonFiniteWeightsError``), so a
diverged model is never saved over the last good checkpoint nor reported as a result.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import experiments.build as build
import experiments.hooks as hooks

from . import execute_in_process, run_app, run_dir, stats_iters, tiny_overrides

NON_FINITE_ERROR = re.compile(
    r"^NonFiniteLossError: non-finite loss at iteration (\d+): "
    r"loss_cls=(\S+), loss_box=(\S+), loss_quality=(\S+)$"
)


@pytest.mark.slow
def test_a_diverging_run_fails_with_iteration_and_terms_and_keeps_its_last_checkpoint(tmp_path, monkeypatch):
    saved: list[tuple[int, bytes]] = []
    real_save = hooks.save_checkpoint

    def recording_save(path, state):
        real_save(path, state)
        saved.append((int(state["iter"]), path.read_bytes()))

    monkeypatch.setattr(hooks, "save_checkpoint", recording_save)
    overrides = tiny_overrides(tmp_path, "schedule.iters=8", "schedule.base_lr=1e6")
    with pytest.raises(SystemExit) as exit_info:
        execute_in_process(overrides, raise_on_failure=True)
    assert exit_info.value.code == 1

    run = run_dir(tmp_path, "max_iou_none-s0")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["AP"] is None
    match = NON_FINITE_ERROR.match(metrics["error"])
    assert match, metrics["error"]
    failed_at = int(match.group(1))
    assert any(term in ("nan", "inf", "-inf") for term in match.groups()[1:])
    # The checkpoint is the last one written before the fault, unchanged; stats hold the good steps.
    assert saved, "the run diverged before its first checkpoint; raise schedule.iters or lower checkpoint_every"
    last_iter, last_bytes = saved[-1]
    assert last_iter < failed_at
    checkpoint = run / "checkpoints" / "last.pt"
    assert checkpoint.read_bytes() == last_bytes
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["iter"] == last_iter
    assert stats_iters(run) == list(range(1, failed_at))


@pytest.mark.slow
def test_weights_made_non_finite_by_a_step_are_never_checkpointed_or_scored(tmp_path, monkeypatch):
    # A step with a finite loss can still leave Inf in the weights (a huge gradient). The engine checks
    # the weights before each checkpoint and evaluation, so the last good checkpoint stays.
    real_build = build.build_optimizer

    def build_poisoned_at_step_4(*args, **kwargs):
        optimizer = real_build(*args, **kwargs)
        steps = []

        def after_step(optimizer, step_args, step_kwargs):
            steps.append(len(steps) + 1)
            if steps[-1] == 4:  # iteration 4 is a checkpoint iteration (every 2)
                with torch.no_grad():
                    optimizer.param_groups[0]["params"][0].fill_(float("inf"))

        optimizer.register_step_post_hook(after_step)
        return optimizer

    monkeypatch.setattr(build, "build_optimizer", build_poisoned_at_step_4)
    execute_in_process(tiny_overrides(tmp_path, "schedule.iters=6"))

    run = run_dir(tmp_path, "max_iou_none-s0")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["AP"] is None
    assert metrics["error"].startswith("NonFiniteWeightsError: non-finite weights after iteration 4: backbone."), (
        metrics["error"]
    )
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["iter"] == 2
    assert all(bool(torch.isfinite(t).all()) for t in state["model"].values() if t.is_floating_point())


@pytest.mark.slow
def test_a_grid_goes_on_past_a_diverging_variant(tmp_path):
    # Two variants of one multirun, named by their learning rate; the first diverges.
    overrides = tiny_overrides(tmp_path, "schedule.iters=6", "schedule.checkpoint_every=100")
    proc = run_app("-m", *overrides, "schedule.base_lr=1e6,0.01", "run_name=lr${schedule.base_lr}", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    diverged = json.loads((run_dir(tmp_path, "lr1000000.0") / "metrics.json").read_text())
    assert diverged["status"] == "failed" and NON_FINITE_ERROR.match(diverged["error"]), diverged["error"]
    assert "FAILED: NonFiniteLossError" in proc.stderr
    assert "Traceback" not in proc.stderr  # the message is the whole story

    finished = json.loads((run_dir(tmp_path, "lr0.01") / "metrics.json").read_text())
    assert finished["status"] == "done" and finished["error"] is None and finished["iters"] == 6
    assert 0.0 <= finished["AP"] <= 100.0
