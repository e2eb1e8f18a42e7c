"""Both loaders on a packed data set (`data pack`): the same batches as the folder, coverage, records and resumes."""

from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE, TINY, cli

from flowers_dist.checkpointing import CheckpointManager, Position, world_change_note
from flowers_dist.config import DataConfig, TrainConfig
from flowers_dist.data import Placement, build_loader, scan_dataset, shards
from flowers_dist.data.audit import read_samples, write_samples
from flowers_dist.data.pack import pack
from flowers_dist.data.usable import usable_splits


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pack") / "flowers_sample"
    pack(SAMPLE, out, shard_mb=0.3)  # several shards per split
    return out


def _cpu(rank: int = 0, world: int = 1) -> Placement:
    return Placement(rank=rank, world_size=world, device=torch.device("cpu"), workers=0)


def _by_source(split) -> list[str]:
    """Each sample of a split named by its source file relative to the data set root (train/daisy/x.jpg)."""
    if split.packed:
        return [m.source for m in split.members]
    return [f"{split.root.name}/{split.name(i)}" for i in range(len(split))]


def _global_steps(split, kind: str, world: int, epoch: int, micro: int, accum: int = 1, max_steps: int = 0):
    """The samples of each global step (as sources), over `world` simulated ranks, as the loader records them."""
    cfg = DataConfig(image_size=16, loader=kind, num_workers=0)
    names = dict(zip([split.name(i) for i in range(len(split))], _by_source(split)))
    per_rank = []
    for r in range(world):
        loader = build_loader(
            cfg, split, train=True, batch_size=micro, placement=_cpu(r, world), seed=3, accum=accum,
            max_steps=max_steps, record=True,
        )  # fmt: skip
        loader.set_epoch(epoch)
        labels = [lab.tolist() for _, lab in loader]
        keys = loader.trained()
        assert [split.labels[[split.name(i) for i in range(len(split))].index(k)] for k in keys] == sum(labels, [])
        per_rank.append([names[k] for k in keys])
    step = micro * accum
    return [sorted(sum((r[s : s + step] for r in per_rank), [])) for s in range(0, len(per_rank[0]), step)]


def test_a_pack_reads_as_the_folder_it_was_packed_from(packed):
    train, val, skipped = usable_splits(DataConfig(root=str(packed)))
    folder_train, folder_val = scan_dataset(SAMPLE)
    assert train.packed and val.packed and train.classes == folder_train.classes
    assert _by_source(train) == _by_source(folder_train) and train.labels == folder_train.labels
    assert _by_source(val) == _by_source(folder_val)
    assert skipped.record()["packed_from"] == str(SAMPLE.resolve()) and skipped.count == 0
    assert "packed data set" in skipped.line()
    # The PyTorch loader decodes a pack's bytes to the pixels of the file they came from.
    cfg = DataConfig(image_size=16, loader="torch", num_workers=0)
    a = list(build_loader(cfg, val, train=False, batch_size=8, placement=_cpu(), seed=0))
    b = list(build_loader(cfg, folder_val, train=False, batch_size=8, placement=_cpu(), seed=0))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("world,micro,accum", [(1, 8, 1), (2, 4, 1), (2, 2, 2)])
def test_torch_on_shards_trains_the_folders_global_batches_at_any_world_size(packed, world, micro, accum):
    train, _, _ = usable_splits(DataConfig(root=str(packed)))
    folder, _ = scan_dataset(SAMPLE)
    for epoch in (0, 1):
        want = _global_steps(folder, "torch", 1, epoch, 8)
        got = _global_steps(train, "torch", world, epoch, micro, accum)
        assert got == want and len(want) == len(train) // 8
        assert max(Counter(sum(got, [])).values()) == 1


