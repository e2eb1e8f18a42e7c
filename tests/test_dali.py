"""The DALI loader on the CPU, on real JPEGs: sharding, parity with PyTorch, augmentation, training runs."""

import dataclasses
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from conftest import REPO, SAMPLE, SHARED_FLOWERS, cli, metrics  # noqa: E402
from conftest import indexed as _indexed

from flowers_dist.config import DataConfig  # noqa: E402
from flowers_dist.data import DataError, Placement, build_loader, scan_split  # noqa: E402
from flowers_dist.data.contract import DeviceNormalizer  # noqa: E402
from flowers_dist.data.dali import DaliLoader, build_dali_loader, train_pipeline, val_pipeline  # noqa: E402
from flowers_dist.data.torch_loader import TorchLoader, eval_transform, load_rgb  # noqa: E402


def _cpu(rank: int = 0, world: int = 1, **kw) -> Placement:
    return Placement(rank=rank, world_size=world, device=torch.device("cpu"), workers=1, **kw)


def _epoch(loaders, epoch):
    """Every simulated rank's batches of one epoch, as lists of file indices."""
    out = []
    for loader in loaders:
        loader.set_epoch(epoch)
        out.append([labels.tolist() for _, labels in loader])
    return out


def _shared_val():
    if not SHARED_FLOWERS.is_dir():
        pytest.skip(f"{SHARED_FLOWERS} is not here")
    return scan_split(SHARED_FLOWERS / "val")


# Uneven shards on purpose: 40 and 23 files over 2 and 3 ranks, batches that do not divide them.
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name,batch", [("train", 3), ("val", 4)])
def test_val_sees_every_file_once_and_train_never_twice(world, name, batch):
    split = _indexed(scan_split(SAMPLE / name))
    n = len(split)
    train = name == "train"
    cfg = DataConfig(image_size=16)
    loaders = [build_dali_loader(cfg, split, train, batch, _cpu(r, world), seed=0) for r in range(world)]
    orders = []
    for epoch in range(2):
        per_rank = _epoch(loaders, epoch)
        counts = Counter(i for batches in per_rank for b in batches for i in b)
        assert all(len(batches) == len(loaders[0]) for batches in per_rank), "ranks ran different step counts"
        if train:
            assert max(counts.values()) == 1, f"epoch {epoch}: a file came twice"
            assert len(loaders[0]) == n // (batch * world)  # as contract.train_shard
            assert all(len(b) == batch for batches in per_rank for b in batches)
        else:
            assert counts == Counter(range(n)), f"epoch {epoch}: not every file exactly once"
            assert [loader.num_samples for loader in loaders] == [sum(map(len, b)) for b in per_rank]
        orders.append([i for batches in per_rank for b in batches for i in b])
    if train:
        assert orders[0] != orders[1], "the order did not change between epochs"


# Shapes where DROP without padding (the usual recipe) repeated files within an epoch.
@pytest.mark.parametrize("n,world,batch", [(8, 2, 3), (8, 3, 1), (9, 2, 1), (16, 3, 2), (23, 3, 4), (40, 4, 3)])
def test_train_shards_stay_disjoint_for_awkward_sizes(n, world, batch):
    split = _indexed(scan_split(SAMPLE / "train"))
    split = dataclasses.replace(split, files=split.files[:n], labels=split.labels[:n])
    loaders = [
        build_dali_loader(DataConfig(image_size=16), split, True, batch, _cpu(r, world), seed=0) for r in range(world)
    ]
    for epoch in range(4):
        counts = Counter(i for batches in _epoch(loaders, epoch) for b in batches for i in b)
        assert max(counts.values()) == 1 and sum(counts.values()) == n // (batch * world) * batch * world, epoch


