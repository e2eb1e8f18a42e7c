"""Shared test helpers: the bundled sample data, running the CLI as a user would (1..N processes), reading a run's
record, and the guard that keeps the fast subset (`-m "not e2e"`) free of training processes."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowers_dist import checkpoint_file, metrics_log
from flowers_dist.bench.scaling import free_port, launch_command

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "flowers_sample"
SHARED_FLOWERS = REPO.parent / "shared" / "flowers"

# Small enough for 2 CPU cores: 32 px crops, no worker processes, no terminal bar; the 63 sample photos
# (23 val, a prime), ResNet-18 and the recipe's optimisation and augmentation (StepLR at lr 1e-3, crops
# from 8 % of the area, rotation and colour jitter), whatever configs/quickstart.yaml trains.
TINY = [
    "data.image_size=32",
    "data.num_workers=0",
    "train.progress=lines",
    "train.global_batch_size=8",
    "train.eval_batch_size=8",
    "data.root=data/flowers_sample",
    "model.name=resnet18.tv_in1k",
    "model.zero_init_last=true",
    "optim.lr=0.001",
    "optim.schedule=step",
    "optim.weight_decay=0",
    "data.scale=[0.08,1.0]",
    "data.rotation=15",
    "data.color_jitter=0.2",
    "tracking.mistakes=0",  # the end-of-run pass over val for report/mistakes.html: tested once, in test_mistakes.py
    "tracking.artifacts=none",  # an offline W&B run would stage each best.pt (90 MB): tested in test_artifacts.py
]


def command(args: list[str], nprocs: int = 1, launcher: str = "accelerate") -> list[str]:
    """`python -m flowers_dist ARGS`, under `accelerate launch` (or torchrun, which restarts a failed rank) when nprocs > 1."""
    if nprocs > 1 and launcher == "torchrun":
        rdzv = f"--nproc_per_node {nprocs} --max-restarts 1 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:{free_port()}"
        return [sys.executable, "-m", "torch.distributed.run", *rdzv.split(), "-m", "flowers_dist", *args]
    return launch_command(nprocs, args)


def cli_env(nprocs: int = 1, env: dict | None = None) -> dict[str, str]:
    """The CLI's environment in tests: no W&B, no hub; env values of None unset.

    One thread per process when there are several (2 cores), and the same count for every run of one size:
    another count sums in another order, and bit-identity between runs is under test.
    """
    threads = "1" if nprocs > 1 else os.environ.get("OMP_NUM_THREADS", "2")
    full = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads, **(env or {})}
    return {k: v for k, v in full.items() if v is not None}


def cli(
    args: list[str], nprocs: int = 1, env: dict | None = None, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """Run `python -m flowers_dist ARGS` to its end, under `accelerate launch` when nprocs > 1."""
    cmd = command(args, nprocs)
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(nprocs, env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
        )
    return proc


SERVER_LIFETIME_S = 300  # a local server shuts itself down even if a teardown never runs


@contextlib.contextmanager
def local_server(handler) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 for the duration of the block; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    watchdog = threading.Timer(SERVER_LIFETIME_S, server.shutdown)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextlib.contextmanager
def mounted_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` (e.g. "2m") at `mount` for the block (root only; the test skips where mount fails)."""
    mount.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's record as every reader in the package reads it: whole lines only (a running writer's last line waits)."""
    return metrics_log.read(metrics_log.path_of(run_dir))


def assert_whole_lines(run_dir: Path) -> None:
    """Every line of metrics.jsonl was written whole, the last one included (`metrics` would leave a torn one out)."""
    data = metrics_log.path_of(run_dir).read_bytes()
    assert data.endswith(b"\n"), f"metrics.jsonl ends in a torn line: {data[-200:]!r}"
    assert all("event" in record for record in metrics(run_dir))


def final_digest(run_dir: Path) -> str:
    """The weights a finished run ended with: its last `end` record's SHA-256 over every parameter and buffer.

    Fails if the run has not ended, or if its ranks ended with different weights.
    """
    ends = metrics_log.events(metrics(run_dir), "end")
    assert ends, f"{run_dir} has no `end` record: the run did not finish"
    digests = ends[-1]["weights_digest_per_rank"]
    assert len(set(digests)) == 1, f"{run_dir}: the ranks ended with different weights: {digests}"
    return digests[0]


def assert_same_final_weights(a: Path, b: Path) -> None:
    """The two runs ended bit-identical, after the same epochs (compared by digest, without loading a checkpoint)."""
    last_epoch = [metrics_log.latest_per(metrics(run), "epoch", "epoch")[-1]["epoch"] for run in (a, b)]
    assert last_epoch[0] == last_epoch[1], f"{a} ended after epoch {last_epoch[0]}, {b} after {last_epoch[1]}"
    assert final_digest(a) == final_digest(b), f"{a} and {b} ended with different weights"


def last_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The run's checkpoints/last.pt, verified and loaded: for tests about what a checkpoint holds."""
    return checkpoint_file.load(run_dir / "checkpoints" / "last.pt")


