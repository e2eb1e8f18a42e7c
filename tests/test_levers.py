"""The time-to-accuracy levers (issue 19): off by default with the seed's numerics unchanged, each one's effect on the
loss, the parameter groups, their rates, the weight average and evaluation, their record, resume and refusal."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from contextlib import nullcontext

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import REPO, TINY, assert_same_final_weights, cli, last_checkpoint, metrics
from timm.data.mixup import mixup_target
from timm.utils import ModelEmaV3

from flowers_dist import checkpoint_file, config, metrics_log, resume_check
from flowers_dist.checkpointing import CheckpointManager, Progress
from flowers_dist.config import LEVERS, Config, ConfigError, OptimConfig, TrainConfig, levers_on
from flowers_dist.evaluate import local_counts
from flowers_dist.schedule import lr_at_step
from flowers_dist.steps import (
    CORRECT,
    COUNT,
    LOSS_SUM,
    LoaderClock,
    batch_loss,
    build_mixup,
    build_optimizer,
    micro_step,
    mix,
    optimizer_step,
    weights_digest,
)

CLASSES = 5


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=CLASSES)


def _batches(n: int, size: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (size,), generator=g)) for _ in range(n)
    ]


def _steps(model, optimizer, batches, *, accum: int, rates: list[float], **levers) -> torch.Tensor:
    """optimizer_step as the loop calls it, one process (no DDP: no_sync is a no-op); returns the summed counts."""
    model.train()
    source, sums = iter(batches), torch.zeros(3, dtype=torch.float64)
    for lr in rates:
        optimizer_step(
            model,
            optimizer,
            source,
            accum=accum,
            lr=lr,
            sums=sums,
            backward=torch.Tensor.backward,
            no_sync=lambda m: nullcontext(),
            clock=LoaderClock(torch.device("cpu")),
            **levers,
        )
    return sums


class _Logits(torch.nn.Module):
    """A "model" whose logits are a fixed function of its input, for evaluation tests."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _names(model: torch.nn.Module, params) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


# -- off by default -------------------------------------------------------------------------------
def test_every_lever_is_off_by_default_and_documented():
    flat = {f"{s}.{k}": v for s, keys in Config().to_dict().items() for k, v in keys.items()}
    assert {key: flat[key] for key in LEVERS} == LEVERS  # each default is its off value
    assert levers_on(Config()) == {} and levers_on(config.load(REPO / "configs" / "flowers_resnet18.yaml")) == {}
    docs = (REPO / "docs" / "config.md").read_text()
    assert [key for key in LEVERS if f"`{key}`" not in docs] == []
    on = config.load(None, ["optim.label_smoothing=0.1", "model.ema=0.999", "train.eval_hflip_tta=true"])
    assert levers_on(on) == {"optim.label_smoothing": 0.1, "model.ema": 0.999, "train.eval_hflip_tta": True}


def test_default_step_is_the_seed_recipes_plain_sgd_step():
    """The default config trains bit-identically to plain SGD on model.parameters() and a summed cross-entropy / n."""
    cfg = OptimConfig(lr=0.05, weight_decay=5e-4)
    ours, ref = _model(), _model()
    optimizer = build_optimizer(cfg, ours)
    assert len(optimizer.param_groups) == 1 and "lr_scale" not in optimizer.param_groups[0]
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in ours.parameters()]
    batches, rates = _batches(6), [0.05, 0.1, 0.02]
    _steps(ours, optimizer, batches, accum=2, rates=rates)
    plain = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    ref.train()
    for k, lr in enumerate(rates):
        for images, labels in batches[2 * k : 2 * k + 2]:
            (F.cross_entropy(ref(images), labels, reduction="sum") / labels.numel() / 2).backward()
        plain.param_groups[0]["lr"] = lr
        plain.step()
        plain.zero_grad()
    assert weights_digest(ours) == weights_digest(ref)


