"""Both loaders on a packed data set (`data pack`): the same batches as the folder, coverage, records and resumes."""

import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE, TINY, cli, last_checkpoint

from flowers_dist import checkpoint_file
from flowers_dist.checkpointing import CheckpointManager, Position, world_change_note
from flowers_dist.config import DataConfig, TrainConfig
from flowers_dist.data import Placement, build_loader, scan_dataset, shards
from flowers_dist.data.audit import read_samples, write_samples
from flowers_dist.data.contract import carried_state, rest_of_epoch
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
            max_steps=max_steps,
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
        loader = build_loader(cfg, train, train=True, batch_size=4, placement=_cpu(r, 2), seed=5)
        loader.set_epoch(1)
        for _, (_, _) in zip(range(2), loader):
            pass
        stopped += loader.trained()
    resumed = build_loader(cfg, train, train=True, batch_size=8, placement=_cpu(0, 1), seed=5)
    resumed.set_epoch(1, skip=2)
    list(resumed)
    whole = build_loader(cfg, train, train=True, batch_size=8, placement=_cpu(0, 1), seed=5)
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


_R0, _R1 = {"reader": "dali-r0", "trained": ["a", "b"]}, {"reader": "dali-r1", "trained": ["c"]}


@pytest.mark.parametrize(
    "saved_world,states,step,carried,note",
    [
        (2, [_R0, _R1], 6, {"reader": None, "trained": ["a", "b", "c"]}, "note: "),  # onto 1: the rest, exactly
        (2, ["dali-r0", "dali-r1"], 6, None, "warning: "),  # an older checkpoint names no samples: said
        (2, [None, None], 6, None, None),  # the PyTorch loader: exact anywhere
        (2, [_R0, _R1], 0, None, None),  # an epoch boundary: nothing to repeat or skip
        (1, [_R0], 6, _R0, None),  # same world: the reader state is carried
        (1, ["dali-r0"], 6, "dali-r0", None),  # ... in the older format, too
        (1, [{"reader": None, "trained": ["a"]}], 6, {"reader": None, "trained": ["a"]}, None),  # saved in a rest
    ],
)
def test_a_resume_carries_the_reader_or_what_every_rank_trained(tmp_path, saved_world, states, step, carried, note):
    manager = CheckpointManager(tmp_path, TrainConfig(), is_main=True)
    model = torch.nn.Linear(2, 2)
    progress = manager.restore(_state(saved_world, states, step), model, torch.optim.SGD(model.parameters(), 0.1), 0, 1)
    assert progress.loader_state == carried
    assert progress.note == (world_change_note(saved_world, 1, Position(1, step), carried) if note else None)
    if note:
        assert progress.note.startswith(note) and "from a 2-process DALI checkpoint at epoch 2 step 6" in progress.note
    if note == "note: ":
        assert "the 3 samples its ranks trained are not trained again" in progress.note


def test_the_rest_of_an_epoch_is_the_untrained_samples_in_the_same_global_batches_at_any_world_size():
    names = [f"s{i:03d}" for i in range(50)]
    trained = set(names[::3])  # 17 samples, as a 2-process DALI reader may have handed them out
    steps_left = 3  # of 8-sample global batches: 24 of the 33 left
    global_batches = {}
    for world, micro, accum in [(1, 8, 1), (2, 4, 1), (4, 2, 1), (2, 2, 2)]:
        ranks = [rest_of_epoch(names, trained, steps_left, micro, r, world, 7, 2, accum) for r in range(world)]
        assert all(len(batches) == steps_left * accum for batches in ranks)
        steps = [sorted(i for r in ranks for b in r[s * accum : (s + 1) * accum] for i in b) for s in range(steps_left)]
        global_batches[(world, micro, accum)] = steps
        flat = [names[i] for step in steps for i in step]
        assert len(flat) == len(set(flat)) == 24 and not set(flat) & trained
    assert len({str(v) for v in global_batches.values()}) == 1  # the same global batches at every world size
    with pytest.raises(ValueError, match="leave fewer than 5 optimizer steps"):
        rest_of_epoch(names, trained, 5, 8, 0, 1, 7, 2)


