"""Training, eval and predict on a folder of real photos mixed with every kind of broken file."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from broken_files import broken_dataset
from conftest import REPO, SAMPLE, TINY, cli, metrics

from flowers_dist.config import DataConfig
from flowers_dist.data.folder import scan_split
from flowers_dist.data.torch_loader import ImageFiles, UnreadableImage, collate_skipping, eval_transform, load_rgb

# The files of broken_dataset that training leaves out: per split 6 broken kinds (truncated, zero
# bytes, text, 1x1, huge, garbled; the symlink loops are not files to scan_split, so no loader ever
# lists them), plus the val copy of a train file.
SKIPPED_TRAIN, SKIPPED_VAL = 6, 6 + 1


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad") / "data"
    broken_dataset(SAMPLE, root)
    return root


def test_load_rgb_refuses_huge_images_from_the_header(broken, caplog):
    huge = broken / "train" / "daisy" / "zz_huge.jpg"
    with pytest.raises(UnreadableImage, match="400,000,000 pixels|400000000 pixels"):
        load_rgb(huge)
    small = broken / "train" / "daisy" / "zz_progressive.jpg"
    with pytest.raises(UnreadableImage, match=r"over data.max_pixels=100"):
        load_rgb(small, max_pixels=100)
    split = scan_split(broken / "train")
    files = ImageFiles(split, eval_transform(DataConfig(image_size=32)), seed=0)
    assert files[split.files.index(huge), 0] is None  # skipped with a logged reason, no traceback
    assert any("zz_huge.jpg" in r.getMessage() and "pixels" in r.getMessage() for r in caplog.records)


def test_an_empty_batch_trains_to_nothing_and_keeps_batchnorm_finite():
    """What a rank does in a step whose every image was unreadable: zero loss, zero gradients, BN untouched."""
    import timm

    from flowers_dist.steps import COUNT, LOSS_SUM, micro_step, one_batch_step

    images, labels = collate_skipping([None, None], size=32)
    assert images.shape == (0, 3, 32, 32) and labels.shape == (0,)
    model = timm.create_model("resnet18", num_classes=5, pretrained=False).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, loss = micro_step(model, images.float(), labels, torch.Tensor.backward, accum=1, syncs=True, no_sync=None)
    assert loss.item() == 0.0  # mean cross-entropy over 0 samples would be NaN
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())  # joins DDP's all-reduce with zeros
    optimizer.step()
    after = model.state_dict()
    for k, v in before.items():
        if k.endswith("num_batches_tracked"):
            assert after[k] == v + 1  # counted as a batch, but only momentum=None BatchNorm reads it
        else:
            assert torch.equal(after[k], v), k  # weights, running means and variances unchanged
    # And for n > 0 the loss is the usual mean.
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    model.eval()
    sums = one_batch_step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y)
    loss = (sums[LOSS_SUM] / sums[COUNT]).float()
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(model(x), y), atol=1e-6)


def _train(broken, out, name, loader, nprocs=1, extra=()):
    return cli(
        [
            "train",
            "--config",
            "configs/quickstart.yaml",
            *TINY,
            f"data.root={broken}",
            f"data.loader={loader}",
            "train.epochs=1",
            "train.max_steps_per_epoch=2",
            f"train.output_dir={out}",
            f"train.name={name}",
            *extra,
        ],
        nprocs=nprocs,
    )


@pytest.fixture(scope="module")
def torch_run(broken, tmp_path_factory) -> tuple[Path, str]:
    """One PyTorch-loader run on the broken folder, shared by the training test and by eval and predict."""
    out = tmp_path_factory.mktemp("run")
    return out / "r", _train(broken, out, "r", "torch").stdout


@pytest.mark.e2e
@pytest.mark.parametrize("loader,nprocs", [("dali", 1), ("torch", 1), ("dali", 2), ("torch", 2)])
def test_training_skips_what_does_not_decode(broken, torch_run, tmp_path, loader, nprocs):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    if (loader, nprocs) == ("torch", 1):
        run, stdout = torch_run
    else:
        run, stdout = tmp_path / "r", _train(broken, tmp_path, "r", loader, nprocs).stdout
    check = next(r for r in metrics(run) if r.get("event") == "data_check")
    assert check["skipped"] == SKIPPED_TRAIN + SKIPPED_VAL
    assert check["skipped_by_kind"] == {
        "truncated": 2,
        "zero_bytes": 2,
        "not_image": 2,
        "too_small": 2,
        "too_large": 2,
        "unreadable": 2,
        "leak": 1,
    }
    assert f"data check: {SKIPPED_TRAIN + SKIPPED_VAL} file(s) skipped" in stdout
    epoch = next(r for r in metrics(run) if r.get("event") == "epoch")
    usable_val = sum(1 for p in (broken / "val").rglob("*") if p.is_file()) - SKIPPED_VAL
    assert epoch["val_count"] == usable_val  # evaluated on every usable val file, once
    assert "different weights" not in stdout


@pytest.mark.e2e
def test_torch_loader_survives_empty_batches_on_two_processes_without_the_check(tmp_path):
    """data.check=false: the PyTorch loader meets the broken files itself. One image per rank and step,
    and every train/daisy file broken, so ranks often get an empty batch while the other has one.
    64 px, not TINY's 32: ResNet-18 ends in a 1x1 map at 32 px, where BatchNorm refuses a batch of one."""
    root = tmp_path / "data"
    broken_dataset(SAMPLE, root, leak=False)
    for f in (root / "train" / "daisy").iterdir():
        if not f.is_symlink():
            f.write_bytes(f.read_bytes()[:200])
    proc = cli(
        [
            "train",
            "--config",
            "configs/quickstart.yaml",
            *TINY,
            f"data.root={root}",
            "data.loader=torch",
            "data.check=false",
            "train.global_batch_size=2",
            "data.image_size=64",
            "train.epochs=1",
            "train.max_steps_per_epoch=12",
            "train.log_every=1",
            f"train.output_dir={tmp_path}",
            "train.name=r",
        ],
        nprocs=2,
    )
    assert "data check: off" in proc.stdout and "different weights" not in proc.stdout
    steps = [r for r in metrics(tmp_path / "r") if r.get("event") == "step"]
    assert len(steps) == 12 and all(r["loss"] == r["loss"] for r in steps)  # no NaN
    epoch = next(r for r in metrics(tmp_path / "r") if r.get("event") == "epoch")
    assert epoch["train_images"] < 24  # some images were skipped, the steps still ran
    assert "skipping unreadable image" in proc.stderr


