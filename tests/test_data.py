"""The data-set layout checks and the PyTorch loader, on real JPEGs."""

import logging
import shutil

import pytest
import torch
from conftest import SAMPLE, indexed

from flowers_dist.config import DataConfig
from flowers_dist.data import DataError, Placement, build_loader, scan_dataset, scan_split
from flowers_dist.data.contract import eval_shard, train_shard

CPU = Placement(rank=0, world_size=1, device=torch.device("cpu"))


def test_classes_are_sorted_and_labels_follow_them():
    train, val = scan_dataset(SAMPLE)
    assert list(train.classes) == ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    for path, label in zip(val.files, val.labels):
        assert path.parent.name == val.classes[label]


def test_empty_class_folder_and_missing_split_are_clear_errors(tmp_path):
    shutil.copytree(SAMPLE, tmp_path / "d")
    for f in (tmp_path / "d" / "train" / "roses").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"train/roses holds no images"):
        scan_dataset(tmp_path / "d")
    shutil.rmtree(tmp_path / "d" / "val")
    with pytest.raises(DataError, match=r"val does not exist"):
        scan_split(tmp_path / "d" / "val")
    with pytest.raises(DataError, match="data fetch"):
        scan_dataset(tmp_path / "nowhere")


def test_corrupt_jpeg_is_skipped_and_logged(tmp_path, caplog):
    shutil.copytree(SAMPLE / "val", tmp_path / "val")
    good = next((tmp_path / "val" / "daisy").iterdir())
    (tmp_path / "val" / "daisy" / "zz_truncated.jpg").write_bytes(good.read_bytes()[:300])
    (tmp_path / "val" / "daisy" / "zz_not_a_jpeg.jpg").write_bytes(b"this is not an image")
    split = scan_split(tmp_path / "val")
    loader = build_loader(
        DataConfig(loader="torch", image_size=32), split, train=False, batch_size=4, placement=CPU, seed=0
    )
    with caplog.at_level(logging.WARNING):
        seen = sum(labels.numel() for _, labels in loader)
    assert seen == len(split) - 2
    skipped = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(skipped) == 2 and any("zz_truncated.jpg" in m for m in skipped)


def test_torch_loader_honours_the_contract():
    split = scan_split(SAMPLE / "val")
    cfg = DataConfig(loader="torch", image_size=48)
    loader = build_loader(cfg, split, train=False, batch_size=5, placement=CPU, seed=0)
    images, labels = next(iter(loader))
    assert images.shape == (5, 3, 48, 48) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert -3 < images.mean() < 3 and images.min() < 0 < images.max()  # normalised, not 0..255
    cl = Placement(rank=0, world_size=1, device=torch.device("cpu"), channels_last=True, dtype=torch.bfloat16)
    images, _ = next(iter(build_loader(cfg, split, train=False, batch_size=5, placement=cl, seed=0)))
    assert images.dtype == torch.bfloat16 and images.is_contiguous(memory_format=torch.channels_last)