def position(run_dir: Path, steps: int) -> tuple[int, int] | None:
    """(epoch, step inside it) of the run's last `step` row (`steps` per epoch); None before the first."""
    rows = metrics_log.events(metrics(run_dir), "step")
    return (rows[-1]["epoch"], rows[-1]["step"] - rows[-1]["epoch"] * steps) if rows else None


def inside_epoch(at: tuple[int, int] | None, epoch: int, steps: int) -> bool:
    """Whether a run stopped at `at` is 1 to steps - 2 steps into `epoch`: the ranks agree after every step, so a
    stop signal sent now is acted on at this step or, if its agreement had begun, the next, both inside the epoch.
    Fails if the run got past that unseen."""
    assert at is None or at <= (epoch, steps - 2), f"the run passed step {steps - 2} of epoch {epoch} unseen: {at}"
    return at is not None and at >= (epoch, 1)


def indexed(split):
    """The split with each file's index as its label, so batches say which files they hold."""
    return dataclasses.replace(split, labels=tuple(range(len(split))))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One tiny finished run on the sample data, shared by tests that need a checkpoint."""
    out = tmp_path_factory.mktemp("runs")
    cli(
        [
            "train",
            "--config",
            "configs/quickstart.yaml",
            *TINY,
            "train.epochs=2",
            f"train.output_dir={out}",
            "train.name=tiny",
        ]
    )
    return out / "tiny"


# The fast subset's guard. A test not marked e2e may start small tools (shellcheck, a python -c), but not the CLI, a
# launcher, a launch/ script or a SLURM command: those are training processes, or can be, and take seconds to minutes.
LAUNCHERS = {"flowers-dist", "accelerate", "torchrun", "srun", "sbatch", "salloc"}
LAUNCHER_MODULES = {"flowers_dist", "accelerate.commands.launch", "torch.distributed.run", "torch.distributed.launch"}


class UnmarkedEndToEnd(AssertionError):
    """A test outside the e2e mark started a training process or a launcher."""


def _script(argv: list[str]) -> str | None:
    """The file a command runs: the program itself, or an interpreter's (bash, sh, python) script argument."""
    head = os.path.basename(argv[0])
    if head not in ("bash", "sh") and not head.startswith("python"):
        return argv[0]
    if "-c" in argv or "-m" in argv:
        return None
    return next((a for a in argv[1:] if not a.startswith("-")), None)


def _argv(args: Any) -> list[str]:
    """Popen's first argument as a list of strings (a shell string split at spaces)."""
    return os.fsdecode(args).split() if isinstance(args, (str, bytes, os.PathLike)) else [os.fsdecode(a) for a in args]


def starts_training(argv: list[str]) -> bool:
    """Whether a command line starts the CLI, a launcher, a launch/ script or SLURM."""
    if not argv:
        return False
    module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else None
    script = _script(argv)
    return (
        bool(LAUNCHERS & {os.path.basename(a) for a in argv})
        or module in LAUNCHER_MODULES
        or (
            script is not None
            and Path(script).parent.name == "launch"
            and (REPO / "launch" / Path(script).name).exists()
        )
    )


@contextlib.contextmanager
def no_training_processes(test: str) -> Iterator[list[str]]:
    """Within the block, subprocess.Popen refuses to start a training process or launcher; yields what was refused."""
    refused: list[str] = []
    original = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        if starts_training(_argv(args)):
            refused.append(" ".join(_argv(args)))
            self.args, self.returncode = args, None  # what Popen's repr reads, for the traceback
            raise UnmarkedEndToEnd(
                f"{test} is not marked e2e but starts `{refused[-1][:200]}`: add @pytest.mark.e2e "
                "(or `pytestmark = pytest.mark.e2e` for a whole file)"
            )
        original(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = guarded
    try:
        yield refused
    finally:
        subprocess.Popen.__init__ = original


def _guarded_phase(item: pytest.Item):
    """A setup or call phase of a test without the e2e mark, run under the guard; fixtures it sets up are covered too."""
    if item.get_closest_marker("e2e"):
        return (yield)
    with no_training_processes(item.nodeid) as refused:
        result = yield
    if refused:  # the test caught the refusal and went on: fail it all the same
        raise UnmarkedEndToEnd(f"{item.nodeid} is not marked e2e but started `{refused[0][:200]}`")
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    return (yield from _guarded_phase(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    return (yield from _guarded_phase(item))