def test_a_mid_epoch_resume_on_another_world_size_trains_exactly_the_rest(packed):
    """Stopped after 2 of 5 steps on 2 processes, resumed on 1: the records cover the epoch's full batches once."""
    train, _, _ = usable_splits(DataConfig(root=str(packed)))
    cfg = DataConfig(image_size=16, loader="torch", num_workers=0)
    stopped = []
    for r in range(2):
        loader = build_loader(cfg, train, train=True, batch_size=4, placement=_cpu(r, 2), seed=5, record=True)
        loader.set_epoch(1)
        for _, (_, _) in zip(range(2), loader):
            pass
        stopped += loader.trained()
    resumed = build_loader(cfg, train, train=True, batch_size=8, placement=_cpu(0, 1), seed=5, record=True)
    resumed.set_epoch(1, skip=2)
    list(resumed)
    whole = build_loader(cfg, train, train=True, batch_size=8, placement=_cpu(0, 1), seed=5, record=True)
    whole.set_epoch(1)
    list(whole)
    assert len(stopped) == 16 and sorted(stopped + resumed.trained()) == sorted(whole.trained())
    assert len(whole.trained()) == 40 and len(set(whole.trained())) == 40


def test_records_are_written_whole_and_read_back_per_epoch(tmp_path):
    write_samples(tmp_path, 2, 0, 0, ["a", "b"])
    write_samples(tmp_path, 2, 1, 0, ["c"])
    write_samples(tmp_path, 2, 0, 6, ["d"])
    write_samples(tmp_path, 3, 0, 0, ["a"])
    assert read_samples(tmp_path, 2) == Counter("abcd")
    assert not [p for p in (tmp_path / "samples").iterdir() if p.name.startswith(".")]


def _state(world: int, loader_states: list, step: int) -> dict:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": None,
        "rng": __import__("flowers_dist.checkpoint_file", fromlist=["rng_state"]).rng_state(),
        "position": {"epoch": 1, "step": step},
        "best": {},
        "elapsed": 0.0,
        "world_size": world,
        "loader_states": loader_states,
        "epoch_sums": [[1.0, 1.0, 1.0]] * world,
    }


@pytest.mark.parametrize(
    "saved_world,states,step,noted",
    [
        (2, ["dali-r0", "dali-r1"], 6, True),  # DALI mid-epoch onto 1 process: said
        (2, [None, None], 6, False),  # the PyTorch loader: exact anywhere
        (2, ["dali-r0", "dali-r1"], 0, False),  # an epoch boundary: nothing to repeat or skip
        (1, ["dali-r0"], 6, False),  # same world: the reader state is carried
    ],
)
def test_a_resume_says_when_dalis_reader_state_cannot_be_carried(tmp_path, saved_world, states, step, noted):
    manager = CheckpointManager(tmp_path, TrainConfig(), is_main=True)
    model = torch.nn.Linear(2, 2)
    progress = manager.restore(_state(saved_world, states, step), model, torch.optim.SGD(model.parameters(), 0.1), 0, 1)
    assert progress.note == (world_change_note(saved_world, 1, Position(1, step)) if noted else None)
    if noted:
        assert "from a 2-process DALI checkpoint" in progress.note and "exact with data.loader=torch" in progress.note


def _dali_epoch(split, world: int, batch: int, train: bool, epoch: int):
    pytest.importorskip("nvidia.dali")
    cfg = DataConfig(image_size=16, loader="dali", num_workers=1)
    out = []
    for r in range(world):
        loader = build_loader(cfg, split, train=train, batch_size=batch, placement=_cpu(r, world), seed=0, record=True)
        loader.set_epoch(epoch)
        out.append(([b for b in loader], loader.trained()))
    return out


def test_dali_on_shards_trains_every_sample_once_per_epoch_over_two_ranks(packed):
    train, _, _ = usable_splits(DataConfig(root=str(packed)))
    label_of = {m.key: m.label for m in train.members}
    for epoch in (0, 1):
        per_rank = _dali_epoch(train, 2, 3, True, epoch)
        keys = sum((k for _, k in per_rank), [])
        labels = sum((lab.tolist() for batches, _ in per_rank for _, lab in batches), [])
        assert [label_of[k] for k in keys] == labels  # the records name what was trained
        assert len(keys) == len(train) // 6 * 6 and len(set(keys)) == len(keys)