def _dali_train(split, rank: int, world: int, micro: int, state=None):
    cfg = DataConfig(image_size=16, loader="dali", num_workers=1)
    return build_loader(
        cfg, split, train=True, batch_size=micro, placement=_cpu(rank, world), seed=0, resume_state=state
    )


@pytest.mark.parametrize("world", [1, 4])
def test_dali_resumed_mid_epoch_on_another_world_size_trains_exactly_the_rest(packed, world):
    """2 processes stop after 2 of 5 steps; on 1 or 4 the epoch's records hold 40 distinct samples, the next epoch too."""
    pytest.importorskip("nvidia.dali")
    train, _, _ = usable_splits(DataConfig(root=str(packed)))
    label_of = {m.key: m.label for m in train.members}
    states, before = [], []
    for r in range(2):
        loader = _dali_train(train, r, 2, 4)
        loader.set_epoch(0)
        list(loader)
        loader.set_epoch(1)
        for _ in zip(range(2), loader):
            pass
        states.append(loader.resume_state())
        before += loader.trained()
    assert len(before) == len(set(before)) == 16 and sum(len(s["trained"]) for s in states) == 16
    carried = [carried_state(states, 2, world, r) for r in range(world)]
    assert all(c == {"reader": None, "trained": sorted(before)} for c in carried)
    after, next_epoch = [], []
    for r in range(world):
        loader = _dali_train(train, r, world, 8 // world, carried[r])
        loader.set_epoch(1, skip=2)
        labels = [lab.tolist() for _, lab in loader]
        assert len(labels) == 3 and [label_of[k] for k in loader.trained()] == sum(labels, [])
        after += loader.trained()
        loader.set_epoch(2)  # the reader's turn: a full epoch at the new world size
        assert len(list(loader)) == 5
        next_epoch += loader.trained()
    assert len(after) == len(set(after)) == 24 and not set(after) & set(before)
    assert len(next_epoch) == len(set(next_epoch)) == 40


def test_dali_saved_while_training_the_rest_resumes_on_yet_another_world_size_exactly(packed):
    """2 -> 1 (stopped again after 1 more step) -> 2: the epoch's 40 samples, each once."""
    pytest.importorskip("nvidia.dali")
    train, _, _ = usable_splits(DataConfig(root=str(packed)))
    first = [_dali_train(train, r, 2, 4) for r in range(2)]
    for loader in first:
        loader.set_epoch(0)
        for _ in zip(range(2), loader):
            pass
    seen = sum((loader.trained() for loader in first), [])
    one = _dali_train(train, 0, 1, 8, carried_state([x.resume_state() for x in first], 2, 1, 0))
    one.set_epoch(0, skip=2)
    for _ in zip(range(1), one):
        pass
    seen += one.trained()
    saved = [one.resume_state()]
    assert saved[0]["reader"] is None and len(saved[0]["trained"]) == 24  # the 16 carried and its own 8
    for r in range(2):
        loader = _dali_train(train, r, 2, 4, carried_state(saved, 1, 2, r))
        loader.set_epoch(0, skip=3)
        list(loader)
        seen += loader.trained()
    assert len(seen) == len(set(seen)) == 40


def _dali_epoch(split, world: int, batch: int, train: bool, epoch: int):
    pytest.importorskip("nvidia.dali")
    cfg = DataConfig(image_size=16, loader="dali", num_workers=1)
    out = []
    for r in range(world):
        loader = build_loader(cfg, split, train=train, batch_size=batch, placement=_cpu(r, world), seed=0)
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
        return build_loader(cfg, train, train=True, batch_size=4, placement=_cpu(), seed=0, resume_state=state)

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


TOL = 2e-3  # the world-size tolerance: test_world_size_invariance.py says why


def _rank_records(run: Path, epoch: int) -> dict[tuple[int, int], list[str]]:
    """{(rank, from step): samples} of one epoch's audit records, in the order trained."""
    out = {}
    for path in (run / "samples").glob(f"epoch-{epoch:03d}.rank-*.txt"):
        _, rank, first = path.stem.split(".")
        out[(int(rank.split("-")[1]), int(first.split("-")[1]))] = path.read_text().split()
    return out


def _stopped_copy(full: Path, to: Path, global_step: int, epoch: int) -> None:
    """`full`'s run folder as it stood when stopped after `global_step`: its checkpoint of that step is the newest."""
    shutil.copytree(full, to)
    for ckpt in (to / "checkpoints").iterdir():
        step = re.fullmatch(r"step-(\d+)\.pt", ckpt.name)
        if not step or int(step.group(1)) > global_step:
            ckpt.unlink()
    for record in (to / "samples").glob(f"epoch-{epoch:03d}.*"):
        record.unlink()


@pytest.mark.e2e
@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_a_two_process_run_resumed_mid_epoch_on_one_and_on_four_trains_exactly_the_rest(packed, tmp_path, loader):
    """Stopped at step 2 of 5 of the first epoch on 2 processes; resumed from that checkpoint on 1 and on 4 processes.

    The audit records of the resumed epoch hold each of its 40 samples once: the 16 trained before the stop
    and 24 after, none of them again. The PyTorch loader trains the uninterrupted run's batches, so the
    weights agree within the world-size tolerance (test_world_size_invariance.py: sync_bn over the same 8
    images at every world size); DALI trains the rest in the global order with its own per-rank augmentation
    draws, the same distribution as the uninterrupted run but not its draws (docs/data.md).
    """
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    run = ["train", "--config", "configs/quickstart.yaml", *TINY, "model.name=test_resnet", "model.sync_bn=on",
           f"data.root={packed}", f"data.loader={loader}", "train.epochs=1", "train.record_samples=true",
           "train.checkpoint_every_steps=1", "train.keep_checkpoints=10", "optim.lr=0.01", "train.seed=3",
           f"train.output_dir={tmp_path}"]  # fmt: skip
    cli([*run, "train.name=full"], nprocs=2)
    whole = _rank_records(tmp_path / "full", 0)
    before = sum((samples[:8] for samples in whole.values()), [])  # each rank's first 2 steps of 4
    for world in (1, 4):
        _stopped_copy(tmp_path / "full", tmp_path / f"on{world}", global_step=2, epoch=0)
        out = cli([*run, f"train.name=on{world}"], nprocs=world).stdout
        resumed = _rank_records(tmp_path / f"on{world}", 0)
        assert sorted(resumed) == [(r, 2) for r in range(world)]
        after = sum(resumed.values(), [])
        assert len(after) == len(set(after)) == 24 and not set(after) & set(before)
        if loader == "torch":
            assert sorted(after) == sorted(sum((samples[8:] for samples in whole.values()), []))
            assert "DALI" not in out
            full, part = (last_checkpoint(tmp_path / name)["model"] for name in ("full", f"on{world}"))
            names = [n for n in full if n.endswith(("weight", "bias"))]
            a, b = (torch.cat([s[n].double().flatten() for n in names]) for s in (full, part))
            at_stop = checkpoint_file.load(tmp_path / f"on{world}" / "checkpoints" / "step-00000002.pt")["model"]
            moved = (a - torch.cat([at_stop[n].double().flatten() for n in names])).norm()  # since the resume
            print(f"{world} process(es): {(a - b).norm() / moved:.2e}")
            assert (a - b).norm() / moved < TOL, f"{world} process(es): {(a - b).norm() / moved:.2e}"
        else:
            assert f"resumed on {world} process(es) from a 2-process DALI checkpoint at epoch 1 step 2" in out
            assert "the 16 samples its ranks trained are not trained again" in out
