"""Resumes end to end: runs that stop, by design or by SIGKILL, resume to exactly the weights of an uninterrupted run;
a damaged checkpoint is one line or a fallback; --resume refuses result-changing overrides; W&B's steps keep rising.

Every test here starts training processes; the rules they rest on are unit-tested in test_resume_rules.py.
"""

import json
import shutil
import signal

import pytest
from conftest import REPO, TINY, assert_same_final_weights, assert_whole_lines, cli, last_checkpoint, metrics
from procs import kill, launch, wait_for
from wandb_offline import read_run

from flowers_dist.data import dali_status
from flowers_dist.metrics_log import events

pytestmark = pytest.mark.e2e

# A resumed run is bit-identical to an uninterrupted one: the PyTorch loader's order and augmentation
# are pure functions of (seed, epoch, file); DALI's reader and random state are saved per rank.
RUN = ["train", "--config", "configs/quickstart.yaml", *TINY, "train.max_steps_per_epoch=2"]
# A `step` row per step, for the tests that follow W&B's step axis.
LOGGED = [*RUN, "data.loader=torch", "train.log_every=1"]


@pytest.mark.parametrize(
    "loader",
    ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_status()[0], reason="DALI not installed"))],
)
def test_resume_matches_uninterrupted_run(tmp_path, loader):
    run = [*RUN, f"data.loader={loader}"]
    cli([*run, "train.epochs=4", f"train.output_dir={tmp_path}", "train.name=full"])
    cli([*run, "train.epochs=2", f"train.output_dir={tmp_path}", "train.name=part"])
    cli(["train", "--resume", str(tmp_path / "part"), "train.epochs=4"])

    assert_same_final_weights(tmp_path / "full", tmp_path / "part")
    records = metrics(tmp_path / "part")
    resume = events(records, "resume")
    # The resume starts at epoch 2: the checkpoint the 2-epoch run left is epoch 1's.
    assert len(resume) == 1 and (resume[0]["from_epoch"], resume[0]["from_step"]) == (2, 0), resume
    epochs = events(records, "epoch")
    assert [r["epoch"] for r in epochs] == [0, 1, 2, 3]
    # Run time counts on after the resume instead of restarting at zero.
    assert all(a["elapsed"] < b["elapsed"] for a, b in zip(epochs, epochs[1:]))


def test_killed_run_keeps_a_loadable_checkpoint_and_resumes(tmp_path):
    run = tmp_path / "k"
    proc, tag = launch([*RUN, "data.loader=torch", "train.epochs=50", f"train.output_dir={tmp_path}", "train.name=k"])
    try:
        wait_for(run, lambda records: len(events(records, "epoch")) >= 2, proc, timeout=240)
    finally:
        kill(proc, tag)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    state = last_checkpoint(run)  # whatever moment the kill hit, last.pt is complete
    # The kill may land between an epoch's metrics line and its checkpoint: then that epoch is redone.
    assert 0 <= state["epoch"] < 49
    assert_whole_lines(run)  # every line written is whole
    assert events(metrics(run), "step") and not events(metrics(run), "end")
    cli(["train", "--resume", str(run), f"train.epochs={state['epoch'] + 2}"])
    assert last_checkpoint(run)["epoch"] == state["epoch"] + 1
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert not [n for n in names if n.startswith(".")], f"a killed write's temporary file was left behind: {names}"
    assert {"best.pt", "last.pt"} <= set(names)
    resume = events(metrics(run), "resume")
    assert len(resume) == 1 and resume[0]["from_epoch"] == state["epoch"] + 1


