"""Checkpoints as W&B artifacts: aliases and metadata of a real checkpoint file, what each tracking.artifacts setting
logs, the writer's hand-over, eval/predict resolving an artifact name through W&B's cache, and a preempted run's
artifacts read back from its offline W&B file."""

import base64
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import wandb
from conftest import SAMPLE, TINY, inside_epoch, metrics, position
from procs import kill, launch, stopped_at, wait_for, workers
from wandb.sdk.artifacts.artifact_file_cache import get_artifact_file_cache
from wandb.sdk.artifacts.artifact_state import ArtifactState
from wandb_offline import read_run

from flowers_dist import artifacts, config
from flowers_dist.artifacts import Landed
from flowers_dist.checkpointing import CheckpointManager, Position, Progress
from flowers_dist.cli import main
from flowers_dist.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, CheckpointError
from flowers_dist.inference import load_trained
from flowers_dist.sinks import WandbSink

CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
CFG = config.load(None, ["model.name=test_resnet", "model.pretrained=none"])


def _md5_b64(path: Path) -> str:
    """W&B's digest of a file in a manifest: base64 of its MD5, computed here independently."""
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def _payload_sha256(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[data.index(b"\n") + 1 :]).hexdigest()


def _save(tmp_path: Path, position: Position, best: dict, is_best: bool) -> tuple[list[Path], dict]:
    """A real checkpoint of test_resnet through the CheckpointManager; returns what its on_landed hook was told."""
    from flowers_dist.model import build_model

    model = build_model(CFG.model, len(CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ckpt = CheckpointManager(tmp_path, CFG.train, is_main=True)
    told = []
    ckpt.on_landed = lambda paths, facts: told.append((paths, facts, all(p.is_file() for p in paths)))
    state = ckpt.state(
        model=model,
        optimizer=optimizer,
        progress=Progress(position, dict(best)),
        rank_sums=[[0.0, 0.0, 0.0]],
        loader_states=[None],
        world=1,
        config=CFG.to_dict(),
        classes=CLASSES,
    )
    ckpt.save(state, position.epoch * 5 + position.step, is_best)
    ckpt.wait()
    (paths, facts, landed_first) = told[0]
    assert landed_first, "on_landed ran before the files were on disk"
    return paths, facts


def test_a_best_checkpoint_gets_its_aliases_and_metadata(tmp_path):
    paths, facts = _save(tmp_path, Position(3, 0), {"val_acc": 0.75, "epoch": 2, "time_to_target": None}, True)
    assert [p.name for p in paths] == ["step-00000015.pt", "last.pt", "best.pt"]
    landed = Landed.of(paths, facts)
    assert artifacts.aliases(landed, uploaded=True) == ["best", "latest", "step-15", "epoch-3"]
    assert artifacts.aliases(landed, uploaded=False) == ["latest", "step-15", "epoch-3"]
    meta = artifacts.metadata(landed, "abc123")
    assert meta == {
        "val_acc": 0.75,
        "epoch": 3,
        "step": 15,
        "best_val_acc": 0.75,
        "best_epoch": 3,
        "classes": CLASSES,
        "config": CFG.to_dict(),
        "git_commit": "abc123",
        "sha256": _payload_sha256(tmp_path / "checkpoints" / "best.pt"),
    }
    assert json.loads(json.dumps(meta)) == meta  # W&B stores metadata as JSON


def test_a_mid_epoch_checkpoint_before_any_evaluation(tmp_path):
    paths, facts = _save(tmp_path, Position(0, 2), {"val_acc": -1.0, "epoch": -1, "time_to_target": None}, False)
    landed = Landed.of(paths, facts)
    assert landed.best_file is None and not landed.epoch_end
    assert artifacts.aliases(landed, uploaded=False) == ["latest", "step-2"]
    meta = artifacts.metadata(landed, None)
    assert "val_acc" not in meta and meta["best_val_acc"] is None and meta["epoch"] == 0
    assert artifacts.to_log(landed, "all") == [("checkpoint", False)]
    assert artifacts.to_log(landed, "best") == [] and artifacts.to_log(landed, "none") == []


class FakeRun:
    """What WandbSink asks of W&B's run: its id and log_artifact (W&B's own call is tested by the e2e run)."""

    id = "abcd1234"

    def __init__(self, fail: bool = False):
        self.logged, self.fail = [], fail

    def log_artifact(self, artifact, aliases):
        if self.fail:
            raise wandb.errors.CommError("the service process is busy")
        self.logged.append((artifact, aliases))


class FakeAccelerator:
    def __init__(self, run):
        self.run = run

    def get_tracker(self, name, unwrap):
        return self.run


@pytest.mark.parametrize("setting", ["none", "best", "all"])
def test_the_wandb_sink_logs_what_each_setting_asks(tmp_path, monkeypatch, setting):
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # W&B stages uploads there
    paths, facts = _save(tmp_path, Position(1, 0), {"val_acc": 0.5, "epoch": 0, "time_to_target": None}, True)
    run = FakeRun()
    cfg = config.load(None, [f"tracking.artifacts={setting}"]).tracking
    sink = WandbSink(FakeAccelerator(run), cfg, "offline", tmp_path, print)
    sink._git_commit = "abc123"
    sink.log_checkpoint(Landed.of(paths, facts))
    logged = {a.type: (a, aliases) for a, aliases in run.logged}
    assert sorted(logged) == {"none": [], "best": ["model"], "all": ["checkpoint", "model"]}[setting]
    step_file = tmp_path / "checkpoints" / "step-00000005.pt"
    if "model" in logged:
        model, aliases = logged["model"]
        entry = model.manifest.entries["best.pt"]
        assert model.name == "model-abcd1234" and aliases == ["best", "latest", "step-5", "epoch-1"]
        assert entry.ref is None and entry.digest == _md5_b64(step_file)
        # Uploaded from a staged copy: best.pt is replaced at the next best epoch, the copy stays as it was.
        assert Path(entry.local_path).read_bytes() == step_file.read_bytes() and Path(entry.local_path) != step_file
        assert model.metadata["sha256"] == _payload_sha256(step_file) and model.metadata["git_commit"] == "abc123"
    if "checkpoint" in logged:
        ref, aliases = logged["checkpoint"]
        entry = ref.manifest.entries["step-00000005.pt"]
        assert ref.name == "checkpoints-abcd1234" and aliases == ["latest", "step-5", "epoch-1"]
        assert entry.ref == step_file.resolve().as_uri() and entry.digest == _md5_b64(step_file)
        assert not entry.local_path  # nothing to upload


def test_a_wandb_failure_is_a_warning_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    paths, facts = _save(tmp_path, Position(1, 0), {"val_acc": 0.5, "epoch": 0, "time_to_target": None}, True)
    sink = WandbSink(FakeAccelerator(FakeRun(fail=True)), CFG.tracking, "offline", tmp_path, print)
    sink.log_checkpoint(Landed.of(paths, facts))
    assert capsys.readouterr().out.strip() == (
        "warning: W&B did not take step-00000005.pt as a model artifact: the service process is busy"
    )


# -- eval and predict: an artifact name back to a checkpoint file -----------------------------------
def test_which_arguments_are_artifact_names(tmp_path, monkeypatch):
    odd = tmp_path / "a:b"
    odd.write_bytes(b"")
    assert not artifacts.is_artifact_name(str(odd))  # an existing path is a path, colon or not
    assert not artifacts.is_artifact_name("runs/x/checkpoints/best.pt")
    assert not artifacts.is_artifact_name("model-abc")  # no alias or version
    assert not artifacts.is_artifact_name("a/b/c/model-abc:best")
    for name in ("model-abc:best", "proj/model-abc:v3", "team/proj/model-abc:epoch-2"):
        assert artifacts.is_artifact_name(name)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    assert artifacts.qualified("model-abc:best") == "flowers-dist/model-abc:best"
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    assert artifacts.qualified("model-abc:best") == "mine/model-abc:best"
    assert artifacts.qualified("team/proj/model-abc:best") == "team/proj/model-abc:best"


@pytest.fixture
def wandb_dirs(tmp_path, monkeypatch):
    """W&B's cache and download folders in tmp_path, and a server address where nothing answers."""
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_ARTIFACT_DIR", "downloads"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    return tmp_path


def _as_fetched(monkeypatch, artifact) -> list[str]:
    """Stand in for the one network call, `wandb.Api().artifact(name)`: it returns `artifact` as logged (committed).

    The rest is W&B's own code: the manifest entry's download looks the digest up in W&B's cache (or, for a
    reference, copies the file into it) and links or copies it under WANDB_ARTIFACT_DIR."""
    asked = []
    artifact._state = ArtifactState.COMMITTED

    class Api:
        def artifact(self, name, type=None):
            asked.append(name)
            return artifact

    monkeypatch.setattr(wandb, "Api", Api)
    return asked


@pytest.mark.parametrize("kind", ["model", "checkpoint"])
def test_eval_and_predict_resolve_an_artifact_through_wandbs_cache(wandb_dirs, monkeypatch, kind):
    tmp_path = wandb_dirs
    paths, facts = _save(tmp_path, Position(1, 0), {"val_acc": 0.5, "epoch": 0, "time_to_target": None}, True)
    landed = Landed.of(paths, facts)
    artifact = artifacts.build(landed, kind, "abcd1234", None)
    if kind == "model":  # an uploaded file: W&B's cache holds it by its MD5 (as after an earlier download)
        entry = artifact.manifest.entries["best.pt"]
        _, hit, opener = get_artifact_file_cache().check_digest_obj_path(entry.digest, entry.size)
        assert not hit
        with opener("wb") as fh:
            fh.write(landed.step_file.read_bytes())
    asked = _as_fetched(monkeypatch, artifact)
    name = f"{'model' if kind == 'model' else 'checkpoints'}-abcd1234:latest"
    found = artifacts.resolve(name)
    assert asked == [f"flowers-dist/{name}"]
    assert found.is_relative_to(tmp_path / "downloads") and found.read_bytes() == landed.step_file.read_bytes()
    _, cfg, classes = load_trained(name, torch.device("cpu"))
    assert classes == CLASSES and cfg.model.name == "test_resnet"
    image = next((SAMPLE / "val" / "daisy").iterdir())
    assert main(["predict", name, str(image), "--json"]) == 0


def test_an_artifact_that_cannot_be_fetched_is_one_line(wandb_dirs, monkeypatch, capsys):
    # The real wandb.Api: no key here (W&B's own check, before any network).
    monkeypatch.setenv("HOME", str(wandb_dirs))
    monkeypatch.setenv("NETRC", str(wandb_dirs / "no-netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    image = next((SAMPLE / "val" / "daisy").iterdir())
    assert main(["predict", "model-nosuch:best", str(image)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "flowers-dist: error: cannot fetch W&B artifact flowers-dist/model-nosuch:best: UsageError: No API key"
    )

    class Api:  # a server that answers: no such artifact
        def artifact(self, name, type=None):
            raise wandb.errors.CommError(f"artifact '{name}' not found in 'me/flowers-dist'\nmore detail")

    monkeypatch.setattr(wandb, "Api", Api)
    with pytest.raises(CheckpointError) as caught:
        artifacts.resolve("model-nosuch:best")
    assert str(caught.value) == (
        "cannot fetch W&B artifact flowers-dist/model-nosuch:best: CommError: "
        "artifact 'flowers-dist/model-nosuch:best' not found in 'me/flowers-dist'"
    )


# -- a real run, preempted and resumed, read back from its offline W&B files ----------------------
STEPS = 5
RUN = [
    "train",
    "--config",
    "configs/quickstart.yaml",
    *TINY,
    "model.name=test_resnet",  # 3 MB checkpoints
    f"train.max_steps_per_epoch={STEPS}",
    "train.epochs=2",
    "train.log_every=1",
    "train.stop_check_every=1",
    "train.keep_checkpoints=10",
]


def _artifacts(logged: dict, kind: str) -> list[dict]:
    return [a for a in logged["artifacts"] if a["type"] == kind]


@pytest.mark.e2e
def test_a_preempted_run_has_its_best_checkpoint_and_its_step_files_in_wandb(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {"WANDB_MODE": "offline", "HOME": str(home), "WANDB_DATA_DIR": None, "WANDB_DIR": None}
    run_dir = tmp_path / "a"
    started = time.perf_counter()
    proc, tag = launch([*RUN, "tracking.artifacts=all", f"train.output_dir={tmp_path}", "train.name=a"], env=env)
    try:  # SIGUSR1 inside epoch 2, after epoch 1 (a best epoch: the first) has ended
        wait_for(run_dir, lambda records: any(r["event"] == "start" for r in records), proc)
        pids = list(workers(tag).values())
        with stopped_at(pids, lambda: inside_epoch(position(run_dir, STEPS), 1, STEPS)):
            for pid in pids:
                os.kill(pid, signal.SIGUSR1)
        out, err = proc.communicate(timeout=120)
    finally:
        kill(proc, tag)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    (file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    logged = read_run(file)
    records = metrics(run_dir)
    epoch1 = next(r for r in records if r["event"] == "epoch")
    stop_step = STEPS + next(r for r in records if r["event"] == "stopped")["step"]
    env_json = json.loads((run_dir / "environment.json").read_text())
    checkpoints = run_dir / "checkpoints"

    # best.pt of epoch 1, uploaded: W&B staged a copy for `wandb sync`, the file's MD5 in its manifest.
    (model,) = _artifacts(logged, "model")
    best = checkpoints / "best.pt"
    assert model["name"] == f"model-{logged['run_id']}"
    assert set(model["aliases"]) == {"best", "latest", "epoch-1", f"step-{STEPS}"}
    meta = model["metadata"]
    assert meta["val_acc"] == epoch1["val_acc"] and meta["epoch"] == 1 and meta["step"] == STEPS
    assert meta["classes"] == CLASSES and meta["config"]["model"]["name"] == "test_resnet"
    assert meta["git_commit"] == env_json["git_commit"] and meta["sha256"] == _payload_sha256(best)
    entry = model["entries"]["best.pt"]
    assert not entry["ref"] and entry["digest"] == _md5_b64(best) and entry["size"] == best.stat().st_size
    assert Path(entry["local_path"]).read_bytes() == best.read_bytes()

    # Every step file by reference, the stop's own mid-epoch one included: logged before W&B closed.
    refs = _artifacts(logged, "checkpoint")
    assert [a["metadata"]["step"] for a in refs] == [STEPS, stop_step]
    assert [set(a["aliases"]) for a in refs] == [
        {"latest", "epoch-1", f"step-{STEPS}"},
        {"latest", f"step-{stop_step}"},
    ]
    for a in refs:
        step_file = checkpoints / f"step-{a['metadata']['step']:08d}.pt"
        ((path, ref),) = a["entries"].items()
        assert a["name"] == f"checkpoints-{logged['run_id']}" and path == step_file.name
        assert ref["ref"] == step_file.resolve().as_uri() and not ref["local_path"]
        assert ref["digest"] == _md5_b64(step_file) and a["metadata"]["sha256"] == _payload_sha256(step_file)
    staged = [p for p in (home / ".local/share/wandb/artifacts/staging").iterdir() if p.stat().st_size > 10**6]
    assert len(staged) == 1  # references stage nothing: only the best.pt upload takes a copy
    assert time.perf_counter() - started < 90