# -- label smoothing ------------------------------------------------------------------------------
def test_label_smoothing_is_the_hand_computed_loss_and_evaluation_stays_unsmoothed():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0, 0.3], [0.1, 0.2, 0.3, 0.4, 0.5]])
    labels = torch.tensor([0, 3])
    s = 0.1
    logp = logits.log_softmax(1)
    target = torch.full_like(logp, s / CLASSES)
    target[torch.arange(2), labels] += 1 - s
    assert batch_loss(logits, labels, s).item() == pytest.approx(-(target * logp).sum(1).mean().item(), rel=1e-6)
    assert batch_loss(logits, labels, s) > batch_loss(logits, labels)  # a confident right answer costs more
    counts = local_counts(_Logits(lambda x: logits), [(torch.zeros(2), labels)], CLASSES, torch.device("cpu"))
    assert counts[0].item() == pytest.approx(-logp[torch.arange(2), labels].sum().item(), rel=1e-6)


# -- parameter groups -----------------------------------------------------------------------------
def test_no_decay_on_norms_and_biases():
    model = _model()
    groups = build_optimizer(OptimConfig(weight_decay=1e-4, no_decay_norm_bias=True), model).param_groups
    assert [g["weight_decay"] for g in groups] == [0.0, 1e-4]
    no_decay, decay = (_names(model, g["params"]) for g in groups)
    assert "fc.bias" in no_decay and "bn1.weight" in no_decay and "bn1.bias" in no_decay
    assert "fc.weight" in decay and "layer1.0.conv1.weight" in decay
    norms = {
        f"{where}.{name}"
        for where, module in model.named_modules()
        if isinstance(module, torch.nn.modules.batchnorm._NormBase)
        for name, _ in module.named_parameters(recurse=False)
    }
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert no_decay == norms | biases and len(norms) > 20  # the stem's and downsamples' norms too
    assert decay == {n for n, _ in model.named_parameters()} - no_decay


@pytest.mark.parametrize("no_decay", [False, True])
def test_head_lr_mult_scales_the_heads_rate_only(no_decay):
    cfg = OptimConfig(lr=0.1, momentum=0.0, weight_decay=1e-3, head_lr_mult=10.0, no_decay_norm_bias=no_decay)
    scaled, plain = _model(), _model()
    optimizer = build_optimizer(cfg, scaled)
    heads = [g for g in optimizer.param_groups if "lr_scale" in g]
    assert set().union(*(_names(scaled, g["params"]) for g in heads)) == {"fc.weight", "fc.bias"}
    assert len(optimizer.param_groups) == (4 if no_decay else 2)
    before = copy.deepcopy(scaled.state_dict())
    batches = _batches(1)
    lr = lr_at_step(cfg, 0, 0, 1, total_epochs=1, global_batch_size=32)
    _steps(scaled, optimizer, batches, accum=1, rates=[lr])
    _steps(plain, build_optimizer(dataclasses.replace(cfg, head_lr_mult=1.0), plain), batches, accum=1, rates=[lr])
    assert sorted(g["lr"] for g in optimizer.param_groups) == sorted([lr, 10 * lr] * (2 if no_decay else 1))
    for name, p in scaled.named_parameters():
        moved, moved_plain = p - before[name], dict(plain.named_parameters())[name] - before[name]
        ratio = 10.0 if name.startswith("fc.") else 1.0
        assert torch.allclose(moved, ratio * moved_plain, rtol=1e-5, atol=1e-6), name


def test_grouped_optimizer_resumes_exactly_and_refuses_another_grouping():
    cfg = OptimConfig(lr=0.05, weight_decay=5e-4, no_decay_norm_bias=True, head_lr_mult=3.0)
    a = _model()
    opt_a = build_optimizer(cfg, a)
    batches = _batches(8)
    _steps(a, opt_a, batches[:4], accum=2, rates=[0.05, 0.05])
    b = _model(seed=7)
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(cfg, b)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    _steps(a, opt_a, batches[4:], accum=2, rates=[0.04, 0.03])
    _steps(b, opt_b, batches[4:], accum=2, rates=[0.04, 0.03])
    assert weights_digest(a) == weights_digest(b)
    with pytest.raises(ValueError, match="parameter groups"):  # train.restore makes it one line (forced resumes)
        build_optimizer(OptimConfig(), _model()).load_state_dict(opt_a.state_dict())


