"""Device-resident training batches (experiments/data/resident.py) against the DataLoader path they replace."""

import json

import pytest
import torch

from experiments.build import Budget, build_train_loader, infinite_batches
from experiments.data import CocoDetection, DatasetError, build_dataset, collate
from experiments.data.resident import ResidentBatches, index_loader
from experiments.distributed import DistInfo
from tests.experiments.test_coco_dataset import write_coco
from tests.experiments.test_engine import read_stats, tiny_cfg

ONE_PROCESS = DistInfo(rank=0, local_rank=0, world_size=1)


@pytest.fixture(scope="module")
def digits_train(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    params = {"image_size": 96, "num_train": 20, "num_val": 4, "num_workers": 0}
    return lambda flip_prob: build_dataset("digits", "train", root=root, train=True, min_size=96, max_size=96,
                                           flip_prob=flip_prob, digits_params=params)


def loader_batches(dataset, batch, seed, epochs_seed):
    generator = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=0, drop_last=True,
                                         generator=generator, collate_fn=lambda b: collate(b, size_divisibility=64))
    return infinite_batches(loader, epochs_seed)


def resident_batches(dataset, batch, seed, epochs_seed):
    generator = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    resident = ResidentBatches(dataset, index_loader(len(dataset), batch, sampler, generator), torch.device("cpu"),
                               size_divisibility=64, flip_seed=5)
    return infinite_batches(resident, epochs_seed)


def assert_same_batch(ours, theirs):
    (images, targets), (ref_images, ref_targets) = ours, theirs
    assert images.dtype == ref_images.dtype and torch.equal(images, ref_images)
    assert [t["image_id"] for t in targets] == [t["image_id"] for t in ref_targets]
    for t, r in zip(targets, ref_targets):
        for key in ("boxes", "labels", "crowd_boxes"):
            assert torch.equal(t[key], r[key]), key
        assert (t["size"], t["orig_size"], t["scale"]) == (r["size"], r["orig_size"], r["scale"])


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_batches_equal_the_dataloaders_over_several_epochs(digits_train, flip_prob):
    # With flips never or always drawn, both paths are deterministic: same order (the sampler's generator,
    # reseeded per epoch), same pixels (load_resized), same padding (96 -> 128 at size_divisibility 64).
    dataset = digits_train(flip_prob)
    ours, theirs = resident_batches(dataset, 6, 3, 11), loader_batches(dataset, 6, 3, 11)
    for _ in range(3 * (len(dataset) // 6)):  # three epochs of 3 batches (drop_last)
        a, b = next(ours), next(theirs)
        assert a[0].shape == (6, 3, 128, 128)
        assert_same_batch(a, b)


def test_random_flips_mirror_image_and_boxes_together(digits_train):
    dataset = digits_train(0.5)
    plain = {t["image_id"]: (img, t) for img, t in (dataset.load_resized(i) for i in range(len(dataset)))}
    batches = resident_batches(dataset, 5, 0, 0)
    flipped = kept = 0
    for _ in range(12):
        images, targets = next(batches)
        for image, target in zip(images, targets):
            pixels, ref = plain[target["image_id"]]
            as_float = pixels.float() / 255.0
            if torch.equal(image[:, :96, :96], as_float.flip(-1)):
                flipped += 1
                expected = torch.stack([96 - ref["boxes"][:, 2], ref["boxes"][:, 1], 96 - ref["boxes"][:, 0],
                                        ref["boxes"][:, 3]], dim=1)
            else:
                assert torch.equal(image[:, :96, :96], as_float)
                kept += 1
                expected = ref["boxes"]
            assert torch.equal(target["boxes"], expected)
            assert image[:, 96:, :].abs().sum() == 0 and image[:, :, 96:].abs().sum() == 0  # zero padding
    # 60 draws at p = 0.5: both outcomes occur (each fails to with probability 2^-60)
    assert flipped > 0 and kept > 0


def test_one_size_is_required_and_the_error_names_the_image(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 40, "height": 20},
              {"id": 2, "file_name": "b.png", "width": 30, "height": 20}]
    image_dir, ann_file = write_coco(tmp_path, [{"bbox": [1, 1, 5, 5], "category_id": 3}], images=images)
    dataset = CocoDetection(image_dir, ann_file, train=True, min_size=20, max_size=100)
    indices = index_loader(2, 1, torch.utils.data.SequentialSampler(range(2)), None)
    with pytest.raises(DatasetError, match=r"instances_tiny.json.*image id 2 is 20x30 but image id 1 is 20x40"):
        ResidentBatches(dataset, indices, torch.device("cpu"), 32, 0)
    multi = CocoDetection(image_dir, ann_file, train=True, min_size=[20, 30], max_size=100)
    with pytest.raises(DatasetError, match="one training min_size"):
        ResidentBatches(multi, indices, torch.device("cpu"), 32, 0)


def test_build_train_loader_picks_the_resident_path(tmp_path):
    cfg, _ = tiny_cfg(tmp_path, "data.resident=true")
    train_set = build_dataset("digits", "train", root=tmp_path / "data", train=True, min_size=96, max_size=96,
                              digits_params={"image_size": 96, "num_train": 24, "num_val": 6})
    budget = Budget(total_batch=4, local_batch=4, iters=4, eval_iters=frozenset({4}))
    loader = build_train_loader(train_set, cfg, budget, ONE_PROCESS, 0, size_divisibility=32)
    assert isinstance(loader, ResidentBatches) and loader.pixels.shape == (24, 3, 96, 96)


@pytest.mark.slow
def test_a_resident_run_trains_exactly_as_the_dataloader_run(tmp_path):
    # No flips and no data workers: the two paths feed identical batches, so the runs are identical.
    from experiments.train import execute, run_dir_of

    metrics = {}
    for resident in ("false", "true"):
        cfg, ov = tiny_cfg(tmp_path / resident, "data.flip_prob=0.0", f"data.resident={resident}",
                           "eval.curve_fractions=[1.0]", "inference.score_thresh=0.001")
        metrics[resident] = execute(cfg, ov, raise_on_failure=True)
        metrics[resident]["stats"] = [{k: v for k, v in row.items() if k not in ("assign_ms",)}
                                      for row in read_stats(run_dir_of(cfg))]
        metrics[resident]["detections"] = json.loads((run_dir_of(cfg) / "detections.json").read_text())
    a, b = metrics["false"], metrics["true"]
    assert a["detections"] and a["detections"] == b["detections"]
    assert a["AP"] == b["AP"] and a["stats"] == b["stats"]
