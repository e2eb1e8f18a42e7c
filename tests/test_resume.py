"""Runs that stop, by design or by SIGKILL, resume to exactly the weights of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from flowers_dist import checkpoint
from flowers_dist.data import dali_status

from conftest import REPO, TINY, cli, metrics

# A resumed run is bit-identical to an uninterrupted one: the PyTorch loader's order and augmentation
# are pure functions of (seed, epoch, file); DALI's reader and random state are saved per rank.
RUN = ["train", "--config", "configs/quickstart.yaml", *TINY, "train.max_steps_per_epoch=2"]


def _weights(run_dir):
    return checkpoint.load(run_dir / "checkpoints" / "last.pt")


@pytest.mark.parametrize("loader", ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_status()[0], reason="DALI not installed"))])
def test_resume_matches_uninterrupted_run(tmp_path, loader):
    run = [*RUN, f"data.loader={loader}"]
    cli([*run, "train.epochs=4", f"train.output_dir={tmp_path}", "train.name=full"])
    cli([*run, "train.epochs=2", f"train.output_dir={tmp_path}", "train.name=part"])
    assert _weights(tmp_path / "part")["epoch"] == 1
    cli(["train", "--resume", str(tmp_path / "part"), "train.epochs=4"])

    full, resumed = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert resumed["epoch"] == full["epoch"] == 3
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    events = [r["event"] for r in metrics(tmp_path / "part")]
    assert events.count("resume") == 1 and events.count("epoch") == 4
    epochs = [r for r in metrics(tmp_path / "part") if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2, 3]
    # Run time counts on after the resume instead of restarting at zero.
    assert all(a["elapsed"] < b["elapsed"] for a, b in zip(epochs, epochs[1:]))


def test_killed_run_keeps_a_loadable_checkpoint_and_resumes(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "flowers_dist", *RUN, "data.loader=torch", "train.epochs=50", f"train.output_dir={tmp_path}", "train.name=k"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "k"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").exists() and sum(r["event"] == "epoch" for r in metrics(run)) >= 2:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    state = _weights(run)  # whatever moment the kill hit, last.pt is complete
    # The kill may land between an epoch's metrics line and its checkpoint: then that epoch is redone.
    assert 0 <= state["epoch"] < 49
    for record in metrics(run):  # every line written is whole
        assert "event" in record
    assert any(r["event"] == "step" for r in metrics(run)) and not any(r["event"] == "end" for r in metrics(run))
    cli(["train", "--resume", str(run), f"train.epochs={state['epoch'] + 2}"])
    assert _weights(run)["epoch"] == state["epoch"] + 1
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert not [n for n in names if n.startswith(".")], f"a killed write's temporary file was left behind: {names}"
    assert {"best.pt", "last.pt"} <= set(names)
    resume = [r for r in metrics(run) if r["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["from_epoch"] == state["epoch"] + 1


def test_atomic_save_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "ck" / "last.pt"
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "epoch": 1}, target)

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", failing_fsync)  # the bytes are written, making them durable fails
    with pytest.raises(checkpoint.DiskError, match=r"cannot write checkpoint .*last.pt: No space left on device"):
        checkpoint.atomic_save({"format": checkpoint.FORMAT, "epoch": 2}, target, tmp_path / "ck" / "best.pt")
    monkeypatch.undo()
    assert checkpoint.load(target)["epoch"] == 1
    assert [p.name for p in target.parent.iterdir()] == ["last.pt"]


def test_background_writer_saves_the_state_as_it_was_at_save(tmp_path):
    writer = checkpoint.BackgroundWriter()
    weights = torch.arange(1_000_000, dtype=torch.float32)  # big enough that the write outlasts the next line
    state = {"format": checkpoint.FORMAT, "epoch": 3, "model": {"w": weights}, "optimizer": {"state": [weights * 2]}}
    writer.save(state, [tmp_path / "last.pt", tmp_path / "best.pt"])
    weights.zero_()  # the loop goes on updating its tensors while the thread writes
    writer.wait()
    for name in ("last.pt", "best.pt"):
        saved = checkpoint.load(tmp_path / name)
        assert saved["epoch"] == 3
        assert torch.equal(saved["model"]["w"], torch.arange(1_000_000, dtype=torch.float32))
        assert torch.equal(saved["optimizer"]["state"][0], torch.arange(1_000_000, dtype=torch.float32) * 2)
    # A second save waits for the first, so the newest state is the one left on disk.
    writer.save({**state, "epoch": 4}, [tmp_path / "last.pt"])
    writer.save({**state, "epoch": 5}, [tmp_path / "last.pt"])
    writer.wait()
    assert checkpoint.load(tmp_path / "last.pt")["epoch"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_a_failed_background_write_is_raised_in_the_training_thread(tmp_path):
    (tmp_path / "not_a_folder").write_text("x")
    writer = checkpoint.BackgroundWriter()
    writer.save({"format": checkpoint.FORMAT}, [tmp_path / "not_a_folder" / "last.pt"])
    with pytest.raises(checkpoint.CheckpointError, match="writing a checkpoint failed"):
        writer.wait()
    writer.wait()  # reported once


def _flip_byte(path, offset_from_end=4096):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_one_line_in_every_command(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ck = run / "checkpoints" / "best.pt"
    images = str(REPO / "data" / "flowers_sample" / "val")
    damaged = {"flipped": lambda p: _flip_byte(p), "zero": lambda p: p.write_bytes(b""),
               "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])}
    expected = {"flipped": "is corrupt: its SHA-256 does not match", "zero": "is empty (0 bytes)", "truncated": "is truncated"}
    for kind, damage in damaged.items():
        bad = tmp_path / f"{kind}.pt"
        shutil.copy(ck, bad)
        damage(bad)
        for command in (["eval", str(bad), "--data", images], ["predict", str(bad), images]):
            proc = cli(command, check=False)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and lines[-1].startswith("flowers-dist: error: checkpoint"), (kind, command, proc.stderr[-2000:])
            assert expected[kind] in lines[-1] and "Traceback" not in proc.stderr, (kind, lines[-1])


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path):
    run = [*RUN, "data.loader=torch", "train.epochs=2", f"train.output_dir={tmp_path}", "train.name=fb"]
    cli(run)
    ck = tmp_path / "fb" / "checkpoints"
    step_files = sorted(ck.glob("step-*.pt"))
    assert [p.name for p in step_files] == ["step-00000002.pt", "step-00000004.pt"]
    # last.pt is a link of the newest step file: replace it by a truncated copy, and damage that step file too.
    data = (ck / "last.pt").read_bytes()
    (ck / "last.pt").unlink()
    (ck / "last.pt").write_bytes(data[: len(data) - 1000])
    _flip_byte(step_files[1])
    proc = cli([*run[:-2], "train.epochs=3", f"train.output_dir={tmp_path}", "train.name=fb"])
    assert "last.pt is truncated" in proc.stdout and "step-00000004.pt is corrupt" in proc.stdout, proc.stdout
    assert "resuming from step-00000002.pt instead" in proc.stdout
    resume = [r for r in metrics(tmp_path / "fb") if r["event"] == "resume"]
    assert resume[0]["from_epoch"] == 1 and resume[0]["from_step"] == 0
    assert checkpoint.load(ck / "last.pt")["epoch"] == 2


def test_an_explicit_resume_of_a_folder_without_checkpoints_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.yaml").write_text((REPO / "configs" / "quickstart.yaml").read_text())
    proc = cli(["train", "--resume", str(tmp_path / "empty"), *TINY], check=False)
    assert proc.returncode == 2 and "cannot resume" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    never = cli([*RUN, "data.loader=torch", "train.resume=never", f"train.output_dir={tmp_path}", "train.name=empty"], check=False)
    assert never.returncode == 2 and "already exists and train.resume=never" in never.stderr, never.stderr[-2000:]
