"""W&B streaming (offline, read back from the run file), the local record, and `flowers-dist report`."""

import json
import shutil
import time

import pytest
from conftest import TINY, cli, metrics
from wandb_offline import read_run

from flowers_dist import config
from flowers_dist.config import ConfigError
from flowers_dist.tracking import resolve_mode

PNGS = ["loss.png", "accuracy.png", "lr.png", "throughput.png", "confusion.png"]


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """A 2-process run with tracking.wandb=auto, no credentials and no network: it must go offline, not hang."""
    out = tmp_path_factory.mktemp("wb")
    home = out / "home"
    home.mkdir()
    env = {
        "WANDB_MODE": None,
        "WANDB_API_KEY": None,
        "WANDB_DIR": None,
        "NETRC": str(home / "no-netrc"),
        "HOME": str(home),
        "WANDB_BASE_URL": "http://127.0.0.1:9",
    }  # were it to try the network, nothing answers there
    started = time.perf_counter()
    proc = cli(
        [
            "train",
            "--config",
            "configs/quickstart.yaml",
            *TINY,
            "train.epochs=2",
            "train.max_steps_per_epoch=3",
            "train.log_every=2",
            "tracking.wandb=auto",
            "tracking.tags=[ci, tiny]",
            f"train.output_dir={out}",
            "train.name=wb",
        ],
        nprocs=2,
        env=env,
        timeout=240,
    )
    return out / "wb", proc, time.perf_counter() - started


