"""Each trainer hook alone, on a stub trainer: what it writes and when (experiments.hooks)."""

import csv
import os
import signal
from types import SimpleNamespace

import pytest
import torch

import assigners
from detector import AssignTimer
from experiments import hooks
from experiments.errors import NonFiniteWeightsError, RunInterrupted
from experiments.runfiles import STATS_FIELDS, StatsWriter
from experiments.trainer import StepOutput, TrainState


def stub_trainer(max_iter=6):
    model = torch.nn.Linear(2, 1)
    trainer = SimpleNamespace(state=TrainState(iter=0, max_iter=max_iter), model=model, step_output=None)
    trainer.checkpoint_state = lambda: {"iter": trainer.state.iter, "model": model.state_dict()}
    return trainer


def one_gt_step(loss_cls, num_pos, seconds=0.5):
    """A step whose assignment gives one GT ``num_pos`` positives among 4 anchors."""
    anchors = torch.tensor([[0.0, 0, 8, 8], [8, 0, 16, 8], [0, 8, 8, 16], [8, 8, 16, 16]])
    inputs = assigners.AssignInputs(anchors=anchors, num_anchors_per_level=[4], gt_boxes=torch.tensor([[[0.0, 0, 8, 8]]]),
                                    gt_labels=torch.zeros(1, 1, dtype=torch.int64), gt_mask=torch.ones(1, 1, dtype=torch.bool))
    gt_index = torch.tensor([[0] * num_pos + [-1] * (4 - num_pos)])
    losses = {"loss_cls": torch.tensor(loss_cls), "loss_box": torch.tensor(0.5), "loss_quality": torch.tensor(0.0)}
    info = {"inputs": inputs, "assignment": assigners.Assignment(gt_index=gt_index), "assign_ms": AssignTimer(cpu_ms=2.0)}
    return StepOutput(losses, info, seconds)


def attach(hook, trainer):
    hook.trainer = trainer
    return hook


def advance(trainer, hook_list, step):
    trainer.state.iter += 1
    trainer.step_output = step
    for hook in hook_list:
        hook.after_step()


def test_stats_hook_writes_window_means_every_log_every_and_at_the_end(tmp_path):
    trainer = stub_trainer(max_iter=5)
    hook = attach(hooks.StatsHook(StatsWriter(tmp_path / "stats.csv"), log_every=2, total_batch=4, quiet=True), trainer)
    for loss_cls, num_pos in [(1.0, 1), (3.0, 3), (2.0, 2), (4.0, 4), (5.0, 1)]:
        advance(trainer, [hook], one_gt_step(loss_cls, num_pos))
    hook.after_train()
    rows = list(csv.DictReader(open(tmp_path / "stats.csv")))
    assert list(rows[0]) == STATS_FIELDS
    # iterations 1-2, 3-4, then the last one alone: means of the window
    assert [int(r["iter"]) for r in rows] == [2, 4, 5]
    assert [float(r["loss_cls"]) for r in rows] == [2.0, 3.0, 5.0]
    assert [float(r["pos_per_gt_mean"]) for r in rows] == [2.0, 3.0, 1.0]
    assert [float(r["assign_ms"]) for r in rows] == [2.0, 2.0, 2.0]
    # the IoU of the positives with the GT: anchor 0 overlaps fully (1), the others 0
    assert float(rows[2]["pos_iou_mean"]) == 1.0 and float(rows[1]["pos_iou_mean"]) == pytest.approx((1 / 2 + 1 / 4) / 2)


def test_checkpoint_hook_saves_at_evaluations_and_every_n_iterations(tmp_path):
    trainer = stub_trainer(max_iter=6)
    saved = []
    hook = attach(hooks.CheckpointHook(tmp_path / "last.pt", frozenset({3, 6}), 4, is_main=True,
                                       barrier=lambda: saved.append(trainer.state.iter)), trainer)
    for _ in range(6):
        advance(trainer, [hook], None)
    assert saved == [3, 4, 6]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["iter"] == 6


