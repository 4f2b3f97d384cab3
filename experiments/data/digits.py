"""The embedded ``digits`` detection benchmark: COCO-format images generated from scikit-learn's digits.

``sklearn.datasets.load_digits()`` ships 1797 handwritten digits (8x8 pixels, intensities 0..16, classes
0..9) inside scikit-learn, so this data set needs no download. Each generated image is a square RGB canvas
with a smooth colour gradient, a few distractor strokes drawn in the same ink colours as the digits (hard
negatives: an arc looks a lot like a "0", a bar like a "1"), and ``min_objects..max_objects`` digits pasted
at log-uniform sizes and aspect ratios, plus sensor noise.

Properties the tests rely on:

* Annotation boxes are the *tight* extent of each resized digit's ink (coverage > ``INK_THRESHOLD``), not the
  pasted rectangle, in COCO ``xywh`` pixels with the pixel-edge convention (a box covering columns 3..5 has
  ``x=3, w=3``).
* ``max_overlap_iou`` is enforced on these tight boxes, i.e. on exactly what is annotated.
* The 1797 source digits are split once by a seeded permutation: the first ``train_fraction`` feed train
  images only, the rest val images only, so val handwriting is never seen in training. Each annotation
  records its source digit in an extra ``source_index`` field.
* Output is a pure function of the parameters: every image draws from its own RNG seeded by
  ``(seed, split, index)``, so neither worker count nor scheduling changes a pixel.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["DIGITS_DEFAULTS", "INK_THRESHOLD", "build_digits", "data_root", "digits_dir", "tight_box"]

DIGITS_DEFAULTS: dict = {
    "image_size": 128,
    "num_train": 6000,
    "num_val": 500,
    "seed": 0,
    "min_size": 12.0,
    "max_size": 64.0,
    "min_aspect": 0.6,
    "max_aspect": 1.7,
    "min_objects": 1,
    "max_objects": 5,
    "max_strokes": 2,
    "max_overlap_iou": 0.1,
    "train_fraction": 0.85,
}
"""Default generation parameters. Sizes are pixels; ``min_size``/``max_size`` bound the box side
``sqrt(w * h)`` of the pasted patch; aspect ratios are ``w / h``."""

VERSION = "digits-v1"
"""Directory name stem; bump it whenever the generator's output changes for the same parameters."""

INK_THRESHOLD = 0.15
"""A pixel belongs to a digit's box when its ink coverage (resized intensity / 16, in [0, 1]) exceeds this."""

INK_SOLID = 0.5
"""Coverage from which ink is fully opaque. Alpha ramps linearly from 0 at ``INK_THRESHOLD`` to 1 here, so the
faint haze of the 8x8 sources never paints a visible rectangle and every inked pixel lies inside the box."""

CATEGORY_NAMES = [str(digit) for digit in range(10)]
SPLITS = ("train", "val")
COMPLETE_MARKER = ".complete"
MAX_PLACEMENT_TRIES = 20  # positions tried per object before the object is skipped
MAX_EXTRA_OBJECTS = 100  # fresh objects tried to reach min_objects after skips
SERIAL_BELOW = 256  # images; smaller jobs are generated in-process (a pool costs more than it saves)