def test_max_steps_and_an_early_break_leave_the_next_epoch_clean():
    split = _indexed(scan_split(SAMPLE / "train"))
    cfg = DataConfig(image_size=16)
    cut = [build_dali_loader(cfg, split, True, 3, _cpu(r, 3), seed=0, max_steps=1) for r in range(3)]
    full = [build_dali_loader(cfg, split, True, 3, _cpu(r, 3), seed=0) for r in range(3)]
    assert len(cut[0]) == 1
    for epoch in range(3):
        for batches in _epoch(cut, epoch):
            assert len(batches) == 1 and len(batches[0]) == 3
    # A consumer that breaks out after one batch: the next epoch still covers distinct files.
    for loader in full:
        next(iter(loader))
    counts = Counter(i for batches in _epoch(full, 1) for b in batches for i in b)
    assert sum(counts.values()) == len(full[0]) * 9 and max(counts.values()) == 1


@pytest.mark.parametrize("accum", [1, 2])
def test_accumulation_keeps_one_pipeline_for_the_run(monkeypatch, accum):
    # The loader as `train` builds it (parts.build_loaders: max_steps = steps x accum) on 2 ranks: 40 files,
    # global batch 16, 2 optimizer steps an epoch. With accumulation 2 that is 4 micro-batches of 4 per
    # rank, fewer than the 5 that fill DALI's epoch (40 // 8); that shortfall used to send every epoch
    # down max_steps_per_epoch's cut path, one new pipeline per epoch (6 builds here instead of 2).
    from flowers_dist.config import TrainConfig
    from flowers_dist.data import dali as dali_module
    from flowers_dist.parts import batch_layout

    builds = []
    built = dali_module._built
    monkeypatch.setattr(dali_module, "_built", lambda pipe, split: builds.append(1) or built(pipe, split))
    split = _indexed(scan_split(SAMPLE / "train"))
    layout = batch_layout(TrainConfig(global_batch_size=16, grad_accum_steps=accum), 2, len(split))
    loaders = [
        build_loader(
            DataConfig(image_size=16, loader="dali"),
            split,
            train=True,
            batch_size=layout.micro_batch,
            placement=_cpu(r, 2),
            seed=0,
            max_steps=layout.steps_per_epoch * accum,
            accum=accum,
        )
        for r in range(2)
    ]
    for epoch in range(3):
        per_rank = _epoch(loaders, epoch)
        assert [len(b) for b in per_rank] == [layout.steps_per_epoch * accum] * 2
        files = [i for batches in per_rank for b in batches for i in b]
        assert len(files) == layout.steps_per_epoch * 16 and len(set(files)) == len(files)  # no file twice in an epoch
    assert len(builds) == 2, f"{len(builds)} pipeline builds for 2 ranks over 3 epochs"
    assert all(loader.resume_state() is not None for loader in loaders)  # the reader state is what a resume restores


def _many_files(tmp_path, copies: int):
    """The 40 sample train JPEGs copied `copies` times into a new class folder tree (a set with many files)."""
    src = scan_split(SAMPLE / "train")
    for k in range(copies):
        for f in src.files:
            dst = tmp_path / f.parent.name / f"{k:03d}-{f.name}"
            dst.parent.mkdir(exist_ok=True)
            dst.write_bytes(f.read_bytes())
    return scan_split(tmp_path)


def test_a_cut_epoch_reads_only_the_files_it_yields(tmp_path):
    # 400 files, max_steps=1 of batch 4 on each of 2 ranks: every file outside epoch 0's first global
    # batch and epoch 1's first global batch is truncated. Draining DALI's epoch (the old way)
    # decodes them and stops with a DataError; a cut epoch never opens them.
    split = _indexed(_many_files(tmp_path, copies=10))
    from flowers_dist.data.contract import train_shard

    used = {
        i for epoch in (0, 1) for rank in (0, 1) for b in train_shard(len(split), 4, rank, 2, 0, epoch)[:1] for i in b
    }
    assert len(used) <= 16
    for i, f in enumerate(split.files):
        if i not in used:
            f.write_bytes(f.read_bytes()[:300])
    cfg = DataConfig(image_size=16)
    loaders = [build_dali_loader(cfg, split, True, 4, _cpu(r, 2), seed=0, max_steps=1) for r in range(2)]
    for epoch in (0, 1):
        per_rank = _epoch(loaders, epoch)
        expected = [[b for b in train_shard(len(split), 4, r, 2, 0, epoch)[:1]] for r in range(2)]
        assert per_rank == expected, f"epoch {epoch}: not the first batch of train_shard's order"
    assert all(loader.resume_state() is None for loader in loaders)  # a function of the epoch, nothing to save
    # The same files without the cut: DALI's epoch runs to its end and meets the truncated files.
    with pytest.raises(DataError):
        full = build_dali_loader(cfg, split, True, 4, _cpu(0, 2), seed=0, max_steps=0)
        for epoch in (0, 1):
            _epoch([full], epoch)


