"""The data-set layout checks and the PyTorch loader, on real JPEGs."""

import logging
import shutil

import pytest
import torch

from flowers_dist.config import DataConfig
from flowers_dist.data import DataError, Placement, build_loader, scan_dataset, scan_split
from flowers_dist.data.contract import eval_shard, train_shard

from conftest import SAMPLE

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
    loader = build_loader(DataConfig(loader="torch", image_size=32), split, train=False, batch_per_rank=4, placement=CPU, seed=0)
    with caplog.at_level(logging.WARNING):
        seen = sum(labels.numel() for _, labels in loader)
    assert seen == len(split) - 2
    skipped = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(skipped) == 2 and any("zz_truncated.jpg" in m for m in skipped)


def test_torch_loader_honours_the_contract():
    split = scan_split(SAMPLE / "val")
    cfg = DataConfig(loader="torch", image_size=48)
    loader = build_loader(cfg, split, train=False, batch_per_rank=5, placement=CPU, seed=0)
    images, labels = next(iter(loader))
    assert images.shape == (5, 3, 48, 48) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert -3 < images.mean() < 3 and images.min() < 0 < images.max()  # normalised, not 0..255
    cl = Placement(rank=0, world_size=1, device=torch.device("cpu"), channels_last=True, dtype=torch.bfloat16)
    images, _ = next(iter(build_loader(cfg, split, train=False, batch_per_rank=5, placement=cl, seed=0)))
    assert images.dtype == torch.bfloat16 and images.is_contiguous(memory_format=torch.channels_last)


def test_training_augmentation_depends_only_on_seed_epoch_and_file():
    split = scan_split(SAMPLE / "train")
    cfg = DataConfig(loader="torch", image_size=32, rotation=10, color_jitter=0.2)
    def first_batch(epoch, workers):
        p = Placement(rank=0, world_size=1, device=torch.device("cpu"), workers=workers)
        loader = build_loader(cfg, split, train=True, batch_per_rank=4, placement=p, seed=3)
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
