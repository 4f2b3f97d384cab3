"""assignbench-compare: a grid against its reference, with the rule stated in analysis.compare."""

import json

from analysis.compare import compare, main, verdict
from experiments.runfiles import write_grid_file


def _run(grid, variant, seed, ap, env=None):
    run = grid / f"{variant}-s{seed}"
    run.mkdir(parents=True)
    metrics = {"status": "done", "error": None, "variant": variant, "seed": seed, "AP": ap, "environment": env}
    (run / "metrics.json").write_text(json.dumps(metrics))


def test_verdict_uses_mean_plus_minus_two_sample_stds():
    reference = [10.0, 12.0, 14.0]  # mean 12, sample std 2: spread [8, 16]
    assert verdict([8.0, 16.0], reference) == "within"
    assert verdict([7.9], reference).startswith("outside (7.9 not in [8.0, 16.0])")
    assert verdict([12.0], [12.0]) == "one reference seed: no spread to compare with"
    assert verdict([], reference) == "no done run here" and verdict([1.0], []) == "no reference run"


def test_compare_pairs_variants_by_label_and_names_both_environments(tmp_path, capsys):
    here, ref = tmp_path / "runs" / "demo", tmp_path / "reference" / "demo"
    env = {"device": "CPU-A", "device_type": "cpu", "threads": 2, "versions": {"torch": "2.x"}, "data_hash": "ab",
           "cpu": {"capability": "AVX2", "family_model_stepping": "25/1/1", "flags_hash": "f1"}}
    _run(here, "IoU+none", 0, 11.0, env)
    _run(here, "PAA+IoU", 0, 30.0, env)
    for seed, ap in enumerate([10.0, 12.0, 14.0]):
        _run(ref, "IoU+none", seed, ap)
        _run(ref, "PAA+IoU", seed, ap)
    write_grid_file(here, "demo", ["PAA+IoU", "IoU+none"], baseline="IoU+none")
    rows = compare(here, ref)
    assert [(r.variant, r.verdict.split(" ")[0]) for r in rows] == [("PAA+IoU", "outside"), ("IoU+none", "within")]
    assert main([str(here), str(ref), "--out", str(tmp_path / "cmp.md")]) == 0
    text = capsys.readouterr().out
    assert "CPU-A (cpu, 2 threads, AVX2 cpu 25/1/1 flags f1), torch 2.x, data ab" in text
    assert "environment not recorded" in text
    assert (tmp_path / "cmp.md").read_text().strip() == text.strip()
    assert main([str(tmp_path / "absent"), str(ref)]) == 1


def test_compare_names_the_config_keys_that_differ(tmp_path):
    here, ref = tmp_path / "runs" / "demo", tmp_path / "reference" / "t1"
    _run(here, "IoU+none", 0, 11.0)
    _run(ref, "IoU+none", 0, 12.0)
    common = "variant: IoU+none\nschedule:\n  iters: 600\n  batch_size: 8\n"
    (here / "IoU+none-s0" / "config.yaml").write_text(common + "grid:\n  name: demo\nresults_root: results/runs\n")
    (ref / "IoU+none-s0" / "config.yaml").write_text(common.replace("600", "1200") + "grid:\n  name: t1\n")
    (row,) = compare(here, ref)
    assert row.config_differences == ("schedule.iters",)  # grid and results_root are bookkeeping
