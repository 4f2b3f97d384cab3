"""Reading a grid's runs (``results/<grid>/<run>/``) into pandas, paper-style tables and plots.

Reads files only (ARCHITECTURE.md, results contract); never imports torch. The entry points
are ``analysis.report.write_report(grid_dir)`` and the ``assignbench-report`` console script.
"""

from __future__ import annotations

from typing import Any

__all__ = ["write_report"]


def __getattr__(name: str) -> Any:
    # Imported lazily: ``import analysis`` stays light, and ``python -m analysis.report`` does not
    # find analysis.report already imported by its package (runpy warns about that).
    if name == "write_report":
        from analysis.report import write_report

        return write_report
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