def _flip_byte(path, offset_from_end=4096):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_one_line_in_every_command(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ck = run / "checkpoints" / "best.pt"
    images = str(REPO / "data" / "flowers_sample" / "val")
    damaged = {
        "flipped": lambda p: _flip_byte(p),
        "zero": lambda p: p.write_bytes(b""),
        "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    }
    expected = {
        "flipped": "is corrupt: its SHA-256 does not match",
        "zero": "is empty (0 bytes)",
        "truncated": "is truncated",
    }
    for kind, damage in damaged.items():
        bad = tmp_path / f"{kind}.pt"
        shutil.copy(ck, bad)
        damage(bad)
        for command in (["eval", str(bad), "--data", images], ["predict", str(bad), images]):
            proc = cli(command, check=False)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and lines[-1].startswith("flowers-dist: error: checkpoint"), (
                kind,
                command,
                proc.stderr[-2000:],
            )
            assert expected[kind] in lines[-1] and "Traceback" not in proc.stderr, (kind, lines[-1])


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path):
    run = [
        *RUN,
        "data.loader=torch",
        "model.name=test_resnet",
        "train.epochs=2",
        f"train.output_dir={tmp_path}",
        "train.name=fb",
    ]
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
    resume = events(metrics(tmp_path / "fb"), "resume")
    assert resume[0]["from_epoch"] == 1 and resume[0]["from_step"] == 0
    assert last_checkpoint(tmp_path / "fb")["epoch"] == 2


def test_an_explicit_resume_of_a_folder_without_checkpoints_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.yaml").write_text((REPO / "configs" / "quickstart.yaml").read_text())
    proc = cli(["train", "--resume", str(tmp_path / "empty"), *TINY], check=False)
    assert proc.returncode == 2 and "cannot resume" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    never = cli(
        [*RUN, "data.loader=torch", "train.resume=never", f"train.output_dir={tmp_path}", "train.name=empty"],
        check=False,
    )
    assert never.returncode == 2 and "already exists and train.resume=never" in never.stderr, never.stderr[-2000:]


def test_resume_refuses_result_changes_and_keeps_the_original_config(tmp_path):
    cli([*LOGGED, "train.epochs=1", f"train.output_dir={tmp_path}", "train.name=r"])
    run = tmp_path / "r"
    original = (run / "config.yaml").read_text()
    refused = cli(["train", "--resume", str(run), "model.name=resnet34"], check=False)
    assert refused.returncode == 2 and refused.stdout.strip() == ""
    assert refused.stderr.strip().splitlines() == [
        "flowers-dist: error: config key 'model.name' changes what the resumed run computes "
        "('resnet18.tv_in1k' -> 'resnet34'); start a new run, or pass --force to resume with it anyway"
    ]
    misfit = cli(["train", "--resume", str(run), "--force", "model.name=resnet34"], check=False)
    assert misfit.returncode == 2 and len(misfit.stderr.strip().splitlines()) == 1
    assert "does not fit this config (model.name=resnet34): " in misfit.stderr
    cli(["train", "--resume", str(run), "--force", "optim.lr=0.002", "train.epochs=2"])
    cli(["train", "--resume", str(run), "train.epochs=3", "train.log_every=2"])
    assert (run / "config.yaml").read_text() == original
    resumes = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    # One line per resume that ran (the misfit stopped before it started).
    assert [r["overrides"] for r in resumes] == [
        ["optim.lr=0.002", "train.epochs=2"],
        ["train.epochs=3", "train.log_every=2"],
    ]
    assert resumes[0]["forced"] and resumes[0]["changed"] == {"optim.lr": [0.001, 0.002], "train.epochs": [1, 2]}
    assert resumes[1]["changed"] == {"train.epochs": [2, 3], "train.log_every": [1, 2]} and not resumes[1]["forced"]
    assert resumes[1]["from_epoch"] == 2
    assert [r["lr"] for r in metrics(run) if r["event"] == "epoch"] == [0.001, 0.002, 0.002]
    # Without overrides the run continues with what the last resume set (epochs 3: complete), not config.yaml's 1.
    again = cli(["train", "--resume", str(run)])
    assert "run already complete (3 of 3 epochs)" in again.stdout
    assert [r["epoch"] for r in metrics(run) if r["event"] == "epoch"] == [0, 1, 2]


def test_wandb_steps_keep_increasing_when_a_resume_retrains_logged_steps(tmp_path):
    env = {
        "WANDB_MODE": "offline",
        "WANDB_API_KEY": None,
        "HOME": str(tmp_path),
        "NETRC": str(tmp_path / "none"),
        "WANDB_BASE_URL": "http://127.0.0.1:9",
    }
    run = tmp_path / "w"
    cli([*LOGGED, "train.epochs=1", "tracking.wandb=offline", f"train.output_dir={tmp_path}", "train.name=w"], env=env)
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
