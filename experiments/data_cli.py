"""``assignbench-data``: build data sets ahead of training (``assignbench-data digits --root data``)."""

from __future__ import annotations

import argparse
import time

from experiments.data.digits import COMPLETE_MARKER, DIGITS_DEFAULTS, build_digits, digits_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="assignbench-data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    digits = commands.add_parser("digits", help="generate the embedded digits detection benchmark")
    digits.add_argument("--root", default=None, help="data root (default: $ASSIGNBENCH_DATA, else ./data)")
    digits.add_argument("--image-size", type=int, default=DIGITS_DEFAULTS["image_size"], help="canvas side in pixels")
    digits.add_argument("--num-train", type=int, default=DIGITS_DEFAULTS["num_train"], help="training images")
    digits.add_argument("--num-val", type=int, default=DIGITS_DEFAULTS["num_val"], help="validation images")
    digits.add_argument("--seed", type=int, default=DIGITS_DEFAULTS["seed"], help="generator seed")
    digits.add_argument("--num-workers", type=int, default=None, help="generator processes (default: up to 2)")
    args = parser.parse_args(argv)

    params = {"image_size": args.image_size, "num_train": args.num_train, "num_val": args.num_val, "seed": args.seed}
    cached = (digits_dir(args.root, **params) / COMPLETE_MARKER).is_file()
    start = time.perf_counter()
    path = build_digits(args.root, num_workers=args.num_workers, **params)
    seconds = time.perf_counter() - start
    print(path)
    print(f"{'found cached' if cached else 'generated'} in {seconds:.1f} s")


if __name__ == "__main__":
    main()
