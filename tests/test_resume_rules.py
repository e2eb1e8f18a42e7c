"""--resume on the command line: refusals of result-changing overrides, resumes.jsonl, W&B's step axis after a resume."""

import json
import shutil

from flowers_dist.tracking_reader import read_run

from conftest import TINY, cli, metrics

RUN = ["train", "--config", "configs/quickstart.yaml", *TINY, "data.loader=torch", "train.max_steps_per_epoch=2", "train.log_every=1"]


def test_resume_refuses_result_changes_and_keeps_the_original_config(tmp_path):
    cli([*RUN, "train.epochs=1", f"train.output_dir={tmp_path}", "train.name=r"])
    run = tmp_path / "r"
    original = (run / "config.yaml").read_text()
    refused = cli(["train", "--resume", str(run), "model.name=resnet34"], check=False)
    assert refused.returncode == 2 and refused.stdout.strip() == ""
    assert refused.stderr.strip().splitlines() == [
        "flowers-dist: error: config key 'model.name' changes what the resumed run computes "
        "('resnet18.tv_in1k' -> 'resnet34'); start a new run, or pass --force to resume with it anyway"]
    misfit = cli(["train", "--resume", str(run), "--force", "model.name=resnet34"], check=False)
    assert misfit.returncode == 2 and len(misfit.stderr.strip().splitlines()) == 1
    assert "does not fit this config (model.name=resnet34): " in misfit.stderr
    cli(["train", "--resume", str(run), "--force", "optim.lr=0.002", "train.epochs=2"])
    cli(["train", "--resume", str(run), "train.epochs=3", "train.log_every=2"])
    assert (run / "config.yaml").read_text() == original
    resumes = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    # One line per resume that ran (the misfit stopped before it started).
    assert [r["overrides"] for r in resumes] == [["optim.lr=0.002", "train.epochs=2"], ["train.epochs=3", "train.log_every=2"]]
    assert resumes[0]["forced"] and resumes[0]["changed"] == {"optim.lr": [0.001, 0.002], "train.epochs": [1, 2]}
    assert resumes[1]["changed"] == {"train.epochs": [2, 3], "train.log_every": [1, 2]} and not resumes[1]["forced"]
    assert resumes[1]["from_epoch"] == 2
    assert [r["lr"] for r in metrics(run) if r["event"] == "epoch"] == [0.001, 0.002, 0.002]
    # Without overrides the run continues with what the last resume set (epochs 3: complete), not config.yaml's 1.
    again = cli(["train", "--resume", str(run)])
    assert "run already complete (3 of 3 epochs)" in again.stdout
    assert [r["epoch"] for r in metrics(run) if r["event"] == "epoch"] == [0, 1, 2]


def test_wandb_steps_keep_increasing_when_a_resume_retrains_logged_steps(tmp_path):
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": None, "HOME": str(tmp_path), "NETRC": str(tmp_path / "none"),
           "WANDB_BASE_URL": "http://127.0.0.1:9"}
    run = tmp_path / "w"
    cli([*RUN, "train.epochs=1", "tracking.wandb=offline", f"train.output_dir={tmp_path}", "train.name=w"], env=env)
    epoch0 = tmp_path / "epoch0.pt"
    shutil.copy(run / "checkpoints" / "last.pt", epoch0)
    cli(["train", "--resume", str(run), "train.epochs=2"], env=env)  # logs steps 3 and 4
    # As if the run had been killed after logging epoch 1 but before its checkpoint landed.
    shutil.copy(epoch0, run / "checkpoints" / "last.pt")
    cli(["train", "--resume", str(run), "train.epochs=2"], env=env)  # trains, and logs, steps 3 and 4 again
    sessions = sorted((p for p in (run / "wandb").iterdir() if p.name.startswith("offline-run-")), key=lambda p: p.name)
    assert len(sessions) == 3
    steps = [row["_step"] for s in sessions for row in read_run(next(s.glob("run-*.wandb")))["history"]]
    assert steps == [1, 2, 3, 4, 5, 6], steps  # W&B drops a row whose step is not above the highest it has seen
    last = [r for r in metrics(run) if r["event"] == "step"][-2:]
    assert [(r["step"], r["wandb_step"]) for r in last] == [(3, 5), (4, 6)]