@pytest.mark.e2e
def test_offline_run_streams_config_history_and_summary(offline_run):
    run, proc, seconds = offline_run
    assert "W&B is offline" in proc.stdout and "wandb sync" in proc.stdout
    assert seconds < 240
    wandb_runs = [p for p in (run / "wandb").iterdir() if p.is_dir() and p.name.startswith("offline-run-")]
    assert len(wandb_runs) == 1, wandb_runs
    files = list(wandb_runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    logged = read_run(files[0])

    cfg = logged["config"]
    assert cfg["train"]["max_steps_per_epoch"] == 3 and cfg["tracking"]["tags"] == ["ci", "tiny"]
    assert cfg["environment"]["world_size"] == 2 and cfg["environment"]["torch"] and "git_commit" in cfg["environment"]

    records = metrics(run)
    local = [r for r in records if r["event"] in ("step", "epoch")]
    history = logged["history"]
    steps = [row["_step"] for row in history]
    assert steps == sorted(set(steps)), "W&B _step must increase strictly"
    # A step row and the epoch row at the same optimizer step merge into one W&B row.
    assert steps == sorted({r["step"] for r in local})
    assert sum(r["event"] == "step" for r in records) == 4 and sum(r["event"] == "epoch" for r in records) == 2
    for row in history:
        assert {
            "train/loss",
            "train/lr",
            "perf/images_per_s",
            "perf/images_per_s_per_process",
            "perf/step_time",
            "perf/data_wait_fraction",
        } <= row.keys()
        assert row["perf/images_per_s"] > 0 and 0 <= row["perf/data_wait_fraction"] <= 1
    epoch_rows = [row for row in history if "val/accuracy" in row]
    assert len(epoch_rows) == 2
    for row, rec in zip(epoch_rows, [r for r in records if r["event"] == "epoch"]):
        assert row["val/accuracy"] == pytest.approx(rec["val_acc"]) and row["train/accuracy"] == pytest.approx(
            rec["train_acc"]
        )
        assert row["val/accuracy_roses"] == pytest.approx(rec["val_per_class"]["roses"])
        assert any(k.startswith("val/confusion") for k in row)
        assert sum(map(sum, rec["val_confusion"])) == 23

    end = records[-1]
    assert end["event"] == "end" and "time_to_target" in end
    assert logged["summary"]["run/best_val_acc"] == pytest.approx(end["best_val_acc"])
    assert logged["summary"]["run/best_epoch"] == end["best_epoch"]
    assert logged["summary"]["data/skipped"] == next(r for r in records if r["event"] == "data_check")["skipped"] == 0


def _check_report(run, proc):
    for name in PNGS:
        data = (run / "report" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    summary = (run / "report" / "summary.txt").read_text()
    assert "best val accuracy" in summary and summary in proc.stdout
    return summary


@pytest.mark.e2e
def test_report_on_finished_and_killed_runs(offline_run, tmp_path):
    run = offline_run[0]
    assert "status: finished" in _check_report(run, cli(["report", str(run)]))

    # A run killed in epoch 2: metrics end mid-line after the first epoch record, and no `end`.
    killed = tmp_path / "killed"
    killed.mkdir()
    for name in ("classes.json", "config.yaml"):
        shutil.copy(run / name, killed / name)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    first_epoch = next(i for i, line in enumerate(lines) if json.loads(line)["event"] == "epoch")
    (killed / "metrics.jsonl").write_text("".join(lines[: first_epoch + 2]) + lines[first_epoch + 2][:40])
    summary = _check_report(killed, cli(["report", str(killed)]))
    assert "unfinished" in summary and "epochs recorded: 1" in summary


def test_tracking_config_is_strict_and_typed():
    cfg = config.load(None, ["tracking.tags=[a, b]", "tracking.wandb=offline", "tracking.target_accuracy=0.5"])
    assert cfg.tracking.tags == ("a", "b") and cfg.to_dict()["tracking"]["tags"] == ["a", "b"]
    with pytest.raises(ConfigError, match=r"'tracking\.wandb'"):
        config.load(None, ["tracking.wandb=maybe"])
    with pytest.raises(ConfigError, match=r"'tracking\.tags'"):
        config.load(None, ["tracking.tags=solo"])
    with pytest.raises(ConfigError, match=r"'tracking\.target_accuracy'"):
        config.load(None, ["tracking.target_accuracy=92"])
    with pytest.raises(ConfigError, match=r"'tracking\.projekt' is unknown"):
        config.load(None, ["tracking.projekt=x"])


def test_auto_mode_follows_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    auto = config.load(None).tracking
    assert resolve_mode(auto) == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / "netrc").chmod(0o600)
    assert resolve_mode(auto) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode(auto) == "disabled"
    assert resolve_mode(config.load(None, ["tracking.wandb=offline"]).tracking) == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_mode(auto) == "offline"


@pytest.mark.e2e
def test_a_wandb_mode_that_wandb_rejects_is_one_line_before_the_run(tmp_path, monkeypatch):
    # W&B's own settings refuse these even when init is given a mode (a pydantic traceback, seen with WANDB_MODE=).
    message = "WANDB_MODE={!r} is not a W&B mode: unset it, or set it to one of online, run, shared, offline, dryrun, disabled"
    for value in ("", "Offline", "off"):
        monkeypatch.setenv("WANDB_MODE", value)
        for wandb in ("auto", "online", "offline"):
            with pytest.raises(ConfigError) as refused:
                resolve_mode(config.load(None, [f"tracking.wandb={wandb}"]).tracking)
            assert str(refused.value) == message.format(value)
        # tracking.wandb=disabled never starts W&B, so the variable does not matter.
        assert resolve_mode(config.load(None, ["tracking.wandb=disabled"]).tracking) == "disabled"
    # As a user meets it: one line, exit 2, before the run has a folder; and a disabled run trains.
    proc = cli(
        [
            "train",
            "--config",
            "configs/quickstart.yaml",
            *TINY,
            "tracking.wandb=offline",
            f"train.output_dir={tmp_path}",
        ],
        env={"WANDB_MODE": ""},
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("flowers-dist: error:")]
    assert errors == ["flowers-dist: error: " + message.format("")], proc.stderr[-2000:]
    assert not any(tmp_path.iterdir()), "a refused run left a folder behind"
    ok = cli(
        [
            "train",
            "--config",
            "configs/quickstart.yaml",
            *TINY,
            "tracking.wandb=disabled",
            "train.epochs=1",
            "train.max_steps_per_epoch=1",
            f"train.output_dir={tmp_path}",
        ],
        env={"WANDB_MODE": ""},
    )
    assert ok.returncode == 0


@pytest.mark.e2e
def test_resume_continues_the_same_wandb_run(tmp_path):
    run = tmp_path / "r"
    args = [
        "train",
        "--config",
        "configs/quickstart.yaml",
        *TINY,
        "train.max_steps_per_epoch=2",
        "train.log_every=1",
        "tracking.wandb=offline",
        "data.loader=torch",
        f"train.output_dir={tmp_path}",
        "train.name=r",
    ]
    cli([*args, "train.epochs=1"])
    cli(["train", "--resume", str(run), "train.epochs=2"])
    run_id = (run / "wandb_run_id").read_text().strip()
    # What each attempt really wrote to W&B: its own offline folder (named by time), read back from the log.
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2, files
    first, second = (read_run(f) for f in files)
    assert first["run_id"] == second["run_id"] == run_id
    # One optimizer-step axis across both attempts: steps 1-2 (epoch 0), then 3-4 (epoch 1), no restart at 0.
    steps = [sorted({row["_step"] for row in r["history"]}) for r in (first, second)]
    assert steps == [[1, 2], [3, 4]], steps
    assert [row["epoch"] for row in second["history"] if "val/accuracy" in row] == [1]
    assert [row["epoch"] for row in first["history"] if "val/accuracy" in row] == [0]