def test_head_lr_mult_needs_a_classifier():
    with pytest.raises(ConfigError, match="optim.head_lr_mult"):
        build_optimizer(OptimConfig(head_lr_mult=2.0), torch.nn.Sequential(torch.nn.Linear(3, 2)))


# -- schedule: warm-up then cosine, per step --------------------------------------------------------
def test_warmup_then_cosine_per_step_values():
    cfg = OptimConfig(lr=0.1, schedule="cosine", warmup_steps=4)
    rates = [lr_at_step(cfg, e, s, 5, total_epochs=2, global_batch_size=32) for e in range(2) for s in range(5)]
    cosine = [0.5 * (1 + math.cos(math.pi * k / 10)) for k in range(10)]
    warm = [0.1 + 0.9 * k / 4 for k in range(4)] + [1.0] * 6
    assert rates == pytest.approx([0.1 * c * w for c, w in zip(cosine, warm)], rel=1e-12)
    assert rates[0] == pytest.approx(0.01) and rates[4] == pytest.approx(0.1 * 0.5 * (1 + math.cos(0.4 * math.pi)))


# -- mixup / cutmix --------------------------------------------------------------------------------
def _mixup(**keys):
    return build_mixup(OptimConfig(**keys), CLASSES, micro_batch=4)


def test_mixup_is_off_by_default_and_refuses_an_odd_micro_batch():
    assert build_mixup(OptimConfig(), CLASSES, micro_batch=3) is None
    for key in ("mixup_alpha", "cutmix_alpha"):
        with pytest.raises(ConfigError, match=f"'optim.{key}': .* needs an even one; this run's is 3"):
            build_mixup(OptimConfig(**{key: 0.2}), CLASSES, micro_batch=3)


def test_mixup_mixes_the_batch_with_its_reverse_and_the_soft_loss_is_hand_computed():
    """One weight per micro-batch, drawn as timm draws it from numpy's generator; smoothing inside the targets."""
    images, labels = _batches(1)[0]
    s, alpha = 0.1, 0.4
    np.random.seed(5)
    np.random.rand()  # timm's "mix at all?" draw (mixup_prob)
    lam = float(np.random.beta(alpha, alpha))
    np.random.seed(5)
    mixed, target = mix(_mixup(mixup_alpha=alpha, label_smoothing=s), images.clone(), labels)
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0), atol=1e-6)
    one_hot = torch.full((4, CLASSES), s / CLASSES)
    one_hot[torch.arange(4), labels] += 1 - s
    assert torch.allclose(target, lam * one_hot + (1 - lam) * one_hot.flip(0), atol=1e-6)
    logits = torch.randn(4, CLASSES, generator=torch.Generator().manual_seed(2))
    hand = -(target * logits.log_softmax(1)).sum(1).mean()
    assert batch_loss(logits, target, label_smoothing=s).item() == pytest.approx(
        hand.item(), rel=1e-6
    )  # no 2nd smoothing
    # Never mixed (mixup_prob=0): the soft targets are torch's label smoothing, not smoothing twice.
    _, plain = mix(_mixup(mixup_alpha=alpha, mixup_prob=0.0, label_smoothing=s), images.clone(), labels)
    assert batch_loss(logits, plain).item() == pytest.approx(batch_loss(logits, labels, s).item(), rel=1e-6)