@pytest.fixture(scope="module")
def checkpoint(torch_run) -> Path:
    return torch_run[0] / "checkpoints" / "last.pt"


@pytest.mark.e2e
@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_eval_skips_bad_files_and_counts_the_rest(broken, checkpoint, tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    proc = cli(
        [
            "eval",
            str(checkpoint),
            "--data",
            str(broken),
            "--loader",
            loader,
            "--workers",
            "0",
            "--json",
            str(tmp_path / "e.json"),
        ]
    )
    result = json.loads((tmp_path / "e.json").read_text())
    files = [p for p in (broken / "val").rglob("*") if p.is_file()]
    # The leaked file is not a problem for eval alone (there is no train split to leak from).
    assert result["count"] == len(files) - (SKIPPED_VAL - 1)
    assert {Path(s["path"]).name for s in result["skipped"]} == {
        "zz_truncated.jpg",
        "zz_zero_bytes.jpg",
        "zz_text.jpg",
        "zz_one_pixel.jpg",
        "zz_huge.jpg",
        "zz_garbled.jpg",
    }
    assert "zz_huge.jpg: too_large" in proc.stdout and "Traceback" not in proc.stderr


@pytest.mark.e2e
def test_predict_names_each_bad_file_and_predicts_the_rest(broken, checkpoint):
    folder = broken / "val" / "roses"
    proc = cli(["predict", str(checkpoint), str(folder), "--json"])
    results = {Path(r["path"]).name: r for r in json.loads(proc.stdout)}
    bad = {"zz_truncated.jpg", "zz_zero_bytes.jpg", "zz_text.jpg", "zz_huge.jpg", "zz_garbled.jpg"}
    assert {n for n, r in results.items() if "error" in r} == bad
    assert re.search(r"pixels", results["zz_huge.jpg"]["error"])
    good = [p for p in folder.iterdir() if p.is_file() and p.name not in bad]
    assert all("top" in results[p.name] for p in good)
    assert "Traceback" not in proc.stderr


def test_predict_says_each_unreadable_file_once_in_input_order(tmp_path, capsys, caplog):
    """One result line per file, the unreadable ones included, and no log line besides (predict in-process:
    a checkpoint of an untrained test_resnet is all it needs)."""
    from flowers_dist import checkpoint_file, config
    from flowers_dist import cli as flowers_cli
    from flowers_dist.model import build_model

    cfg = config.load(REPO / "configs" / "quickstart.yaml")
    classes = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    model = build_model(cfg.model, len(classes))
    ckpt = tmp_path / "last.pt"
    checkpoint_file.atomic_save(
        {"format": checkpoint_file.FORMAT, "config": cfg.to_dict(), "classes": classes, "model": model.state_dict()},
        ckpt,
    )
    images = tmp_path / "imgs"
    images.mkdir()
    good = sorted((SAMPLE / "val" / "roses").iterdir())[:2]
    shutil.copy(good[0], images / "a.jpg")
    (images / "b_text.jpg").write_bytes(b"not a jpeg")
    shutil.copy(good[1], images / "c.jpg")
    (images / "d_truncated.jpg").write_bytes(good[1].read_bytes()[:300])
    assert flowers_cli.main(["predict", str(ckpt), str(images), "--topk", "2"]) in (0, None)
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert [Path(line.split(":")[0]).name for line in lines] == ["a.jpg", "b_text.jpg", "c.jpg", "d_truncated.jpg"]
    said = (out.out + out.err).splitlines() + [r.getMessage() for r in caplog.records]
    for bad in ("b_text.jpg", "d_truncated.jpg"):
        assert sum(bad in line for line in said) == 1, said
        assert f"{images / bad}: skipped (" in out.out
    assert f"{images / 'b_text.jpg'}: skipped (cannot identify image file)" in lines