def test_cut_epochs_change_their_augmentation_and_repeat_it_exactly():
    split = scan_split(SAMPLE / "train")
    cfg = DataConfig(image_size=16, rotation=15, color_jitter=0.2)

    def images(epoch):
        loader = build_dali_loader(cfg, split, True, 4, _cpu(), seed=3, max_steps=2)
        loader.set_epoch(epoch)
        return torch.cat([x for x, _ in loader])

    assert torch.equal(images(1), images(1))  # a rebuilt loader (a resumed run) sees the same pixels
    assert not torch.equal(images(0), images(1))


def test_batches_are_torch_memory_that_outlives_the_iterator():
    # OWN_THE_BATCH: the iterator copies DALI's outputs into tensors torch owns, so a batch kept
    # while DALI runs on (and after the pipeline is gone) still holds its pixels.
    from flowers_dist.data.dali import OWN_THE_BATCH

    assert OWN_THE_BATCH == {"exec_dynamic": False}
    split = scan_split(SAMPLE / "val")
    loader = build_dali_loader(DataConfig(image_size=32), split, False, 4, _cpu(), seed=0)
    assert loader.iterator._pipes[0].exec_dynamic is False
    first, _ = next(iter(loader))
    kept, total = first.clone(), first.sum()
    for _ in loader:  # DALI fills and recycles its buffers for the whole epoch
        pass
    del loader
    assert torch.equal(first, kept) and first.sum() == total


def test_dali_val_matches_the_pytorch_eval_transform():
    # The same geometry (integer sizes and centre-crop anchor as torchvision computes them) and
    # the same decoder output (libjpeg-turbo in both); only the resize kernels differ. Measured
    # here: mean |diff| <= 0.002 and max |diff| 0.0175 in normalised units (~1 grey level) over
    # all 736 val photos; the bounds leave 5x headroom for other libjpeg/PIL builds.
    split = scan_split(SAMPLE / "val")
    cfg = DataConfig(image_size=48)
    dali_images, dali_labels = zip(*build_dali_loader(cfg, split, False, 8, _cpu(), seed=0))
    dali_images, dali_labels = torch.cat(dali_images), torch.cat(dali_labels)
    normalize, transform = DeviceNormalizer(cfg.mean, cfg.std, _cpu()), eval_transform(cfg)
    torch_images = torch.cat([normalize(transform(load_rgb(f))[None], torch.zeros(1))[0] for f in split.files])
    assert dali_images.shape == torch_images.shape == (len(split), 3, 48, 48)
    diff = (dali_images - torch_images).abs()
    assert diff.mean(dim=(1, 2, 3)).max() < 0.01
    assert diff.max() < 0.1
    for a, b in zip(dali_images, torch_images):
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.999
    # Labels index the sorted class list, file by file, in the split's order (no shuffle).
    assert list(split.classes) == sorted(split.classes)
    assert dali_labels.dtype == torch.int64
    assert dali_labels.tolist() == [split.classes.index(Path(f).parent.name) for f in split.files]