def data_root(root: str | Path | None = None) -> Path:
    """The data root: ``root`` if given, else ``$ASSIGNBENCH_DATA``, else ``data/`` in the working directory."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get("ASSIGNBENCH_DATA", "data"))


def _normalised_params(params: dict) -> dict:
    """Defaults overridden by ``params``, each cast to its default's type (so ``min_size=8`` equals ``8.0``).

    Raises ValueError on an unknown name or an inconsistent range.
    """
    unknown = sorted(set(params) - set(DIGITS_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown digits parameter(s) {unknown}; known: {sorted(DIGITS_DEFAULTS)}")
    merged = {name: type(default)(params.get(name, default)) for name, default in DIGITS_DEFAULTS.items()}
    checks = [
        (merged["image_size"] >= 16, "image_size must be >= 16"),
        (merged["num_train"] >= 0 and merged["num_val"] >= 0, "num_train and num_val must be >= 0"),
        (0 < merged["min_size"] <= merged["max_size"], "need 0 < min_size <= max_size"),
        (0 < merged["min_aspect"] <= merged["max_aspect"], "need 0 < min_aspect <= max_aspect"),
        (0 <= merged["min_objects"] <= merged["max_objects"], "need 0 <= min_objects <= max_objects"),
        (merged["max_strokes"] >= 0, "max_strokes must be >= 0"),
        (0 <= merged["max_overlap_iou"] <= 1, "max_overlap_iou must be in [0, 1]"),
        (0 < merged["train_fraction"] < 1, "train_fraction must be in (0, 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"invalid digits parameters: {message} (got {merged})")
    return merged


def digits_dir(root: str | Path | None = None, **params) -> Path:
    """Directory of the data set for ``params``: ``<root>/digits-v1`` for the defaults, else
    ``<root>/digits-v1-<8 hex chars of a hash of the parameters>``."""
    merged = _normalised_params(params)
    if merged == DIGITS_DEFAULTS:
        return data_root(root) / VERSION
    digest = hashlib.sha256(json.dumps(merged, sort_keys=True).encode()).hexdigest()[:8]
    return data_root(root) / f"{VERSION}-{digest}"


def _is_complete(directory: Path, params: dict) -> bool:
    """True when ``directory`` holds a finished data set generated with exactly ``params``."""
    try:
        stored = json.loads((directory / "params.json").read_text())
    except (OSError, ValueError):
        return False
    return stored == params and (directory / COMPLETE_MARKER).is_file()


def build_digits(root: str | Path | None = None, *, num_workers: int | None = None, **params) -> Path:
    """Generate the digits data set (or find it cached) and return its directory.

    Args:
        root: data root (see ``data_root``).
        num_workers: generator processes; ``None`` uses up to 2 (the CPUs available) for large jobs and
            none for small ones. It never changes the output.
        **params: overrides of ``DIGITS_DEFAULTS``.

    Returns:
        The directory holding ``train/*.png``, ``val/*.png``, ``annotations/instances_{train,val}.json``,
        ``params.json`` and a completion marker.

    The set is written into a temporary sibling directory and renamed into place only when complete, so a
    killed generation never leaves a half data set that looks finished; a second call returns at once.
    """
    merged = _normalised_params(params)
    target = digits_dir(root, **merged)
    if _is_complete(target, merged):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _generate(staging, merged, num_workers)
        (staging / "params.json").write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
        (staging / COMPLETE_MARKER).write_text(f"generated {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        if target.exists():
            if _is_complete(target, merged):  # a concurrent build finished first
                return target
            shutil.rmtree(target)  # stale or incomplete leftovers of an older layout
        os.replace(staging, target)
    except OSError:
        if _is_complete(target, merged):  # lost a rename race to a concurrent build
            return target
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------------------------
# Generation driver


def _source_split(num_sources: int, params: dict) -> dict[str, np.ndarray]:
    """Indices of the source digits each split may use: a seeded permutation cut at ``train_fraction``."""
    order = np.random.default_rng(params["seed"]).permutation(num_sources)
    num_train_sources = int(round(params["train_fraction"] * num_sources))
    return {"train": np.sort(order[:num_train_sources]), "val": np.sort(order[num_train_sources:])}


def _generate(out_dir: Path, params: dict, num_workers: int | None) -> None:
    """Render both splits into ``out_dir`` (images and COCO annotation files)."""
    from sklearn.datasets import load_digits

    source = load_digits()
    source_images = source.images.astype(np.float32) / 16.0  # (1797, 8, 8) ink coverage in [0, 1]
    source_labels = source.target.astype(np.int64)  # (1797,) digit classes 0..9
    pools = _source_split(len(source_labels), params)
    (out_dir / "annotations").mkdir()
    tasks = []
    for split in SPLITS:
        (out_dir / split).mkdir()
        tasks += [(split, index) for index in range(params[f"num_{split}"])]

    if num_workers is None:
        num_workers = 0 if len(tasks) < SERIAL_BELOW else min(2, os.cpu_count() or 1)
    state = (source_images, source_labels, pools, params, str(out_dir))
    results: dict[str, list] = {split: [] for split in SPLITS}
    for split, index, objects in _run_tasks(tasks, state, num_workers):
        results[split].append((index, objects))

    for split in SPLITS:
        _write_annotations(out_dir / "annotations" / f"instances_{split}.json", split, results[split], params)


def _run_tasks(tasks: list, state: tuple, num_workers: int) -> Iterator[tuple[str, int, list]]:
    """Render every ``(split, index)`` task in-process or in a pool; yields results in task order."""
    if num_workers <= 1:
        _init_worker(*state)
        try:
            yield from map(_render_and_save, tasks)
        finally:
            _WORKER_STATE.clear()
        return
    # fork shares the loaded digits with the workers for free; elsewhere the initializer pickles them once.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    with multiprocessing.get_context(method).Pool(num_workers, initializer=_init_worker, initargs=state) as pool:
        yield from pool.imap(_render_and_save, tasks, chunksize=64)


_WORKER_STATE: dict = {}


def _init_worker(source_images, source_labels, pools, params, out_dir) -> None:
    _WORKER_STATE.update(
        source_images=source_images, source_labels=source_labels, pools=pools, params=params, out_dir=out_dir
    )


def _render_and_save(task: tuple[str, int]) -> tuple[str, int, list]:
    """Render image ``index`` of ``split``, save its PNG, and return its annotations (without ids)."""
    split, index = task
    state = _WORKER_STATE
    rng = np.random.default_rng([state["params"]["seed"], SPLITS.index(split), index])
    image, annotations = render_image(
        rng, state["source_images"], state["source_labels"], state["pools"][split], state["params"]
    )
    Image.fromarray(image).save(Path(state["out_dir"]) / split / _file_name(index), compress_level=1)
    return split, index, annotations


def _file_name(index: int) -> str:
    return f"{index:06d}.png"


def _write_annotations(path: Path, split: str, rendered: list, params: dict) -> None:
    """Write the COCO json of one split. Image ids are ``index + 1`` and annotation ids count from 1."""
    size = params["image_size"]
    images, annotations = [], []
    for index, objects in sorted(rendered, key=lambda item: item[0]):
        image_id = index + 1
        images.append({"id": image_id, "file_name": _file_name(index), "width": size, "height": size})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **obj})
    categories = [
        {"id": label + 1, "name": name, "supercategory": "digit"} for label, name in enumerate(CATEGORY_NAMES)
    ]
    coco = {
        "info": {"description": f"assignbench {VERSION} {split}", "version": VERSION},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    path.write_text(json.dumps(coco, separators=(",", ":")))


# --------------------------------------------------------------------------------------------------------------
# Rendering one image


def render_image(
    rng: np.random.Generator, source_images: np.ndarray, source_labels: np.ndarray, pool: np.ndarray, params: dict
) -> tuple[np.ndarray, list[dict]]:
    """Draw one image.

    Args:
        rng: this image's generator.
        source_images: (N, 8, 8) float ink coverage in [0, 1].
        source_labels: (N,) int digit classes.
        pool: indices into ``source_images`` this split may use.
        params: normalised generation parameters.

    Returns:
        ``(image, objects)``: image (S, S, 3) uint8 RGB; objects a list of dicts with COCO ``bbox`` (tight
        xywh pixels), ``area``, ``category_id`` (digit + 1), ``iscrowd`` 0 and ``source_index``.
    """
    size = params["image_size"]
    canvas = _background(rng, size)  # (S, S, 3) float in [0, 1]
    for _ in range(rng.integers(0, params["max_strokes"] + 1)):
        _draw_stroke(rng, canvas)

    placed_boxes: list[np.ndarray] = []  # (4,) tight xyxy boxes already on the canvas
    objects: list[dict] = []
    num_objects = int(rng.integers(params["min_objects"], params["max_objects"] + 1))
    for attempt in range(num_objects + MAX_EXTRA_OBJECTS):
        # Objects beyond the drawn count are tried only to reach min_objects after skipped placements.
        if len(objects) == num_objects or (attempt >= num_objects and len(objects) >= params["min_objects"]):
            break
        source_index = int(rng.choice(pool))
        coverage = _resized_digit(rng, source_images[source_index], params)
        placement = _free_placement(rng, coverage, placed_boxes, params)
        if placement is None:  # no spot with little enough overlap: skip this object
            continue
        top, left, box = placement
        _paste_ink(rng, canvas, coverage, top, left)
        placed_boxes.append(box)
        x0, y0, x1, y1 = (int(v) for v in box)
        objects.append(
            {
                "category_id": int(source_labels[source_index]) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0),
                "iscrowd": 0,
                "source_index": source_index,
            }
        )
    if len(objects) < params["min_objects"]:
        raise RuntimeError(
            f"could not place {params['min_objects']} digits with IoU <= {params['max_overlap_iou']} on a "
            f"{size}px image; lower min_objects/max_size or raise max_overlap_iou"
        )

    # Sensor noise: grey (the same in the three channels), standard deviation up to 0.03.
    canvas += rng.uniform(0.0, 0.03) * rng.standard_normal((size, size, 1), dtype=np.float32)
    return (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), objects


def _free_placement(
    rng: np.random.Generator, coverage: np.ndarray, placed_boxes: list[np.ndarray], params: dict
) -> tuple[int, int, np.ndarray] | None:
    """Where to paste ``coverage`` (h, w) so its tight box overlaps no placed box by IoU > ``max_overlap_iou``.

    Returns:
        ``(top, left, box)`` with ``box`` (4,) the tight xyxy box in image pixels, or ``None`` when the
        digit has no ink (a tiny downscale can miss every inked source pixel) or ``MAX_PLACEMENT_TRIES``
        random positions all overlap too much.
    """
    local_box = tight_box(coverage)
    if local_box is None:
        return None
    size = params["image_size"]
    patch_h, patch_w = coverage.shape
    for _ in range(MAX_PLACEMENT_TRIES):
        top = int(rng.integers(0, size - patch_h + 1))
        left = int(rng.integers(0, size - patch_w + 1))
        box = np.array([left, top, left, top], dtype=float) + local_box
        if not placed_boxes or _max_iou(box, np.stack(placed_boxes)) <= params["max_overlap_iou"]:
            return top, left, box
    return None


def tight_box(coverage: np.ndarray, threshold: float = INK_THRESHOLD) -> tuple[int, int, int, int] | None:
    """Tight box of the pixels of ``coverage`` (H, W) above ``threshold``.

    Returns:
        ``(x0, y0, x1, y1)`` in pixel edges (exclusive end: the box of a single pixel (r, c) is
        ``(c, r, c + 1, r + 1)``), or ``None`` when no pixel exceeds the threshold.
    """
    inked = coverage > threshold
    rows = np.flatnonzero(inked.any(axis=1))
    cols = np.flatnonzero(inked.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _max_iou(box: np.ndarray, boxes: np.ndarray) -> float:
    """Largest IoU of one xyxy ``box`` (4,) with ``boxes`` (K, 4)."""
    width = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    intersection = width * height
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = (box[2] - box[0]) * (box[3] - box[1]) + areas - intersection
    return float((intersection / union).max())


def _bilinear_matrix(out_len: int, in_len: int) -> np.ndarray:
    """(out_len, in_len) matrix of bilinear weights, half-pixel-centre convention (as PIL and OpenCV)."""
    centres = np.clip((np.arange(out_len) + 0.5) * in_len / out_len - 0.5, 0, in_len - 1)
    lower = np.floor(centres).astype(int)
    upper = np.minimum(lower + 1, in_len - 1)
    frac = centres - lower
    weights = np.zeros((out_len, in_len))
    weights[np.arange(out_len), lower] += 1 - frac
    weights[np.arange(out_len), upper] += frac
    return weights


def _resized_digit(rng: np.random.Generator, digit: np.ndarray, params: dict) -> np.ndarray:
    """Resize an (8, 8) coverage map to (h, w) pixels with bilinear interpolation.

    The box side ``sqrt(w * h)`` is log-uniform in [min_size, max_size] and the aspect ``w / h`` log-uniform in
    [min_aspect, max_aspect]; sides are rounded to whole pixels (at least 2) and capped at the image size.
    """
    side = np.exp(rng.uniform(np.log(params["min_size"]), np.log(params["max_size"])))
    aspect = np.exp(rng.uniform(np.log(params["min_aspect"]), np.log(params["max_aspect"])))
    width = int(np.clip(round(side * np.sqrt(aspect)), 2, params["image_size"]))
    height = int(np.clip(round(side / np.sqrt(aspect)), 2, params["image_size"]))
    resized = _bilinear_matrix(height, 8) @ digit @ _bilinear_matrix(width, 8).T
    return np.clip(resized, 0.0, 1.0)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(S, S, 3) float32 RGB in [0, 1]: a linear gradient between two random colours in a random direction."""
    start, end = rng.uniform(0.0, 1.0, (2, 3)).astype(np.float32)
    angle = np.float32(rng.uniform(0.0, 2.0 * np.pi))
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    ramp = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]  # (S, S)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    return start + (end - start) * ramp[..., None]


def _ink_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """(3,) RGB ink of a random hue: dark on a light background, light on a dark one, so it stays visible."""
    hue = rng.uniform(0.0, 1.0, 3)
    strength = rng.uniform(0.05, 0.45)
    luminance = float(background.reshape(-1, 3).mean(axis=0) @ np.array([0.299, 0.587, 0.114]))
    return hue * strength if luminance > 0.5 else 1.0 - (1.0 - hue) * strength


def _blend(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray, top: int, left: int) -> None:
    """Alpha-blend ``colour`` (3,) into ``canvas`` in place where ``alpha`` (h, w) in [0, 1] covers it."""
    height, width = alpha.shape
    region = canvas[top : top + height, left : left + width]
    region += alpha[..., None] * (colour - region)


def _paste_ink(rng: np.random.Generator, canvas: np.ndarray, coverage: np.ndarray, top: int, left: int) -> None:
    """Paste a digit's ink with a random tint and contrast (opacity in [0.6, 1]) onto the canvas.

    Alpha is zero wherever coverage <= ``INK_THRESHOLD``, so the ink lies exactly inside ``tight_box(coverage)``.
    """
    height, width = coverage.shape
    colour = _ink_colour(rng, canvas[top : top + height, left : left + width])
    ink = np.clip((coverage - INK_THRESHOLD) / (INK_SOLID - INK_THRESHOLD), 0.0, 1.0)
    _blend(canvas, ink * rng.uniform(0.6, 1.0), colour, top, left)


def _draw_stroke(rng: np.random.Generator, canvas: np.ndarray, supersample: int = 2) -> None:
    """Draw one distractor stroke (a thick line segment or arc, 1-5 px wide) in an ink colour, in place.

    PIL rasterises the stroke at ``supersample`` times the resolution; a box filter brings it back down
    antialiased.
    """
    size = canvas.shape[0]
    big = size * supersample
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    width = max(1, int(round(rng.uniform(1.0, 5.0) * supersample)))
    if rng.uniform() < 0.5:
        start, end = rng.uniform(0, big, (2, 2))
        draw.line([tuple(start), tuple(end)], fill=255, width=width)
    else:
        centre = rng.uniform(0, big, 2)
        radius = rng.uniform(0.05, 0.3) * big
        first = rng.uniform(0.0, 360.0)
        draw.arc(
            [*(centre - radius), *(centre + radius)], first, first + rng.uniform(90.0, 330.0), fill=255, width=width
        )
    small = mask.resize((size, size), Image.BOX)
    bounds = small.getbbox()  # (left, top, right, bottom) of the nonzero pixels; None when off the canvas
    if bounds is None:
        return
    left, top = bounds[:2]
    alpha = np.asarray(small.crop(bounds), dtype=np.float32) / 255.0
    colour = _ink_colour(rng, canvas[top : bounds[3], left : bounds[2]])
    _blend(canvas, alpha * rng.uniform(0.6, 1.0), colour, top, left)