@pytest.mark.parametrize(
    "keys", [{"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}, {"mixup_alpha": 0.4, "cutmix_alpha": 1.0}]
)
def test_mixup_changes_the_step(keys):
    batches = _batches(4)
    plain, mixed = _model(), _model()
    np.random.seed(0)
    sums_plain = _steps(plain, build_optimizer(OptimConfig(lr=0.05), plain), batches, accum=2, rates=[0.05] * 2)
    np.random.seed(0)
    optimizer = build_optimizer(OptimConfig(lr=0.05), mixed)
    sums = _steps(mixed, optimizer, copy.deepcopy(batches), accum=2, rates=[0.05] * 2, mixup=_mixup(**keys))
    assert sums[COUNT] == sums_plain[COUNT] == 16
    assert sums[LOSS_SUM] != sums_plain[LOSS_SUM] and weights_digest(mixed) != weights_digest(plain)


def test_train_accuracy_counts_the_mixed_targets_argmax():
    """A model whose logits are its (one-hot) input: right on every mixed image by the mixed target's argmax, and
    wrong by the label wherever the other image had the larger share."""
    labels = [torch.tensor([0, 1, 2, 3]), torch.tensor([4, 0, 1, 2])]
    batches = [(F.one_hot(y, CLASSES).float(), y) for y in labels]
    model = torch.nn.Linear(CLASSES, CLASSES, bias=False)
    torch.nn.init.eye_(model.weight)
    np.random.seed(6)  # both weights under 0.5: every image is mostly its partner
    sums = _steps(model, torch.optim.SGD(model.parameters(), lr=0.0), batches, accum=1, rates=[0.0] * 2,
                  mixup=_mixup(mixup_alpha=0.4))  # fmt: skip
    np.random.seed(6)  # both weights under 0.5: every image is mostly its partner
    mixup = _mixup(mixup_alpha=0.4)
    by_label = sum((mix(mixup, x.clone(), y)[1].argmax(1) == y).sum().item() for x, y in batches)
    assert sums[CORRECT] == sums[COUNT] == 8 and by_label == 0


def test_an_empty_or_odd_micro_batch_under_mixup_trains_without_crashing():
    mixup = _mixup(mixup_alpha=0.4, cutmix_alpha=1.0, label_smoothing=0.1)
    model = _model().train()
    images, target = mix(mixup, torch.empty(0, 3, 32, 32), torch.empty(0, dtype=torch.int64))
    assert target.shape == (0, CLASSES)
    _, loss = micro_step(model, images, target, torch.Tensor.backward, accum=1, syncs=True, no_sync=None)
    assert loss.item() == 0.0 and all(p.grad is None or not p.grad.any() for p in model.parameters())
    images, labels = _batches(1, size=3)[0]
    mixed, target = mix(_mixup(mixup_alpha=0.4, label_smoothing=0.1), images.clone(), labels)
    assert target.shape == (3, CLASSES) and torch.equal(mixed[2], images[2])  # the odd one out stays itself
    assert torch.allclose(target[2], mixup_target(labels[2:], CLASSES, smoothing=0.1)[0])
    assert torch.isfinite(batch_loss(model(mixed), target))


def test_the_checkpoints_rng_state_replays_the_mixup_draws():
    """timm draws from numpy's global generator: checkpoint_file.rng_state holds it, so a resume mixes the same."""
    mixup = _mixup(mixup_alpha=0.4, cutmix_alpha=1.0)
    images, labels = _batches(1)[0]
    np.random.seed(3)
    mix(mixup, images.clone(), labels)  # the draws before the checkpoint
    saved = checkpoint_file.rng_state()
    after = [mix(mixup, images.clone(), labels) for _ in range(4)]
    np.random.seed(99)  # a resumed process starts elsewhere
    checkpoint_file.set_rng_state(saved)
    replayed = [mix(mixup, images.clone(), labels) for _ in range(4)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(after, replayed))
    assert not all(torch.equal(after[0][1], a[1]) for a in after)  # the draws do differ step to step


# -- one-cycle ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("epochs", "steps", "keys"),
    [(3, 7, {}), (2, 5, {"onecycle_pct_start": 0.25, "onecycle_div_factor": 10.0, "onecycle_final_div_factor": 100.0}),
     (1, 3, {"onecycle_pct_start": 0.5}), (1, 1, {}), (4, 1, {"onecycle_pct_start": 0.1})],
)  # fmt: skip
def test_onecycle_is_torchs_onecycle_lr_step_by_step(epochs, steps, keys):
    cfg = OptimConfig(lr=0.2, schedule="onecycle", lr_scaling="linear", **keys)
    ours = [
        lr_at_step(cfg, e, s, steps, total_epochs=epochs, global_batch_size=64)
        for e in range(epochs)
        for s in range(steps)
    ]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    theirs = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=0.4,  # lr x 64 / 32
        total_steps=epochs * steps,
        pct_start=cfg.onecycle_pct_start,
        div_factor=cfg.onecycle_div_factor,
        final_div_factor=cfg.onecycle_final_div_factor,
        cycle_momentum=False,
    )
    torchs = []
    for _ in range(epochs * steps):
        torchs.append(opt.param_groups[0]["lr"])
        opt.step()
        theirs.step() if len(torchs) < epochs * steps else None
    assert ours == pytest.approx(torchs, rel=1e-12, abs=1e-15)
    end = 0.4 / cfg.onecycle_div_factor / cfg.onecycle_final_div_factor
    assert ours[-1] == pytest.approx(end) and (ours[0] == pytest.approx(0.4 / cfg.onecycle_div_factor) or steps == 1)


