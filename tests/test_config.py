import dataclasses
import typing
from pathlib import Path

import pytest
from conftest import REPO, cli

from flowers_dist import config
from flowers_dist.config import ConfigError


def test_reference_recipe_is_exactly_the_recipe():
    cfg = config.load(REPO / "configs" / "flowers_resnet18.yaml")
    assert cfg.model.name.split(".")[0] == "resnet18" and cfg.model.pretrained == "imagenet"
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.schedule, cfg.optim.step_size, cfg.optim.gamma) == (
        1e-3,
        0.9,
        "step",
        7,
        0.1,
    )
    assert cfg.train.epochs == 25
    assert cfg.data.image_size == 224 and cfg.data.eval_resize == 256
    assert cfg.data.mean == (0.485, 0.456, 0.406) and cfg.data.std == (0.229, 0.224, 0.225)
    assert cfg.data.rotation > 0 and cfg.data.color_jitter > 0 and cfg.data.hflip == 0.5


def test_quickstart_runs_offline():
    cfg = config.load(REPO / "configs" / "quickstart.yaml")
    assert cfg.model.pretrained == "none"
    assert (REPO / cfg.data.root / "train").is_dir()


def test_unknown_key_names_the_key(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 0.1\n  momentun: 0.9\n")
    with pytest.raises(ConfigError, match=r"'optim\.momentun' is unknown"):
        config.load(bad)
    with pytest.raises(ConfigError, match=r"'trian' is unknown"):
        config.load(None, ["trian.epochs=3"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=fast", "optim.lr"),
        ("train.epochs=2.5", "train.epochs"),
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("data.scale=[0.5]", "data.scale"),
        ("data.hflip=1.5", "data.hflip"),
        ("data.hw_decoder_load=1.2", "data.hw_decoder_load"),
        ("model.channels_last=maybe", "model.channels_last"),
    ],
)
def test_bad_value_names_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        config.load(None, [override])


def test_overrides_apply_and_round_trip(tmp_path: Path):
    cfg = config.load(
        REPO / "configs" / "flowers_resnet18.yaml",
        ["optim.lr=0.01", "train.epochs=3", "data.scale=[0.2, 1]", "train.name=x"],
    )
    assert cfg.optim.lr == 0.01 and cfg.train.epochs == 3 and cfg.data.scale == (0.2, 1.0) and cfg.train.name == "x"
    assert cfg.optim.momentum == 0.9  # untouched keys keep the file's values
    config.dump(cfg, tmp_path / "c.yaml")
    assert config.load(tmp_path / "c.yaml") == cfg


def test_malformed_override_is_an_error():
    with pytest.raises(ConfigError, match="section.key=value"):
        config.load(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="section.key"):
        config.load(None, ["lr=0.1"])


@pytest.mark.e2e
def test_cli_reports_config_errors_in_one_line():
    proc = cli(["train", "--config", "configs/quickstart.yaml", "optim.lrr=0.1"], check=False, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("flowers-dist: error:") and "optim.lrr" in lines[-1]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "global_batch, micro, accum, world, split",
    [
        (32, 0, 0, 1, (32, 1)),
        (32, 0, 0, 8, (4, 1)),
        (32, 0, 2, 2, (8, 2)),
        (256, 32, 0, 8, (32, 1)),
        (1024, 32, 0, 8, (32, 4)),
        (64, 8, 4, 2, (8, 4)),
    ],
)
def test_global_batch_is_micro_times_processes_times_accumulation(global_batch, micro, accum, world, split):
    cfg = config.TrainConfig(global_batch_size=global_batch, micro_batch_size=micro, grad_accum_steps=accum)
    cfg.validate()
    assert cfg.batch_split(world) == split
    assert split[0] * world * split[1] == global_batch


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (
            ["train.global_batch_size=32"],
            3,
            r"'train.global_batch_size': 32 does not split evenly over 3 processes x train.grad_accum_steps 1$",
        ),
        (
            ["train.global_batch_size=32", "train.grad_accum_steps=3"],
            1,
            r"'train.global_batch_size': 32 does not split",
        ),
        (
            ["train.global_batch_size=96", "train.micro_batch_size=16"],
            4,
            r"'train.micro_batch_size': 16 x 4 processes does not divide",
        ),
        (
            ["train.global_batch_size=64", "train.micro_batch_size=8", "train.grad_accum_steps=2"],
            2,
            r"'train.global_batch_size': 64 != train.micro_batch_size 8 x 2 processes x train.grad_accum_steps 2$",
        ),
    ],
)
def test_batch_split_errors_name_the_key(overrides, world, message):
    cfg = config.load(None, overrides)
    with pytest.raises(ConfigError, match=message):
        cfg.train.batch_split(world)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.sync_bn=always", "model.sync_bn"),
        ("optim.lr_scaling=sqrt", "optim.lr_scaling"),
        ("optim.reference_batch_size=0", "optim.reference_batch_size"),
        ("optim.warmup_steps=-1", "optim.warmup_steps"),
        ("train.grad_accum_steps=-2", "train.grad_accum_steps"),
        ("train.micro_batch_size=-1", "train.micro_batch_size"),
    ],
)
def test_scale_keys_are_checked(override, key):
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        config.load(None, [override])
    with pytest.raises(ConfigError, match=r"'optim.warmup_steps': set it or optim.warmup_epochs, not both"):
        config.load(None, ["optim.warmup_steps=5", "optim.warmup_epochs=1"])
    with pytest.raises(ConfigError, match=r"'train.micro_batch_size': 3 x train.grad_accum_steps 2 does not divide"):
        config.load(None, ["train.micro_batch_size=3", "train.grad_accum_steps=2"])


