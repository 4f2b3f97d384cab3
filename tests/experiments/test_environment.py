"""The environment record of metrics.json: what tells machines apart."""

from pathlib import Path

import torch

from experiments.environment import cpu_signature


def test_cpu_signature_tells_the_simd_level_and_the_cpu_numbers():
    signature = cpu_signature()
    assert signature["capability"] == torch.backends.cpu.get_cpu_capability()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # Linux: family/model/stepping as /proc/cpuinfo numbers them
        first = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in cpuinfo.read_text().splitlines())
                 if k.strip() in ("cpu family", "model", "stepping")}
        if len(first) == 3:
            assert signature["family_model_stepping"] == f"{first['cpu family']}/{first['model']}/{first['stepping']}"
