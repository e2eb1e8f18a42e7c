"""What resuming rests on, without a training run: which config changes a resume accepts, the record of each resume,
W&B's step offset, checkpoints written whole (also in the background), the fp16 loss scale.

The resumes themselves, run end to end, are in test_resume.py.
"""

import json

import pytest
import torch
from conftest import REPO

from flowers_dist import checkpoint_file, config, resume_check
from flowers_dist.checkpointing import CheckpointManager, Progress
from flowers_dist.errors import ConfigError
from flowers_dist.tracking import step_offset


def _cfg(*overrides):
    # The step schedule unless a test asks for another: train.epochs changes a cosine run's rates.
    return config.load(
        REPO / "configs" / "quickstart.yaml", ["optim.schedule=step", "train.epochs=8", *overrides]
    ).to_dict()


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.name=resnet34", "model.name"),
        ("train.global_batch_size=16", "train.global_batch_size"),
        ("optim.lr=0.1", "optim.lr"),
        ("data.loader=dali", "data.loader"),
        ("train.mixed_precision=bf16", "train.mixed_precision"),
        ("model.sync_bn=on", "model.sync_bn"),
        ("train.grad_accum_steps=2", "train.grad_accum_steps"),
        ("train.seed=1", "train.seed"),
    ],
)
def test_a_change_to_the_result_is_refused_with_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^config key '{key}' changes what the resumed run computes .*--force"):
        resume_check.check(_cfg(), _cfg(override), force=False)
    assert key in resume_check.check(_cfg(), _cfg(override), force=True)


def test_harmless_changes_pass_and_epochs_only_outside_cosine():
    found = resume_check.check(
        _cfg(),
        _cfg("train.epochs=20", "train.log_every=1", "data.num_workers=2", "tracking.wandb=offline"),
        force=False,
    )
    assert found["train.epochs"] == (8, 20) and set(found) == {
        "train.epochs",
        "train.log_every",
        "data.num_workers",
        "tracking.wandb",
    }
    assert resume_check.check(_cfg(), _cfg(), force=False) == {}
    with pytest.raises(ConfigError, match="'train.epochs'"):
        resume_check.check(_cfg("optim.schedule=cosine"), _cfg("optim.schedule=cosine", "train.epochs=20"), force=False)


def test_each_resume_is_recorded_beside_the_config(tmp_path):
    resume_check.record(tmp_path, ["train.epochs=20"], {"train.epochs": (8, 20)}, False, 8, 2)
    resume_check.record(tmp_path, ["optim.lr=0.1"], {"optim.lr": (0.001, 0.1)}, True, 20, 1)
    lines = [json.loads(line) for line in (tmp_path / "resumes.jsonl").read_text().splitlines()]
    assert resume_check.previous_overrides(tmp_path) == ["train.epochs=20", "optim.lr=0.1"]
    assert resume_check.previous_overrides(tmp_path / "elsewhere") == []
    assert [(r["overrides"], r["changed"], r["forced"], r["from_epoch"]) for r in lines] == [
        (["train.epochs=20"], {"train.epochs": [8, 20]}, False, 8),
        (["optim.lr=0.1"], {"optim.lr": [0.001, 0.1]}, True, 20),
    ]


def test_wandb_steps_continue_past_the_highest_logged():
    # Killed in epoch 2 (5 steps an epoch) after logging step 13; the checkpoint is epoch 1's (step 10).
    first = [
        {"event": "start"},
        *({"event": "step", "step": s} for s in range(1, 14)),
        {"event": "epoch", "step": 5},
        {"event": "epoch", "step": 10},
    ]
    assert step_offset(first, 10) == 3  # the resumed step 11 is logged as W&B step 14
    assert step_offset(first[:11], 10) == 0  # killed right after the checkpoint: nothing to skip
    # A second kill after the resumed run logged steps 11-12 as 14-15 and its checkpoint at step 15 never landed.
    second = [
        *first,
        {"event": "resume"},
        {"event": "step", "step": 11, "wandb_step": 14},
        {"event": "step", "step": 12, "wandb_step": 15},
    ]
    assert step_offset(second, 10) == 5


