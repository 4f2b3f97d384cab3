"""Package boundaries of ARCHITECTURE.md: experiments never imports analysis; analysis and the
results contract never import torch (checked in a fresh interpreter, where nothing is imported yet)."""

import subprocess
import sys

import pytest

PROBE = """
import sys
import {module}
bad = sorted(m for m in sys.modules if m == "{forbidden}" or m.startswith("{forbidden}."))
print(",".join(bad))
"""


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("experiments.engine", "analysis"),
        ("experiments.train", "analysis"),
        ("experiments.rescore", "analysis"),
        ("experiments.runfiles", "torch"),
        ("experiments.matches", "torch"),
        ("analysis.report", "torch"),
        ("analysis.callbacks", "torch"),
        ("analysis.compare", "torch"),
        ("analysis.bootstrap", "torch"),
    ],
)
def test_module_does_not_import(module, forbidden):
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module, forbidden=forbidden)],
                         capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    assert out == "", f"importing {module} imports {out}"
