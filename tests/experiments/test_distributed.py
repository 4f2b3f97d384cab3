"""Evaluation sharded over ranks: the batches each rank takes, and 2 gloo processes on the CPU writing the
same ``detections.json`` (byte for byte), AP and IoU-prediction error as one process."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import experiments.engine as engine
from experiments.distributed import DistInfo, shard_batches
from experiments.runfiles import AP_NAMES
from experiments.trainer import TrainState

from .test_engine import tiny_cfg

# A random model (seeded) with score threshold 0 detects on every image; the IoU scorer predicts IoU,
# so the IoU-prediction error is gathered too. 6 val images in batches of 2: rank 0 takes batches 0
# and 2 (4 images), rank 1 batch 1 (2 images).
EVAL = ["assigner=atss", "scorer=iou", "model.num_convs=1", "inference.score_thresh=0.0", "inference.max_det=30",
        "eval.batch_size=2", "num_threads=1"]
TTA = ["inference.tta.enabled=true", "inference.tta.scales=[64]", "inference.tta.max_size=96"]


def test_shards_are_whole_batches_dealt_in_turn():
    # 7 items in batches of 2 -> batches [0,1] [2,3] [4,5] [6]; two ranks take batches 0, 2 and 1, 3.
    assert shard_batches(7, 2, DistInfo(0, 2)) == [0, 1, 4, 5]
    assert shard_batches(7, 2, DistInfo(1, 2)) == [2, 3, 6]
    # 5 items in batches of 3 over three ranks: the third rank has no batch.
    assert [shard_batches(5, 3, DistInfo(rank, 3)) for rank in range(3)] == [[0, 1, 2], [3, 4], []]
    assert shard_batches(5, 3, DistInfo()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="batch_size"):
        shard_batches(5, 0, DistInfo())


def _evaluate(cfg, run_dir, weights, inferred: list[int]) -> tuple[dict, float | None, list]:
    """The final evaluation of ``weights`` written as a run (``finish_run``), as ``assignbench-eval`` does;
    appends to ``inferred`` the size of every batch this process ran the model on."""
    run = engine.build_run(cfg, run_dir)
    run.model.load_state_dict(torch.load(weights, weights_only=True))
    run.model.register_forward_pre_hook(lambda module, args: inferred.append(len(args[0])))
    state = TrainState(iter=run.budget.iters, max_iter=run.budget.iters)
    state.final_ap, state.iou_pred_error, state.last_results = engine.make_evaluator(run)()
    engine.finish_run(run, state, [])
    return state.final_ap, state.iou_pred_error, state.last_results


def _worker(rank, world, init_file, cases, weights, out):
    import os

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, (cfg, run_dir) in cases.items():
            inferred: list[int] = []
            ap, iou_err, results = _evaluate(cfg, run_dir, weights, inferred)
            out[name, rank] = {"ap": ap, "iou_err": iou_err, "results": len(results), "inferred": sum(inferred)}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_write_the_detections_of_one(tmp_path):
    # Plain inference and TTA (the test size, its mirror, 64 px and its mirror: 4 passes), in one spawn.
    cfgs = {"plain": tiny_cfg(tmp_path, *EVAL)[0], "tta": tiny_cfg(tmp_path, *EVAL, *TTA)[0]}
    passes = {"plain": 1, "tta": 4}
    weights = tmp_path / "weights.pt"
    torch.manual_seed(0)
    torch.save(engine.build_run(cfgs["plain"], tmp_path / "init_run").model.state_dict(), weights)  # random, seeded
    one = {}
    for name, cfg in cfgs.items():  # one process: the whole val set
        one[name] = _evaluate(cfg, tmp_path / "one" / name, weights, [])
        ap, iou_err, results = one[name]
        assert len(results) > 50 and iou_err is not None and ap["AP"] is not None

    out = mp.Manager().dict()
    cases = {name: (cfg, tmp_path / "two" / name) for name, cfg in cfgs.items()}
    mp.spawn(_worker, args=(2, tmp_path / "init", cases, weights, out), nprocs=2, join=True)
    for name in cfgs:
        one_dir, two_dir = tmp_path / "one" / name, tmp_path / "two" / name
        assert (two_dir / "detections.json").read_bytes() == (one_dir / "detections.json").read_bytes(), name
        metrics = {d: json.loads((d / "metrics.json").read_text()) for d in (one_dir, two_dir)}
        for field in (*AP_NAMES, "iou_pred_error", "errors"):
            assert metrics[two_dir][field] == metrics[one_dir][field], (name, field)
        assert metrics[two_dir]["environment"]["world_size"] == 2
        # Each rank ran the model on its own shard only (per TTA pass); both know the AP and the error;
        # the detections are rank 0's.
        ap, iou_err, results = one[name]
        assert (out[name, 0]["inferred"], out[name, 1]["inferred"]) == (4 * passes[name], 2 * passes[name])
        assert out[name, 0]["ap"] == out[name, 1]["ap"] == ap
        assert out[name, 0]["iou_err"] == out[name, 1]["iou_err"] == iou_err
        assert (out[name, 0]["results"], out[name, 1]["results"]) == (len(results), 0)