def test_dali_val_on_shards_sees_every_sample_once_with_the_folders_pixels(packed):
    _, val, _ = usable_splits(DataConfig(root=str(packed)))
    _, folder_val = scan_dataset(SAMPLE)
    # Each rank reads a contiguous part of the pack's order (every sample once, some ranks padded out).
    for world in (1, 3):
        per_rank = _dali_epoch(val, world, 4, False, 0)
        assert sum(len(lab) for batches, _ in per_rank for _, lab in batches) == len(val)
    ((batches, _),) = _dali_epoch(val, 1, 4, False, 0)
    ((folder_batches, _),) = _dali_epoch(folder_val, 1, 4, False, 0)
    pack_order = [s.source for s in shards.samples(shards.load(packed), "val")]
    images = dict(zip(pack_order, torch.cat([im for im, _ in batches])))
    folder_images = dict(zip(_by_source(folder_val), torch.cat([im for im, _ in folder_batches])))
    assert images.keys() == folder_images.keys()
    assert all(torch.equal(images[k], folder_images[k]) for k in images)


def test_dali_cut_epochs_of_a_pack_read_the_pytorch_loaders_samples(packed):
    train, _, _ = usable_splits(DataConfig(root=str(packed)))
    want = _global_steps(train, "torch", 2, 1, 3, max_steps=2)
    assert _global_steps(train, "dali", 2, 1, 3, max_steps=2) == want


@pytest.mark.e2e
@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_a_two_process_run_on_a_pack_records_every_sample_once(packed, tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    cli(
        ["train", "--config", "configs/quickstart.yaml", *TINY, f"data.root={packed}", f"data.loader={loader}",
         "train.epochs=1", "train.record_samples=true", f"train.output_dir={tmp_path}", "train.name=r"],
        nprocs=2,
    )  # fmt: skip
    counts = read_samples(tmp_path / "r", 0)
    keys = {m.key for m in shards.split(shards.load(packed), "train").members}
    assert len(counts) == len(keys) // 8 * 8 and set(counts) <= keys and set(counts.values()) == {1}
    assert len(list((tmp_path / "r" / "samples").iterdir())) == 2  # one file per rank


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_eval_on_a_pack_counts_as_on_the_folder(packed, trained_checkpoint, loader):
    from flowers_dist.inference import run_eval

    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    on_pack = run_eval(trained_checkpoint, packed, 8, 0, "cpu", None, loader=loader)
    on_folder = run_eval(trained_checkpoint, SAMPLE, 8, 0, "cpu", None, loader=loader)
    assert on_pack.count == on_folder.count == 23
    assert on_pack.confusion == on_folder.confusion


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> Path:
    """An untrained model saved as eval reads a checkpoint (in-process: no training run needed to count)."""
    from flowers_dist import checkpoint_file
    from flowers_dist.config import Config
    from flowers_dist.model import build_model

    cfg = Config()
    cfg.model.pretrained = "none"
    cfg.model.name = "resnet18.tv_in1k"
    cfg.data.image_size = 32
    classes = list(scan_dataset(SAMPLE)[0].classes)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(classes))
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    state = {"format": checkpoint_file.FORMAT, "model": model.state_dict(), "config": cfg.to_dict(), "classes": classes}
    checkpoint_file.atomic_save(state, path)
    return path


def test_dali_on_shards_resumes_mid_epoch_exactly_from_its_reader_state(packed):
    pytest.importorskip("nvidia.dali")
    train, _, _ = usable_splits(DataConfig(root=str(packed)))
    cfg = DataConfig(image_size=16, loader="dali", num_workers=1)

    def loader(state=None):
        return build_loader(
            cfg, train, train=True, batch_size=4, placement=_cpu(), seed=0, record=True, resume_state=state
        )

    first = loader()
    first.set_epoch(0)
    list(first)
    first.set_epoch(1)
    batches = iter(first)
    next(batches), next(batches)
    state, stopped = first.resume_state(), first.trained()
    rest = [lab.tolist() for _, lab in batches]
    resumed = loader(state)
    resumed.set_epoch(1, 2)
    assert [lab.tolist() for _, lab in resumed] == rest
    assert resumed.trained() == first.trained()[len(stopped) :] and len(stopped) == 8
