"""Which model an evaluation scores: under torch.compile and DDP the bare one, not DDP's forward; in eval and predict
the weights (`--weights model|ema`) and flip test-time augmentation (`--hflip-tta`) that training evaluated with."""

import json
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from accelerate.utils import extract_model_from_parallel
from conftest import SAMPLE, TINY, cli, metrics
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from flowers_dist import checkpoint_file
from flowers_dist import cli as flowers_cli
from flowers_dist.checkpointing import CheckpointManager, Progress
from flowers_dist.config import Config
from flowers_dist.data import Placement, build_loader, scan_split
from flowers_dist.data.contract import DeviceNormalizer
from flowers_dist.data.torch_loader import eval_transform, load_rgb
from flowers_dist.errors import EXIT_USER_ERROR, CheckpointError
from flowers_dist.evaluate import EvalResult, local_counts
from flowers_dist.inference import load_trained, predict, run_eval
from flowers_dist.model import build_model
from flowers_dist.steps import evaluation_model

CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
CPU = torch.device("cpu")


def test_compiled_ddp_model_is_evaluated_without_ddp(tmp_path, monkeypatch):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        bare = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
        ddp = DDP(bare)
        prepared = torch.compile(
            ddp, backend="eager"
        )  # what Accelerate builds for model.compile with several processes
        calls = []
        forward = DDP.forward
        monkeypatch.setattr(DDP, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
        x = torch.randn(5, 4)
        # The trap: accelerate's unwrap keeps the compiled wrapper, whose forward is still DDP's.
        extract_model_from_parallel(torch.compile(DDP(nn.Linear(4, 3)), backend="eager"))(x)
        assert calls, "the unwrapped compiled model no longer calls DDP's forward: recheck the comment in train.py"
        calls.clear()
        model = evaluation_model(prepared, bare, {"backend": "eager"}).eval()
        out = model(x)
        assert calls == [], "evaluation went through DDP's forward"
        torch.testing.assert_close(out, bare.eval()(x))
        assert prepared._orig_mod is ddp  # training's wrapper untouched
        assert evaluation_model(ddp, bare, {}) is bare  # not compiled: the bare model itself
    finally:
        dist.destroy_process_group()


def _checkpoint(run_dir: Path, *, ema: bool, hflip_tta: bool) -> Path:
    """best.pt of an untrained test_resnet at 32 px, written by the run's own CheckpointManager; with `ema`, an
    average whose weights differ from the model's (another seed), as after training."""
    cfg = Config()
    cfg.model.name, cfg.model.pretrained, cfg.data.image_size = "test_resnet", "none", 32
    cfg.model.ema, cfg.train.eval_hflip_tta = (0.9 if ema else 0.0), hflip_tta
    model, other = (_calibrated(cfg, seed) for seed in (0, 1))
    average = ModelEmaV3(other, decay=cfg.model.ema) if ema else None
    manager = CheckpointManager(run_dir, cfg.train, is_main=True)
    state = manager.state(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        progress=Progress(),
        rank_sums=[[0.0, 0.0, 0.0]],
        loader_states=[None],
        world=1,
        config=cfg.to_dict(),
        classes=CLASSES,
        ema=average,
    )
    manager.save(state, 1, is_best=True)
    manager.wait()
    return manager.dir / "best.pt"


def _calibrated(cfg: Config, seed: int) -> nn.Module:
    """An untrained model with the BatchNorm statistics of the sample's train images, so that images get different
    classes and the weights and the flip move some of them (with timm's initial statistics an untrained model gives
    every image nearly the same logits, and only the loss would tell the choices apart)."""
    torch.manual_seed(seed)
    model = build_model(cfg.model, len(CLASSES))
    split = scan_split(SAMPLE / "train", CLASSES)
    images = torch.stack([eval_transform(cfg.data)(load_rgb(f, cfg.data.max_pixels)) for f in split.files])
    x, _ = DeviceNormalizer(cfg.data.mean, cfg.data.std, Placement(0, 1, CPU))(images, torch.zeros(len(images)))
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        norm.reset_running_stats()
        norm.momentum = None  # a plain mean over the one batch
    with torch.no_grad():
        model.train()(x)
    return model.eval()


@pytest.fixture(scope="module")
def with_ema(tmp_path_factory) -> Path:
    """A run with model.ema and train.eval_hflip_tta on."""
    return _checkpoint(tmp_path_factory.mktemp("ema"), ema=True, hflip_tta=True)


@pytest.fixture(scope="module")
def without_ema(tmp_path_factory) -> Path:
    """A run with both off (its checkpoint's "ema" is None)."""
    return _checkpoint(tmp_path_factory.mktemp("plain"), ema=False, hflip_tta=False)


def _by_hand(checkpoint: Path, key: str, images: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of the plain logits and of the mean of the image's and its mirror's logits, of the checkpoint's `key`
    weights loaded into a model built here."""
    model, cfg, _ = load_trained(checkpoint, CPU)  # the config and architecture; the weights come next
    model.load_state_dict(checkpoint_file.load(checkpoint)[key])
    normalize = DeviceNormalizer(cfg.data.mean, cfg.data.std, Placement(0, 1, CPU))
    batch = torch.stack([eval_transform(cfg.data)(load_rgb(p, cfg.data.max_pixels)) for p in images])
    x, _ = normalize(batch, torch.zeros(len(images), dtype=torch.int64))
    with torch.no_grad():
        plain = model(x).float()
        flipped = model(x.flip(3)).float()
    return plain.softmax(1), ((plain + flipped) / 2).softmax(1)


def _probabilities(rows: list[dict]) -> torch.Tensor:
    """predict's top-5 of 5 classes back in class order, one row per image."""
    return torch.tensor([[next(t["prob"] for t in r["top"] if t["class"] == c) for c in CLASSES] for r in rows])


def test_predict_scores_the_chosen_weights_with_or_without_the_flip(with_ema):
    images = sorted((SAMPLE / "val" / "roses").iterdir())[:3]
    model_plain, model_flip = _by_hand(with_ema, "model", images)
    ema_plain, ema_flip = _by_hand(with_ema, "ema", images)
    assert not torch.allclose(model_plain, ema_plain, atol=1e-3), "the fixture's average must differ from its model"
    assert not torch.allclose(ema_plain, ema_flip, atol=1e-4), "the flip must change these images' scores"

    def scored(**choice) -> torch.Tensor:
        return _probabilities(predict(with_ema, [str(p) for p in images], topk=5, **choice))

    torch.testing.assert_close(scored(weights="ema", hflip_tta="off"), ema_plain)
    torch.testing.assert_close(scored(weights="ema", hflip_tta="on"), ema_flip)
    torch.testing.assert_close(scored(weights="model", hflip_tta="off"), model_plain)
    torch.testing.assert_close(scored(), model_flip)  # auto: this run evaluated with the flip


def test_predict_auto_follows_a_run_without_the_flip(without_ema):
    images = sorted((SAMPLE / "val" / "daisy").iterdir())[:2]
    plain, flipped = _by_hand(without_ema, "model", images)
    auto = _probabilities(predict(without_ema, [str(p) for p in images], topk=5))
    torch.testing.assert_close(auto, plain)
    torch.testing.assert_close(
        _probabilities(predict(without_ema, [str(p) for p in images], 5, hflip_tta="on")), flipped
    )


def test_weights_ema_of_a_run_without_an_average_is_a_one_line_error(without_ema, capsys):
    with pytest.raises(
        CheckpointError, match=r"holds no weight average: its run had model\.ema=0; use --weights model"
    ):
        load_trained(without_ema, CPU, "ema")
    image = str(sorted((SAMPLE / "val" / "tulips").iterdir())[0])
    for argv in (["predict", str(without_ema), image], ["eval", str(without_ema), "--data", str(SAMPLE)]):
        assert flowers_cli.main([*argv, "--weights", "ema"]) == EXIT_USER_ERROR
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "model.ema=0" in err[0] and "--weights model" in err[0], err


def _counted_by_hand(checkpoint: Path, key: str, flip: bool) -> EvalResult:
    """local_counts over data/flowers_sample's val split, with a model and a loader built here."""
    model, cfg, _ = load_trained(checkpoint, CPU)
    model.load_state_dict(checkpoint_file.load(checkpoint)[key])
    cfg.data.loader = "torch"
    split = scan_split(SAMPLE / "val", CLASSES)
    loader = build_loader(cfg.data, split, train=False, batch_size=8, placement=Placement(0, 1, CPU), seed=0)
    return EvalResult.from_counts(local_counts(model, loader, len(CLASSES), CPU, hflip_tta=flip), len(CLASSES))


def test_eval_on_sample_counts_as_local_counts_with_the_same_weights_and_flip(with_ema, tmp_path, capsys):
    hand = {(key, flip): _counted_by_hand(with_ema, key, flip) for key in ("model", "ema") for flip in (False, True)}
    assert len({str(r.confusion) for r in hand.values()}) == 4, "each choice must move some predictions"
    argv = ["eval", str(with_ema), "--data", str(SAMPLE), "--loader", "torch", "--workers", "0", "--batch-size", "8"]
    for weights, tta, flip in [("model", "auto", True), ("ema", "off", False), ("ema", "on", True)]:
        out = tmp_path / f"{weights}-{tta}.json"
        # Through the command line, as a user runs it (in-process: nothing here trains).
        assert (
            flowers_cli.main([*argv, "--device", "cpu", "--weights", weights, "--hflip-tta", tta, "--json", str(out)])
            == 0
        )
        said = json.loads(out.read_text())
        expected = hand[(weights, flip)]
        assert said["count"] == 23 and said["confusion"] == expected.confusion
        assert said["loss"] == pytest.approx(expected.loss, rel=1e-5)
        assert (said["weights"], said["hflip_tta"]) == (weights, flip)
        first = capsys.readouterr().out.splitlines()[0]
        assert f"({weights} weights, flip TTA {'on' if flip else 'off'})" in first, first


def test_eval_report_pages_the_mistakes_of_the_same_weights_and_flip(with_ema, tmp_path, monkeypatch):
    """Its wrong files are those predict (checked above) gets wrong with the same choice, and the choice matters."""
    monkeypatch.setenv("WANDB_MODE", "disabled")  # --report logs to W&B when tracking is on
    argv = ["eval", str(with_ema), "--data", str(SAMPLE), "--loader", "torch", "--workers", "0", "--device", "cpu"]
    assert flowers_cli.main([*argv, "--weights", "ema", "--hflip-tta", "on", "--report", str(tmp_path)]) == 0
    page = set(re.findall(r"<td>([^<]*)</td></tr>", (tmp_path / "mistakes.html").read_text()))
    assert page == _wrong_files(with_ema, "ema", "on") != _wrong_files(with_ema, "ema", "off")


def _wrong_files(checkpoint: Path, weights: str, tta: str) -> set[str]:
    """The sample's val files (as the mistakes page names them) whose top class from predict is not their class."""
    rows = predict(checkpoint, [str(SAMPLE / "val")], topk=1, weights=weights, hflip_tta=tta)
    return {
        str(Path(r["path"]).relative_to(SAMPLE / "val"))
        for r in rows
        if r["top"][0]["class"] != Path(r["path"]).parent.name
    }


@pytest.mark.e2e
def test_eval_of_best_pt_gives_the_val_acc_its_run_recorded_for_the_weights_and_the_average(tmp_path):
    """A run with model.ema and flip TTA: eval's defaults give its val_acc, --weights ema its val_acc_ema."""
    run = [*TINY, "model.name=test_resnet", "data.loader=torch", "model.ema=0.5", "train.eval_hflip_tta=true"]
    cli(["train", "--config", "configs/quickstart.yaml", *run, "train.epochs=1", f"train.output_dir={tmp_path}"])
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    (epoch,) = [r for r in metrics(run_dir) if r["event"] == "epoch"]
    best = run_dir / "checkpoints" / "best.pt"
    for weights, recorded in (("model", "val_acc"), ("ema", "val_acc_ema")):
        result = run_eval(best, SAMPLE, 8, 0, "cpu", None, loader="torch", weights=weights)
        assert (result.accuracy, result.loss) == pytest.approx(
            (epoch[recorded], epoch[recorded.replace("acc", "loss")])
        )
        assert result.confusion == epoch["val_confusion"] or weights == "ema"  # the record keeps the weights' only
