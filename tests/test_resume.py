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
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"], "a killed write's temporary file was left behind"
    resume = [r for r in metrics(run) if r["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["from_epoch"] == state["epoch"] + 1


def test_atomic_save_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "ck" / "last.pt"
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "epoch": 1}, target)

    def broken_save(obj, fh):
        fh.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    try:
        checkpoint.atomic_save({"format": checkpoint.FORMAT, "epoch": 2}, target)
    except OSError:
        pass
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