def test_onecycle_refuses_a_warmup_and_a_resume_that_changes_its_length():
    with pytest.raises(ConfigError, match="'optim.schedule': onecycle has its own warm-up"):
        config.load(None, ["optim.schedule=onecycle", "optim.warmup_steps=3"])
    saved = config.load(None, ["optim.schedule=onecycle"]).to_dict()
    with pytest.raises(ConfigError, match="'train.epochs' changes what the resumed run computes"):
        resume_check.check(saved, config.load(None, ["optim.schedule=onecycle", "train.epochs=50"]).to_dict(), False)


# -- the weight average ---------------------------------------------------------------------------
def test_ema_follows_each_step_and_checkpoints_round_trip(tmp_path):
    model = _model()
    optimizer = build_optimizer(OptimConfig(lr=0.05), model)
    ema = ModelEmaV3(model, decay=0.9)
    start = copy.deepcopy(model.state_dict())
    _steps(model, optimizer, _batches(1), accum=1, rates=[0.05], ema=ema)
    for name, value in ema.module.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, 0.9 * start[name] + 0.1 * model.state_dict()[name], atol=1e-6), name
    manager = CheckpointManager(tmp_path, TrainConfig(), is_main=False)
    saved = manager.state(
        model=model,
        optimizer=optimizer,
        progress=Progress(),
        rank_sums=[[0.0, 0.0, 0.0]],
        loader_states=[None],
        world=1,
        config=Config().to_dict(),
        classes=list("abcde"),
        ema=ema,
    )
    fresh = _model(seed=3)
    fresh_ema = ModelEmaV3(fresh, decay=0.9)
    progress = manager.restore(saved, fresh, build_optimizer(OptimConfig(lr=0.05), fresh), 0, 1, ema=fresh_ema)
    assert weights_digest(fresh_ema.module) == weights_digest(ema.module) and progress.note is None
    # A checkpoint saved without the average (a forced resume that turns it on): it starts from the weights.
    late = ModelEmaV3(_model(seed=4), decay=0.9)
    progress = manager.restore({**saved, "ema": None}, fresh, build_optimizer(OptimConfig(), fresh), 0, 1, ema=late)
    assert weights_digest(late.module) == weights_digest(model) and "no weight average" in progress.note


# -- flip test-time augmentation -----------------------------------------------------------------
def test_hflip_tta_averages_the_logits_of_the_image_and_its_mirror():
    images = torch.arange(2 * 1 * 1 * CLASSES, dtype=torch.float32).view(2, 1, 1, CLASSES)
    labels = torch.tensor([4, 1])

    first_row = _Logits(lambda x: x[:, 0, 0, :])  # logits = the top row of pixels: a mirror image reverses them

    def loss(tta: bool) -> float:
        return local_counts(first_row, [(images, labels)], CLASSES, torch.device("cpu"), hflip_tta=tta)[0].item()

    averaged = (images[:, 0, 0] + images[:, 0, 0].flip(1)) / 2
    assert loss(False) == pytest.approx(F.cross_entropy(images[:, 0, 0], labels, reduction="sum").item())
    assert loss(True) == pytest.approx(F.cross_entropy(averaged, labels, reduction="sum").item())
    assert loss(True) != pytest.approx(loss(False))