def test_the_fp16_loss_scale_goes_into_the_checkpoint_and_back(tmp_path):
    # fp16 runs only on CUDA (Accelerate makes the GradScaler there); the manager's part is device-free.
    def scaler_at(scale):
        scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
        scaler.scale(torch.ones(()))  # the scale tensor exists from the first use
        scaler.update(new_scale=scale)
        return scaler

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = CheckpointManager(tmp_path, config.TrainConfig(), is_main=False)
    state = manager.state(
        model=model,
        optimizer=optimizer,
        progress=Progress(),
        rank_sums=[],
        loader_states=[None],
        world=1,
        config={},
        classes=[],
        scaler=scaler_at(512.0),
    )
    fresh = scaler_at(65536.0)
    manager.restore(state, model, optimizer, 0, 1, scaler=fresh)
    assert fresh.get_scale() == 512.0
    assert (
        manager.state(
            model=model,
            optimizer=optimizer,
            progress=Progress(),
            rank_sums=[],
            loader_states=[None],
            world=1,
            config={},
            classes=[],
        )["scaler"]
        is None
    )  # fp32 and bf16 runs have none


def test_every_harmless_key_exists():
    assert resume_check.HARMLESS <= set(resume_check._flat(config.Config().to_dict()))


def test_atomic_save_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "ck" / "last.pt"
    checkpoint_file.atomic_save({"format": checkpoint_file.FORMAT, "epoch": 1}, target)

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_file.os, "fsync", failing_fsync)  # the bytes are written, making them durable fails
    with pytest.raises(checkpoint_file.DiskError, match=r"cannot write checkpoint .*last.pt: No space left on device"):
        checkpoint_file.atomic_save({"format": checkpoint_file.FORMAT, "epoch": 2}, target, tmp_path / "ck" / "best.pt")
    monkeypatch.undo()
    assert checkpoint_file.load(target)["epoch"] == 1
    assert [p.name for p in target.parent.iterdir()] == ["last.pt"]


def test_background_writer_saves_the_state_as_it_was_at_save(tmp_path):
    writer = checkpoint_file.BackgroundWriter()
    weights = torch.arange(1_000_000, dtype=torch.float32)  # big enough that the write outlasts the next line
    state = {
        "format": checkpoint_file.FORMAT,
        "epoch": 3,
        "model": {"w": weights},
        "optimizer": {"state": [weights * 2]},
    }
    writer.save(state, [tmp_path / "last.pt", tmp_path / "best.pt"])
    weights.zero_()  # the loop goes on updating its tensors while the thread writes
    writer.wait()
    for name in ("last.pt", "best.pt"):
        saved = checkpoint_file.load(tmp_path / name)
        assert saved["epoch"] == 3
        assert torch.equal(saved["model"]["w"], torch.arange(1_000_000, dtype=torch.float32))
        assert torch.equal(saved["optimizer"]["state"][0], torch.arange(1_000_000, dtype=torch.float32) * 2)
    # A second save waits for the first, so the newest state is the one left on disk.
    writer.save({**state, "epoch": 4}, [tmp_path / "last.pt"])
    writer.save({**state, "epoch": 5}, [tmp_path / "last.pt"])
    writer.wait()
    assert checkpoint_file.load(tmp_path / "last.pt")["epoch"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_a_failed_background_write_is_raised_in_the_training_thread(tmp_path):
    (tmp_path / "not_a_folder").write_text("x")
    writer = checkpoint_file.BackgroundWriter()
    writer.save({"format": checkpoint_file.FORMAT}, [tmp_path / "not_a_folder" / "last.pt"])
    with pytest.raises(checkpoint_file.CheckpointError, match="writing a checkpoint failed"):
        writer.wait()
    writer.wait()  # reported once