def test_channels_last_and_fp16_outputs_hold_the_same_pixels():
    split = scan_split(SAMPLE / "val")
    cfg = DataConfig(image_size=32)
    ref, _ = next(iter(build_dali_loader(cfg, split, False, 8, _cpu(), seed=0)))
    cl, _ = next(iter(build_dali_loader(cfg, split, False, 8, _cpu(channels_last=True), seed=0)))
    half, _ = next(iter(build_dali_loader(cfg, split, False, 8, _cpu(dtype=torch.float16), seed=0)))
    bf16, _ = next(iter(build_dali_loader(cfg, split, False, 8, _cpu(dtype=torch.bfloat16), seed=0)))
    assert cl.shape == ref.shape and cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl, ref)
    assert half.dtype == torch.float16 and torch.allclose(half.float(), ref, atol=1e-2)
    assert bf16.dtype == torch.bfloat16 and torch.allclose(bf16.float(), ref, atol=5e-2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_fused_cpu_finish_augments_as_dalis_operators_do(channels_last):
    # The same loader, seed and draws, ending once with the fused kernel and once with DALI's
    # rotate, color_twist and crop_mirror_normalize. Wide ranges make clamping and the rotated-in
    # fill common. They differ only by DALI's rounding to uint8 after color_twist (half a grey
    # level, 0.009 here) and its YIQ round trip (under 0.2 %): measured max 0.015.
    split = scan_split(SAMPLE / "train")
    cfg = DataConfig(image_size=48, rotation=30, color_jitter=0.5)
    place = _cpu(channels_last=channels_last)
    fused = list(build_dali_loader(cfg, split, True, 8, place, seed=0, fused=True))
    ops = list(build_dali_loader(cfg, split, True, 8, place, seed=0, fused=False))
    assert len(fused) == len(ops) == len(split) // 8
    for (a, la), (b, lb) in zip(fused, ops):
        assert torch.equal(la, lb) and a.shape == b.shape == (8, 3, 48, 48) and a.dtype == torch.float32
        assert a.is_contiguous(memory_format=torch.channels_last) == channels_last
        diff = (a - b).abs()
        assert diff.mean() < 0.01 and diff.max() < 0.05
    # Not a vacuous match: the augmentation moved pixels far from the plain crop's.
    plain = list(
        build_dali_loader(dataclasses.replace(cfg, rotation=0.0, color_jitter=0.0), split, True, 8, place, seed=0)
    )
    assert (fused[0][0] - plain[0][0]).abs().mean() > 0.2


def test_the_cpu_graph_fuses_only_where_it_helps_and_says_why(monkeypatch):
    from flowers_dist.data import dali_fused
    from flowers_dist.data.dali import use_fused_finish

    recipe = DataConfig(rotation=15, color_jitter=0.2)
    assert use_fused_finish(recipe, on_gpu=False)[0]
    assert not use_fused_finish(recipe, on_gpu=True)[0]
    assert not use_fused_finish(DataConfig(rotation=0.0, color_jitter=0.0), on_gpu=False)[0]
    with pytest.raises(ValueError, match="CPU kernel"):
        train_pipeline(
            files=[],
            labels=[],
            cfg=recipe,
            shard_id=0,
            num_shards=1,
            reader_seed=0,
            on_gpu=True,
            fused=True,
            batch_size=1,
            num_threads=1,
            device_id=0,
        )
    monkeypatch.setattr(dali_fused, "numba_status", lambda: (False, "numba does not import (ImportError)"))
    ok, why = use_fused_finish(recipe, on_gpu=False)
    assert not ok and "pip install numba" in why
    # Without numba the loader still builds, on DALI's operators.
    images, _ = next(
        iter(
            build_dali_loader(
                DataConfig(image_size=16, rotation=15, color_jitter=0.2),
                scan_split(SAMPLE / "train"),
                True,
                4,
                _cpu(),
                seed=0,
            )
        )
    )
    assert images.shape == (4, 3, 16, 16)


def _debug_samples(split, cfg, batches, seed=1, fused=False):
    """Run the production training graph with its crop shapes and flips exposed."""
    pipe = train_pipeline(
        files=[str(f) for f in split.files],
        labels=list(split.labels),
        cfg=cfg,
        shard_id=0,
        num_shards=1,
        reader_seed=0,
        on_gpu=False,
        debug=True,
        batch_size=64,
        num_threads=2,
        device_id=None,
        seed=seed,
        fused=fused,
    )
    pipe.build()
    out = [pipe.run() for _ in range(batches)]
    images = np.concatenate([np.array(o[0].as_tensor()) for o in out])
    shapes = np.array([np.array(s) for o in out for s in o[2]], dtype=float)
    crops = np.array([np.array(s) for o in out for s in o[3]], dtype=float)
    flips = np.array([int(np.array(m)) for o in out for m in o[4]])
    return images, shapes, crops, flips


@pytest.mark.parametrize("fused", [False, True])
def test_crops_and_flips_stay_within_the_configured_ranges(fused):
    split = _shared_val()
    cfg = DataConfig(image_size=32, scale=(0.2, 0.8), ratio=(0.5, 2.0), rotation=15, color_jitter=0.2)
    images, shapes, crops, flips = _debug_samples(split, cfg, batches=4, fused=fused)
    assert images.shape == (256, 3, 32, 32)
    h, w, ch, cw = shapes[:, 0], shapes[:, 1], crops[:, 0], crops[:, 1]
    # Crop sides are whole pixels: allow one pixel of rounding on each side.
    assert np.all((ch - 1) * (cw - 1) / (h * w) <= cfg.scale[1]) and np.all(
        (ch + 1) * (cw + 1) / (h * w) >= cfg.scale[0]
    )
    assert np.all((cw - 1) / (ch + 1) <= cfg.ratio[1]) and np.all((cw + 1) / (ch - 1) >= cfg.ratio[0])
    area, ratio = ch * cw / (h * w), np.log(cw / ch)
    assert area.min() < 0.3 and area.max() > 0.7, "areas do not span the range"
    assert ratio.min() < np.log(0.6) and ratio.max() > np.log(1.7), "aspect ratios do not span the range"
    assert 256 * 0.5 - 3 * 8 < flips.sum() < 256 * 0.5 + 3 * 8  # binomial(256, 0.5): 3 sigma


@pytest.mark.parametrize("fused", [False, True])
def test_a_flip_mirrors_exactly_the_same_crop(fused):
    split = scan_split(SAMPLE / "train")
    cfg = DataConfig(image_size=32)  # the fused kernel, when asked, runs without rotation or jitter too
    keep, _, _, _ = _debug_samples(split, dataclasses.replace(cfg, hflip=0.0), batches=1, fused=fused)
    flip, _, _, flips = _debug_samples(split, dataclasses.replace(cfg, hflip=1.0), batches=1, fused=fused)
    assert flips.all()
    np.testing.assert_array_equal(flip, keep[..., ::-1])


def test_an_unreadable_jpeg_stops_with_a_one_line_error(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
    good = sorted((SAMPLE / "val" / "daisy").glob("*.jpg"))
    for f in good[:3]:
        (tmp_path / "a" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "b" / "cut.jpg").write_bytes(good[0].read_bytes()[:2000])
    with pytest.raises(
        DataError, match=rf"cut\.jpg.*data\.check=true.*`flowers-dist data check {tmp_path}` lists them"
    ):
        loader = build_dali_loader(DataConfig(image_size=16), scan_split(tmp_path), False, 2, _cpu(), seed=0)
        for _ in loader:
            pass


def _decoder_arguments(pipeline_fn, cfg: DataConfig, **kw) -> dict[str, str]:
    """The arguments DALI holds for the pipeline's image decoder, read back from its operator spec.

    The GPU graph cannot be built without a GPU, but its Python graph can: `_build_graph` creates
    the operators with the arguments the backend would receive (DALI 2.4 has no public getter, so
    the spec's text is parsed).
    """
    split = scan_split(SAMPLE / "val")
    pipe = pipeline_fn(
        [str(f) for f in split.files],
        list(split.labels),
        cfg,
        0,
        1,
        on_gpu=True,
        **kw,
        batch_size=4,
        num_threads=1,
        device_id=None,
    )
    pipe._build_graph()
    [spec] = [str(op.spec) for op in pipe._ops if "_module: nvidia.dali.fn.decoders" in str(op.spec)]
    args = spec.split("Arguments:")[1].splitlines()
    return dict(line.strip().split(": ", 1) for line in args if ": " in line)


@pytest.mark.parametrize(
    "pipeline_fn, kw", [(train_pipeline, {"reader_seed": 0}), (val_pipeline, {})], ids=["train", "val"]
)
def test_hw_decoder_load_reaches_the_gpu_decoders_only_when_set(pipeline_fn, kw):
    default = _decoder_arguments(pipeline_fn, DataConfig(image_size=16), **kw)
    assert default["device"] == "mixed" and "hw_decoder_load" not in default  # DALI's own default applies
    for load in (0.0, 0.9):
        args = _decoder_arguments(pipeline_fn, DataConfig(image_size=16, hw_decoder_load=load), **kw)
        assert args["device"] == "mixed" and float(args["hw_decoder_load"]) == pytest.approx(load)


def test_build_loader_picks_dali_or_explains(monkeypatch):
    split = scan_split(SAMPLE / "val")
    args = dict(train=False, batch_size=4, placement=_cpu(), seed=0)
    assert isinstance(build_loader(DataConfig(loader="auto", image_size=16), split, **args), DaliLoader)
    monkeypatch.setattr("flowers_dist.data.dali_status", lambda: (False, "nvidia.dali does not import (ImportError)"))
    assert isinstance(build_loader(DataConfig(loader="auto", image_size=16), split, **args), TorchLoader)
    with pytest.raises(DataError, match="pip install nvidia-dali-cuda130"):
        build_loader(DataConfig(loader="dali", image_size=16), split, **args)


@pytest.mark.e2e
@pytest.mark.parametrize("nprocs", [1, 2])
def test_quickstart_trains_with_dali(tmp_path, nprocs):
    cli(
        [
            "train",
            "--config",
            "configs/quickstart.yaml",
            "data.root=data/flowers_sample",
            "train.global_batch_size=8",
            "data.loader=dali",
            "data.image_size=64",
            "train.epochs=1",
            f"train.output_dir={tmp_path}",
            "train.name=x",
            "train.progress=lines",
        ],
        nprocs=nprocs,
    )
    epochs = [r for r in metrics(tmp_path / "x") if r["event"] == "epoch"]
    assert len(epochs) == 1 and epochs[0]["val_count"] == 23 and epochs[0]["train_images"] == 40


def test_the_fused_kernel_compiles_where_numba_cannot_cache(tmp_path):
    # A read-only install with no writable home: numba finds no cache folder and refuses cache=True.
    code = (
        "import numba.core.caching as c; c.CacheImpl._locator_classes = []; import numpy as np; "
        "from flowers_dist.data import dali_fused as f; img = np.full((4, 4, 3), 200, np.uint8); "
        "out = np.empty((3, 4, 4), np.float32); prm = np.array([0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1], np.float32); "
        "f.kernel(out, img, prm); print(out.min(), out.max())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["200.0", "200.0"]  # identity parameters: the pixels come through unchanged


def test_train_order_follows_the_seed_and_resumes_exactly():
    # DALI's own `seed` does not move shuffle_after_epoch's order; the loader permutes the file list by train.seed.
    split = _indexed(scan_split(SAMPLE / "train"))
    cfg = DataConfig(image_size=16)

    def build(seed, resume=None):
        return [
            build_dali_loader(cfg, split, True, 3, _cpu(r, 2), seed=seed, resume_state=resume and resume[r])
            for r in range(2)
        ]

    def flat(per_rank):
        return [i for batches in per_rank for b in batches for i in b]

    runs = {}
    for name, seed in (("a", 4), ("again", 4), ("b", 5)):
        loaders = build(seed)
        runs[name] = [flat(_epoch(loaders, e)) for e in range(3)]
        for order in runs[name]:  # still every file at most once per epoch, and full global batches
            assert len(order) == len(set(order)) == len(split) // 6 * 6
    assert runs["a"] == runs["again"] and loaders[0].kind == "dali"
    assert all(runs["a"][e] != runs["b"][e] for e in range(3)), "train.seed did not change DALI's order"
    # Resuming after epoch 0 from the per-rank checkpoints continues the seed's sequence.
    loaders = build(5)
    _epoch(loaders, 0)
    resumed = build(5, [loader.resume_state() for loader in loaders])
    assert [flat(_epoch(resumed, e)) for e in (1, 2)] == runs["b"][1:]
