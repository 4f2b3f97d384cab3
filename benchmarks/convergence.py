"""Whether a regime has converged (issue 12, point 4): the same grid trained for N and for 2N iterations.

    python -m benchmarks.convergence GRID_AT_N GRID_AT_2N [--max-rise 0.05] [--max-iou-error 0.1]

The criteria are fixed in advance and say nothing of which variant should win: the regime of N
iterations has converged when, for every variant, doubling the iterations raises its mean AP (over
the seeds both grids have) by at most ``--max-rise`` of its AP at N, and the IoU-prediction error at
2N is at most ``--max-iou-error`` wherever the variant predicts IoU. Prints one row per variant and
the verdict; exit status 0 when converged, 1 when not, 2 when the grids share no finished variant.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from analysis.runs import load_runs

__all__ = ["convergence_rows", "main"]


def _by_variant(grid_dir: Path) -> dict[str, dict[int, dict]]:
    table: dict[str, dict[int, dict]] = {}
    for run in load_runs(grid_dir):
        if run.status == "done" and run.metrics.get("AP") is not None:
            table.setdefault(run.variant, {})[run.seed] = run.metrics
    return table


def convergence_rows(short_grid: Path, long_grid: Path, max_rise: float, max_iou_error: float) -> list[dict]:
    """One dict per variant finished in both grids: seeds, mean AP at N and 2N, relative rise, IoU error, ok."""
    short, long = _by_variant(short_grid), _by_variant(long_grid)
    rows = []
    for variant in [v for v in short if v in long]:
        seeds = sorted(set(short[variant]) & set(long[variant]))
        if not seeds:
            continue
        ap_n = statistics.mean(short[variant][s]["AP"] for s in seeds)
        ap_2n = statistics.mean(long[variant][s]["AP"] for s in seeds)
        rise = (ap_2n - ap_n) / ap_n if ap_n > 0 else float("inf")
        errors = [long[variant][s].get("iou_pred_error") for s in seeds]
        iou_error = statistics.mean(errors) if all(e is not None for e in errors) else None
        ok = rise <= max_rise and (iou_error is None or iou_error <= max_iou_error)
        iters = (short[variant][seeds[0]].get("iters"), long[variant][seeds[0]].get("iters"))
        rows.append({"variant": variant, "seeds": seeds, "iters": iters, "ap_n": ap_n, "ap_2n": ap_2n,
                     "rise": rise, "iou_error": iou_error, "ok": ok})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.convergence", description=__doc__.split("\n\n")[0])
    parser.add_argument("short_grid", type=Path, help="the grid trained for N iterations")
    parser.add_argument("long_grid", type=Path, help="the same grid trained for 2N iterations")
    parser.add_argument("--max-rise", type=float, default=0.05, help="largest relative AP rise (default 0.05)")
    parser.add_argument("--max-iou-error", type=float, default=0.1, help="largest IoU-prediction error (default 0.1)")
    args = parser.parse_args(argv)
    rows = convergence_rows(args.short_grid, args.long_grid, args.max_rise, args.max_iou_error)
    if not rows:
        print(f"no variant is finished in both {args.short_grid} and {args.long_grid}", file=sys.stderr)
        return 2
    print(f"{'variant':<28} {'seeds':<9} {'iters':<12} {'AP at N':>8} {'AP at 2N':>9} {'rise':>7} {'IoU err':>8}  ok")
    for r in rows:
        error = f"{r['iou_error']:.3f}" if r["iou_error"] is not None else "-"
        seeds = ",".join(map(str, r["seeds"]))
        print(f"{r['variant']:<28} {seeds:<9} {r['iters'][0]!s:>5}/{r['iters'][1]!s:<6} {r['ap_n']:8.2f} "
              f"{r['ap_2n']:9.2f} {100 * r['rise']:6.1f}% {error:>8}  {'yes' if r['ok'] else 'NO'}")
    converged = all(r["ok"] for r in rows)
    print(f"verdict: {'converged' if converged else 'not converged'} at N (rise <= {100 * args.max_rise:g}% "
          f"and IoU error <= {args.max_iou_error:g} for every variant)")
    return 0 if converged else 1


if __name__ == "__main__":
    sys.exit(main())