def test_training_augmentation_depends_only_on_seed_epoch_and_file():
    split = scan_split(SAMPLE / "train")
    cfg = DataConfig(loader="torch", image_size=32, rotation=10, color_jitter=0.2)

    def first_batch(epoch, workers):
        p = Placement(rank=0, world_size=1, device=torch.device("cpu"), workers=workers)
        loader = build_loader(cfg, split, train=True, batch_size=4, placement=p, seed=3)
        loader.set_epoch(epoch)
        return next(iter(loader))

    a, b, c = first_batch(1, 0), first_batch(1, 2), first_batch(2, 0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_train_equal_steps_and_eval_exactly_once(world):
    n, batch = 23, 2
    train = [train_shard(n, batch, r, world, seed=5, epoch=4) for r in range(world)]
    assert len({len(b) for b in train}) == 1 and len(train[0]) == n // (batch * world)
    flat = [i for shard in train for b in shard for i in b]
    assert len(flat) == len(set(flat)) and all(len(b) == batch for s in train for b in s)
    evals = [i for r in range(world) for b in eval_shard(n, 4, r, world) for i in b]
    assert sorted(evals) == list(range(n))


@pytest.mark.parametrize("n,batch,world", [(24, 2, 3), (24, 4, 2), (8, 8, 1)])
def test_train_shard_keeps_the_last_full_global_batch(n, batch, world):
    # n a multiple of the global batch: every file is trained on, none dropped.
    train = [train_shard(n, batch, r, world, seed=1, epoch=0) for r in range(world)]
    assert all(len(shard) == n // (batch * world) for shard in train)
    assert sorted(i for shard in train for b in shard for i in b) == list(range(n))


@pytest.mark.parametrize("train", [True, False])
def test_torch_loader_length_is_counted_without_making_the_epoch(train):
    split = scan_split(SAMPLE / "train")  # 40 files
    for world, batch, max_steps, accum in [
        (1, 8, 0, 1),
        (2, 3, 0, 1),
        (3, 4, 0, 1),
        (3, 5, 2, 1),
        (4, 7, 0, 1),
        (1, 3, 0, 3),
        (2, 2, 5, 2),
    ]:
        for rank in range(world):
            p = Placement(rank=rank, world_size=world, device=torch.device("cpu"))
            loader = build_loader(
                DataConfig(loader="torch", image_size=16),
                split,
                train=train,
                batch_size=batch,
                placement=p,
                seed=1,
                max_steps=max_steps if train else 0,
                accum=accum if train else 1,
            )
            made = []
            make = loader.batches.make
            loader.batches.make = lambda epoch, made=made, make=make: made.append(epoch) or make(epoch)
            for epoch in range(3):
                loader.set_epoch(epoch)
                assert len(loader) == len(make(epoch)), (world, batch, rank, epoch)
            assert made == [], "len() made (shuffled) the epoch's batches"
            assert loader.kind == "torch"


def test_global_batch_of_each_step_is_the_same_at_any_world_size():
    # The first half of world-size invariance: step k's global batch holds the same files, augmented
    # identically, whether one process loads it or 2 or 4 each load a slice, with or without gradient
    # accumulation (labels = file indices here). Its micro-batches, the groups BatchNorm normalises
    # over without sync_bn, are the same whenever processes x accumulation steps is.
    split = indexed(scan_split(SAMPLE / "train"))
    cfg = DataConfig(loader="torch", image_size=32, rotation=10, color_jitter=0.2)
    global_batch, epoch, steps = 8, 3, 2

    def global_batches(world, accum):
        micro = global_batch // (world * accum)
        per_rank = []
        for rank in range(world):
            p = Placement(rank=rank, world_size=world, device=torch.device("cpu"))
            loader = build_loader(cfg, split, train=True, batch_size=micro, placement=p, seed=11, accum=accum)
            loader.set_epoch(epoch)
            assert len(loader) == len(split) // global_batch * accum
            per_rank.append([batch for _, batch in zip(range(steps * accum), loader)])
        out, groups = [], []
        for k in range(steps):  # each step: file index -> its augmented image, over all ranks and micro-batches
            micro_batches = [per_rank[r][k * accum + j] for r in range(world) for j in range(accum)]
            images = torch.cat([b[0] for b in micro_batches])
            files = torch.cat([b[1] for b in micro_batches]).tolist()
            assert len(files) == len(set(files)) == global_batch
            out.append(dict(zip(files, images)))
            groups.append({frozenset(b[1].tolist()) for b in micro_batches})
        return out, groups

    one, _ = global_batches(1, 1)
    assert set(one[0]) != set(one[1])
    groups_by_slices = {}
    for world, accum in [(2, 1), (4, 1), (1, 2), (2, 2), (1, 4), (4, 2)]:
        many, groups = global_batches(world, accum)
        for k in range(steps):
            assert set(many[k]) == set(one[k]), f"step {k}: different files on {world} processes x {accum}"
            assert all(torch.equal(many[k][f], one[k][f]) for f in one[k]), f"step {k}: different augmentation"
        groups_by_slices.setdefault(world * accum, []).append(groups)
    for slices, seen in groups_by_slices.items():
        assert all(g == seen[0] for g in seen), f"BatchNorm groups differ among splits into {slices} micro-batches"
