"""Speed and memory benchmarks that measure the compared things side by side in one run.

    python -m benchmarks.assign   # assignment cost of every assigner, digits and COCO-like batches
    python -m benchmarks.train    # training-step images/s: our detector vs torchvision FCOS
    python -m benchmarks.eval     # COCOeval time: pycocotools vs faster-coco-eval

Each takes ``--device cpu|cuda``, ``--reps N`` and ``--threads N``, prints one line per figure
plus the ratios, and writes a CSV under ``results/runs/bench/`` (``benchmarks.common``).
"""
