"""Config errors fail before any data is generated or any step is trained, listing what is valid.

Defined behaviour:

* An unknown assigner, scorer or grid is a Hydra composition error: the app exits non-zero
  before it runs, and the message lists the available options. Nothing is written.
* A parameter out of range (``topk <= 0``, a PAA scheme other than a-d, ``min_score`` outside
  (0, 1], ``num_pos <= 0``, ``pos_iou < neg_iou``, an unknown ``scorer.name``, ``schedule.iters
  <= 0``) makes the constructor raise ValueError, which the engine reports as a ``ConfigError``
  naming the config key. It is raised first thing in the run, before the data set is generated
  or loaded: the run is recorded as ``failed`` with that message (no stats, no checkpoint, no
  data folder), and a single run exits with status 1.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from . import REPO_ROOT, app_env, execute_in_process, run_dir, tiny_overrides, train_command


def test_unknown_choices_are_refused_with_the_valid_options(tmp_path):
    results = tmp_path / "results"
    cases = {
        "assigner=nope": ["atss", "fnp", "fsr", "max_iou", "paa"],
        "scorer=nope": ["centerness", "iou", "none"],
        "grid=nope": ["demo", "single", "table1_modules", "table1_separation", "table4_topk_scale"],
    }
    commands = {override: train_command(f"results_root={results}", override) for override in cases}
    commands["-m grid=nope"] = train_command("-m", f"results_root={results}", "grid=nope")
    cases["-m grid=nope"] = cases["grid=nope"]
    # Started together: each is mostly interpreter start-up.
    processes = {
        key: subprocess.Popen(command, cwd=REPO_ROOT, env=app_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
        for key, command in commands.items()
    }
    for key, process in processes.items():
        _, stderr = process.communicate(timeout=120)
        assert process.returncode != 0, key
        group = key.split()[-1].split("=")[0]
        assert f"Could not find '{group}/nope'" in stderr, stderr[-2000:]
        listed = stderr.split(f"Available options in '{group}':", 1)[1].split()
        assert all(option in listed for option in cases[key]), (key, stderr[-2000:])
    assert not results.exists()


OUT_OF_RANGE = [
    # (overrides, the constructor's message)
    (["assigner=atss", "assigner.topk=0"], "topk must be a positive int"),
    (["assigner=paa", "assigner.topk=-3"], "topk must be a positive int"),
    (["assigner=fnp", "assigner.topk=0"], "topk must be a positive int"),
    (["assigner=fsr", "assigner.topk=0"], "topk must be a positive int"),
    (["assigner=paa", "assigner.scheme=e"], "unknown PAA scheme 'e'; valid choices: a, b, c, d"),
    (["assigner=fsr", "assigner.min_score=0.0"], "min_score must be in (0, 1], got 0.0"),
    (["assigner=fsr", "assigner.min_score=1.5"], "min_score must be in (0, 1], got 1.5"),
    (["assigner=fnp", "assigner.num_pos=0"], "num_pos must be a positive int"),
    (["assigner=max_iou", "assigner.pos_iou=0.3", "assigner.neg_iou=0.4"], "neg_iou <= pos_iou"),
    (["scorer.name=bogus"], "unknown scorer 'bogus'; valid choices: none, centerness, iou"),
    (["schedule.iters=0"], "schedule.iters must be > 0"),
]


@pytest.mark.parametrize(("overrides", "message"), OUT_OF_RANGE, ids=[" ".join(o) for o, _ in OUT_OF_RANGE])
def test_out_of_range_parameters_fail_the_run_before_data_and_training(tmp_path, overrides, message):
    execute_in_process(tiny_overrides(tmp_path, *overrides))
    runs = list((tmp_path / "results" / "single").iterdir())
    assert len(runs) == 1
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["status"] == "failed"
    assert metrics["error"].startswith("ConfigError: ") and message in metrics["error"], metrics["error"]
    assert not (tmp_path / "data").exists(), "the data set was generated before the config was checked"
    assert not (runs[0] / "stats.csv").exists() and not (runs[0] / "checkpoints").exists()


def test_a_single_run_with_a_bad_parameter_exits_non_zero_without_a_traceback(tmp_path):
    overrides = tiny_overrides(tmp_path, "assigner=paa", "assigner.scheme=e")
    proc = subprocess.run(train_command(*overrides), cwd=REPO_ROOT, env=app_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert "FAILED: ConfigError: assigner: unknown PAA scheme 'e'; valid choices: a, b, c, d" in proc.stderr
    assert "Traceback" not in proc.stderr
    metrics = json.loads((run_dir(tmp_path, "paa_none-s0") / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "valid choices: a, b, c, d" in metrics["error"]