def test_eval_hook_builds_the_ap_curve_and_keeps_the_last_result():
    trainer = stub_trainer(max_iter=4)
    calls = []

    def evaluate():
        calls.append(trainer.state.iter)
        return {"AP": 10.0 * trainer.state.iter}, 0.1, [{"image_id": trainer.state.iter}]

    hook = attach(hooks.EvalHook(evaluate, frozenset({2, 4}), "run", is_main=False), trainer)
    for _ in range(4):
        advance(trainer, [hook], None)
    assert calls == [2, 4] and trainer.state.ap_curve == [[2, 20.0], [4, 40.0]]
    assert trainer.state.final_ap == {"AP": 40.0} and trainer.state.last_results == [{"image_id": 4}]


def test_stop_signal_hook_checkpoints_and_raises_after_the_step_the_signal_arrived_in():
    trainer = stub_trainer(max_iter=5)
    checkpoints = []
    hook = attach(hooks.StopSignalHook(lambda: checkpoints.append(trainer.state.iter)), trainer)
    previous = signal.getsignal(signal.SIGTERM)
    hook.before_train()
    try:
        advance(trainer, [hook], None)
        assert checkpoints == []
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets the flag
        with pytest.raises(RunInterrupted, match="SIGTERM at iteration 2"):
            advance(trainer, [hook], None)
        assert checkpoints == [2]
    finally:
        hook.after_train()
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler it replaced is back


def test_stop_signal_hook_hands_the_schedulers_preemption_signal_over_after_checkpointing():
    # submitit installs a Python handler for its preemption signal (SIGUSR2) that requeues the job and exits;
    # the hook must write the checkpoint at the step the signal arrived in first, then call that handler.
    trainer = stub_trainer(max_iter=5)
    events = []
    hook = attach(hooks.StopSignalHook(lambda: events.append(("checkpoint", trainer.state.iter))), trainer)

    def scheduler(signum, frame):  # as submitit's on a rank that does not requeue: it returns
        events.append(("scheduler", signal.Signals(signum).name, signal.getsignal(signal.SIGUSR2) is scheduler))

    previous = signal.signal(signal.SIGUSR2, scheduler)
    try:
        hook.before_train()
        advance(trainer, [hook], None)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert events == []  # the hook's handler only set the flag
        with pytest.raises(RunInterrupted, match="SIGUSR2 at iteration 2"):
            advance(trainer, [hook], None)
        # checkpoint first, then the scheduler's handler, called with its own handler already back in place
        assert events == [("checkpoint", 2), ("scheduler", "SIGUSR2", True)]
        assert signal.getsignal(signal.SIGTERM) is not hook._handle
    finally:
        hook.after_train()
        signal.signal(signal.SIGUSR2, previous)


def test_stop_signal_hook_leaves_the_preemption_signal_alone_without_a_scheduler():
    trainer = stub_trainer(max_iter=5)
    hook = attach(hooks.StopSignalHook(lambda: None), trainer)
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
    hook.before_train()
    try:
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) == hook._handle
    finally:
        hook.after_train()


def test_finite_weights_hook_checks_before_evaluations_and_checkpoints_only():
    trainer = stub_trainer(max_iter=6)
    stop = hooks.StopSignalHook(lambda: None)
    hook = attach(hooks.FiniteWeightsHook(frozenset({6}), 4, stop), trainer)
    with torch.no_grad():
        trainer.model.weight.fill_(float("nan"))
    for _ in range(3):  # iterations 1-3: neither evaluation nor checkpoint, not checked
        advance(trainer, [hook], None)
    with pytest.raises(NonFiniteWeightsError, match="after iteration 4: weight"):
        advance(trainer, [hook], None)


def test_assigner_iteration_hook_tells_tal_when_its_atss_warmup_ends():
    # TAL with warmup_iters=2 resumed at iteration 1: step index 1 is still warm-up (ATSS),
    # after it the next step's index is 2 and TAL proper takes over.
    trainer = stub_trainer(max_iter=4)
    trainer.state.iter = 1
    tal = assigners.build("tal", warmup_iters=2)
    hook = attach(hooks.AssignerIterationHook(tal), trainer)
    hook.before_train()
    assert tal.iteration == 1 and tal.in_warmup
    advance(trainer, [hook], one_gt_step(1.0, 1))
    assert tal.iteration == 2 and not tal.in_warmup
    # An assigner without a schedule (a plain callable) is left alone.
    attach(hooks.AssignerIterationHook(lambda inputs: None), trainer).before_train()