# -- resume -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override",
    [
        "optim.label_smoothing=0.1",
        "model.ema=0.99",
        "train.eval_hflip_tta=true",
        "optim.mixup_alpha=0.2",
        "optim.cutmix_alpha=1.0",
        "optim.schedule=onecycle",
    ],
)
def test_a_resume_refuses_a_lever_change(override):
    saved = Config().to_dict()
    with pytest.raises(ConfigError, match=f"'{override.split('=')[0]}' changes what the resumed run computes"):
        resume_check.check(saved, config.load(None, [override]).to_dict(), force=False)
    older = {
        section: {k: v for k, v in keys.items() if k not in {"ema", "eval_hflip_tta"}}
        for section, keys in saved.items()
    }
    assert resume_check.check(older, saved, force=False) == {}  # a checkpoint from before the levers resumes


LEVERS_ON = [
    "optim.label_smoothing=0.1",
    "optim.no_decay_norm_bias=true",
    "optim.weight_decay=0.0005",
    "optim.head_lr_mult=2",
    "optim.mixup_alpha=0.4",
    "optim.cutmix_alpha=1.0",
    "optim.warmup_steps=2",
    "model.ema=0.9",
    "train.eval_hflip_tta=true",
    "data.progressive_min_size=16",
    "data.progressive_end_epoch=1",
]


@pytest.mark.e2e
def test_a_run_with_every_lever_records_them_and_resumes(tmp_path):
    """Every lever on, accumulation 2: the run records them, evaluates the average, and a resume continues it
    bit-identically to the run without a stop (Mixup's draws from numpy's generator included)."""
    base = ["train", "--config", "configs/quickstart.yaml", *TINY, "model.name=test_resnet", "model.pretrained=none"]
    run = [*base, *LEVERS_ON, "train.grad_accum_steps=2", "train.max_steps_per_epoch=2", f"train.output_dir={tmp_path}"]
    cli([*run, "train.epochs=1", "train.name=levers"])
    resumed = cli(["train", "--resume", str(tmp_path / "levers"), "train.epochs=2"])
    cli([*run, "train.epochs=2", "train.name=straight"])
    assert_same_final_weights(tmp_path / "levers", tmp_path / "straight")
    assert "levers optim.label_smoothing=0.1, optim.no_decay_norm_bias=True" in resumed.stdout, resumed.stdout[-2000:]
    env = json.loads((tmp_path / "levers" / "environment.json").read_text())
    assert env["levers"] == {
        "optim.label_smoothing": 0.1,
        "optim.no_decay_norm_bias": True,
        "optim.head_lr_mult": 2.0,
        "optim.mixup_alpha": 0.4,
        "optim.cutmix_alpha": 1.0,
        "optim.warmup_steps": 2,
        "model.ema": 0.9,
        "train.eval_hflip_tta": True,
        "data.progressive_min_size": 16,
    }
    records = metrics(tmp_path / "levers")
    assert [r["from_epoch"] for r in metrics_log.events(records, "resume")] == [1]
    epochs = metrics_log.latest_per(records, "epoch", "epoch")
    assert [r["epoch"] for r in epochs] == [0, 1] and all(0 <= r["val_acc_ema"] <= 1 for r in epochs)
    assert [r["train_size"] for r in epochs] == [16, 32]  # progressive resizing, across the resume
    state = last_checkpoint(tmp_path / "levers")
    assert state["ema"] is not None and state["ema"].keys() == state["model"].keys()
    assert len(state["optimizer"]["param_groups"]) == 4 and state["position"] == {"epoch": 2, "step": 0}


def test_wandb_gets_the_averaged_weights_accuracy_only_when_the_run_has_an_ema():
    from flowers_dist.tracking import epoch_values

    record = {"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 0.9, "val_acc": 0.6, "epoch_time": 2.0,
              "images_per_s": 10.0, "val_per_class": {"a": 0.6}, "val_confusion": []}  # fmt: skip
    assert "val/accuracy_ema" not in epoch_values(record, ["a"])
    values = epoch_values({**record, "val_acc_ema": 0.7, "val_loss_ema": 0.8}, ["a"])
    assert (values["val/accuracy_ema"], values["val/loss_ema"]) == (0.7, 0.8)