def test_eight_gpu_config_is_the_recipe_at_batch_256():
    from flowers_dist.schedule import base_lr
    from flowers_dist.sync_bn import wanted

    ref = config.load(REPO / "configs" / "flowers_resnet18.yaml")
    cfg = config.load(REPO / "configs" / "flowers_resnet18_8gpu.yaml")
    assert cfg.data == ref.data and cfg.model.name == ref.model.name and cfg.train.epochs == ref.train.epochs
    assert (cfg.optim.schedule, cfg.optim.step_size, cfg.optim.gamma, cfg.optim.momentum) == ("step", 7, 0.1, 0.9)
    assert cfg.train.batch_split(8) == (32, 1) and cfg.train.batch_split(4) == (32, 2)
    assert base_lr(cfg.optim, cfg.train.global_batch_size) == pytest.approx(8e-3)
    assert not wanted(cfg.model.sync_bn, 32, 8)[0]


def _choice_keys() -> list[tuple[str, str]]:
    """(section.key, choice) for every enumerated (Literal) key of every config section, found by walking the dataclasses."""
    found = []
    for section in dataclasses.fields(config.Config):
        hints = typing.get_type_hints(section.type if isinstance(section.type, type) else getattr(config, section.type))
        for key, hint in hints.items():
            if typing.get_origin(hint) is typing.Literal:
                found += [(f"{section.name}.{key}", choice) for choice in typing.get_args(hint)]
    return found


def test_the_walk_finds_the_choice_keys():
    keys = {key for key, _ in _choice_keys()}
    assert {"train.mixed_precision", "model.sync_bn", "data.loader", "tracking.wandb"} <= keys and len(keys) >= 8
    assert ("train.mixed_precision", "no") in _choice_keys() and ("model.sync_bn", "off") in _choice_keys()


@pytest.mark.parametrize("key, choice", _choice_keys())
def test_every_choice_is_accepted_as_typed(tmp_path, key, choice):
    section, name = key.split(".")
    assert getattr(getattr(config.load(None, [f"{key}={choice}"]), section), name) == choice
    (tmp_path / "c.yaml").write_text(f"{section}:\n  {name}: {choice}\n")  # unquoted, as a user writes it
    cfg = config.load(tmp_path / "c.yaml")
    assert getattr(getattr(cfg, section), name) == choice
    config.dump(cfg, tmp_path / "back.yaml")
    assert config.load(tmp_path / "back.yaml") == cfg


@pytest.mark.parametrize(
    "typed, value",
    [
        ("true", True),
        ("false", False),
        ("yes", True),
        ("no", False),
        ("on", True),
        ("off", False),
        ("True", True),
        ("OFF", False),
    ],
)
def test_boolean_keys_take_yaml_1_1_spellings(tmp_path, typed, value):
    assert config.load(None, [f"model.channels_last={typed}"]).model.channels_last is value
    (tmp_path / "c.yaml").write_text(f"data:\n  check: {typed}\n")
    assert config.load(tmp_path / "c.yaml").data.check is value


def test_string_keys_keep_yes_and_no_as_typed():
    assert config.load(None, ["train.name=no"]).train.name == "no"
    with pytest.raises(ConfigError, match="'train.mixed_precision': must be one of no, bf16, fp16; got False"):
        config.load(None, ["train.mixed_precision=false"])


def test_sync_bn_on_and_off_survive_yaml(tmp_path):
    assert config.load(None, ["model.sync_bn=on"]).model.sync_bn == "on"  # YAML reads on as true
    assert config.load(None, ["model.sync_bn=off"]).model.sync_bn == "off"
    (tmp_path / "c.yaml").write_text("model:\n  sync_bn: on\n")
    cfg = config.load(tmp_path / "c.yaml")
    config.dump(cfg, tmp_path / "back.yaml")
    assert config.load(tmp_path / "back.yaml").model.sync_bn == "on"
    with pytest.raises(ConfigError, match="'train.mixed_precision': must be one of"):
        config.load(None, ["train.mixed_precision=true"])


@pytest.mark.parametrize("typed, value", [("5e-4", 5e-4), ("1E-3", 1e-3), ("+2.5e-2", 0.025), ("5.0e-4", 5e-4)])
def test_an_exponent_without_a_decimal_point_is_a_number(tmp_path, typed, value):
    # YAML 1.1 (PyYAML) reads 5e-4 as text, which the typed config refused as "must be a number".
    assert config.load(None, [f"optim.weight_decay={typed}"]).optim.weight_decay == value
    (tmp_path / "c.yaml").write_text(f"optim:\n  lr: {typed}\n")
    assert config.load(tmp_path / "c.yaml").optim.lr == value
    assert config.load(None, ["train.name=1e3"]).train.name == "1e3"  # a text key keeps what was typed
