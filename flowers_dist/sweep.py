"""`flowers-dist sweep SPEC.yaml`: a grid or seeded random search over config keys, as a sweep folder of runs that
run one after another here, or as one SLURM job array (one run per task) with the preemption guarantees of
launch/slurm.sbatch."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import shlex
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from . import config, metrics_log
from .errors import EXIT_PREEMPTED, ConfigError

SPEC_KEYS = ("name", "base", "method", "parameters", "count", "seed", "overrides", "metric", "slurm")
SLURM_KEYS = ("max_concurrent", "sbatch")
RANGE_KEYS = ("min", "max", "log")
METRICS = ("val_acc", "val_loss", "time_to_target")
"""What names the best run: the highest best val accuracy, the lowest val loss, or the shortest time to target."""
JOB_TYPE = "sweep"
RESERVED = ("train.name", "train.output_dir", "train.resume")
"""Keys every run gets from the sweep: its folder, and resume=auto so that the same command continues it."""
PLAN_FILE = "sweep.json"


@dataclass(frozen=True)
class Run:
    """One run of a sweep: its index (the array task), its folder's name, the values drawn, its train overrides."""

    index: int
    name: str
    params: dict[str, Any]
    overrides: list[str]


@dataclass(frozen=True)
class Sweep:
    """A spec expanded: everything a run, a task or the compare table needs, as DIR/sweep.json records it."""

    name: str
    base: str
    method: str
    metric: str
    max_concurrent: int
    sbatch: list[str]
    runs: list[Run]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", type=Path, metavar="SPEC.yaml", help="the sweep: base config, method, parameters")
    parser.add_argument("--out", type=Path, metavar="DIR", help="the sweep folder (default: runs/sweeps/<name>)")
    parser.add_argument("--slurm", action="store_true", help="submit the unfinished runs as one SLURM job array")
    parser.add_argument("--dry-run", action="store_true", help="with --slurm: print the sbatch command and script")
    parser.add_argument("--list", action="store_true", help="print the runs (index, name, status, values) and stop")
    parser.add_argument("--task", type=int, metavar="I", help="run only run I (what array task I does)")
    parser.add_argument(
        "--train-args",
        action="store_true",
        help="with --task: print run I's train arguments, one a line (the array script's use)",
    )


# -- the spec ---------------------------------------------------------------------------------------------------
def read_spec(path: Path) -> dict[str, Any]:
    """The spec file as a mapping, every key and shape checked; values are checked as config values later."""
    data = config.read_yaml(path)
    where = f"sweep {path}"
    _known(data, SPEC_KEYS, where)
    for key in ("base", "parameters"):
        if key not in data:
            raise ConfigError(f"{where}: '{key}' is required")
    method = data.setdefault("method", "grid")
    if method not in ("grid", "random"):
        raise ConfigError(f"{where}: method must be grid or random; got {method!r}")
    if method == "grid" and ("count" in data or "seed" in data):
        raise ConfigError(f"{where}: count and seed are for method random")
    if method == "random" and (not isinstance(data.get("count"), int) or data["count"] < 1):
        raise ConfigError(f"{where}: method random needs count, a number of runs >= 1; got {data.get('count')!r}")
    if not isinstance(data.setdefault("seed", 0), int):
        raise ConfigError(f"{where}: seed must be an integer; got {data['seed']!r}")
    if data.setdefault("metric", "val_acc") not in METRICS:
        raise ConfigError(f"{where}: metric must be one of {', '.join(METRICS)}; got {data['metric']!r}")
    overrides = data.setdefault("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise ConfigError(f"{where}: overrides must be a list of section.key=value; got {overrides!r}")
    data["name"] = str(data.get("name") or path.stem)
    if not all(c.isalnum() or c in "-_." for c in data["name"]):
        raise ConfigError(f"{where}: name {data['name']!r} may hold only letters, digits, '-', '_' and '.'")
    data["slurm"] = _slurm_options(data.get("slurm") or {}, where)
    _check_parameters(data["parameters"], method, where)
    for key in [*data["parameters"], *(o.split("=", 1)[0].strip() for o in overrides)]:
        if key in RESERVED:
            raise ConfigError(f"{where}: {key} is the sweep's to set (runs go to DIR/runs/<name>-<index>)")
    return data


def _known(data: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping of keys to values; got {data!r}")
    unknown = [k for k in data if k not in keys]
    if unknown:
        raise ConfigError(f"{where}: key '{unknown[0]}' is unknown (known here: {', '.join(keys)})")


def _slurm_options(slurm: Any, where: str) -> dict[str, Any]:
    _known(slurm, SLURM_KEYS, f"{where}: slurm")
    limit = slurm.get("max_concurrent", 0)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise ConfigError(f"{where}: slurm.max_concurrent must be an integer >= 0 (0 = no limit); got {limit!r}")
    extra = slurm.get("sbatch", [])
    if not isinstance(extra, list) or not all(isinstance(a, str) and a.startswith("--") for a in extra):
        raise ConfigError(f"{where}: slurm.sbatch must be a list of sbatch options like --time=04:00:00; got {extra!r}")
    return {"max_concurrent": limit, "sbatch": extra}


def _check_parameters(parameters: Any, method: str, where: str) -> None:
    if not isinstance(parameters, dict) or not parameters:
        raise ConfigError(f"{where}: parameters must map section.key to values; got {parameters!r}")
    for key, values in parameters.items():
        if not isinstance(key, str) or key.count(".") != 1:
            raise ConfigError(f"{where}: parameter '{key}' must be a config key section.key (e.g. optim.lr)")
        if isinstance(values, list):
            if not values:
                raise ConfigError(f"{where}: parameter '{key}' has no values")
        elif method == "grid":
            raise ConfigError(f"{where}: parameter '{key}' needs a list of values for method grid; got {values!r}")
        else:
            _check_range(key, values, where)


def _check_range(key: str, values: Any, where: str) -> None:
    _known(values, RANGE_KEYS, f"{where}: parameter '{key}'")
    low, high = values.get("min"), values.get("max")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low <= high:
        raise ConfigError(f"{where}: parameter '{key}' needs numbers min <= max; got {values!r}")
    if not isinstance(values.get("log", False), bool):
        raise ConfigError(f"{where}: parameter '{key}': log must be true or false; got {values['log']!r}")
    if values.get("log") and low <= 0:
        raise ConfigError(f"{where}: parameter '{key}': a log range needs min > 0; got {low!r}")


# -- expansion --------------------------------------------------------------------------------------------------
def expand(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The values of every run, in order: the grid's product (the last key varies fastest), or `count` draws."""
    keys = list(spec["parameters"])
    if spec["method"] == "grid":
        return [dict(zip(keys, combo)) for combo in itertools.product(*spec["parameters"].values())]
    rng = random.Random(spec["seed"])  # one stream, keys drawn in the spec's order: the same spec, the same runs
    return [{key: _draw(rng, spec["parameters"][key]) for key in keys} for _ in range(spec["count"])]


def _draw(rng: random.Random, values: list | dict) -> Any:
    if isinstance(values, list):
        return values[rng.randrange(len(values))]
    low, high, log = values["min"], values["max"], values.get("log", False)
    if log:
        drawn = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:
        drawn = rng.uniform(low, high)
    if isinstance(low, int) and isinstance(high, int):
        return min(max(round(drawn), low), high)
    return float(f"{drawn:.4g}")  # four digits: readable names and overrides, and the same text on every machine


def value_text(value: Any) -> str:
    """A value as an override's right-hand side that the config's YAML reads back as the same value."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def plan(spec_path: Path, out: Path | None) -> tuple[Sweep, Path]:
    """The spec expanded into runs, each run's config loaded and checked, before anything starts; and the folder."""
    spec = read_spec(spec_path)
    out = Path(out) if out is not None else Path("runs") / "sweeps" / spec["name"]
    draws = expand(spec)
    width = len(str(len(draws) - 1))
    runs = []
    for index, params in enumerate(draws):
        name = f"{spec['name']}-{index:0{width}d}"  # the index in the name: two runs never share a folder
        overrides = [
            f"tracking.group={spec['name']}",
            f"tracking.job_type={JOB_TYPE}",
            *spec["overrides"],
            *(f"{key}={value_text(value)}" for key, value in params.items()),
            f"train.output_dir={out / 'runs'}",
            f"train.name={name}",
            "train.resume=auto",  # the same command starts the run and resumes a stopped one
        ]
        try:
            config.load(spec["base"], overrides)
        except ConfigError as exc:
            raise ConfigError(f"sweep {spec_path}, run {index} ({_params_text(params)}): {exc}") from None
        runs.append(Run(index, name, params, overrides))
    slurm = spec["slurm"]
    sweep = Sweep(
        spec["name"], str(spec["base"]), spec["method"], spec["metric"], slurm["max_concurrent"], slurm["sbatch"], runs
    )
    return sweep, out


def _params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{key}={value_text(value)}" for key, value in params.items())


def record(sweep: Sweep, out: Path, spec_path: Path) -> None:
    """Write DIR/sweep.json, or check that the one there is this sweep's (so that re-running continues it)."""
    path = out / PLAN_FILE
    if path.is_file():
        if json.loads(path.read_text()) != json.loads(sweep.to_json()):
            raise ConfigError(
                f"sweep {spec_path}: {path} holds another sweep (the spec changed since it was written); "
                "give another --out, or delete that folder to start over"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(sweep.to_json())


def load(out: Path) -> Sweep:
    """The sweep of a sweep folder, as its sweep.json records it (for `report --compare`)."""
    path = Path(out) / PLAN_FILE
    if not path.is_file():
        raise ConfigError(f"{out}: no {PLAN_FILE} there; is it a sweep folder (flowers-dist sweep SPEC --out DIR)?")
    data = json.loads(path.read_text())
    return Sweep(**{**data, "runs": [Run(**r) for r in data["runs"]]})


def status(run_dir: Path) -> str:
    """`finished` (its metrics hold an `end` record), `started` (a folder to resume) or `new`."""
    if metrics_log.events(metrics_log.read(metrics_log.path_of(run_dir)), "end"):
        return "finished"
    return "started" if run_dir.exists() else "new"


def run_dir(out: Path, run: Run) -> Path:
    return out / "runs" / run.name


def train_args(sweep: Sweep, run: Run) -> list[str]:
    return ["--config", sweep.base, *run.overrides]


# -- running here, one after another ------------------------------------------------------------------------------
def run_here(sweep: Sweep, out: Path, indices: list[int]) -> int:
    """Run the unfinished runs among `indices` in turn, each as `python -m flowers_dist train` (a fresh process).

    A run that fails does not stop the others; SIGTERM or SIGUSR1 is passed on to the run in progress, which
    checkpoints and exits 75, and the sweep stops there with 75: the same command continues it.
    """
    stop: list[int] = []
    child: list[subprocess.Popen] = []

    def forward(signum: int, frame: Any) -> None:
        stop.append(signum)
        if child and child[0].poll() is None:
            child[0].send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    failed: list[tuple[str, int]] = []
    try:
        for i in indices:
            run = sweep.runs[i]
            state = status(run_dir(out, run))
            if state == "finished":
                print(f"sweep {sweep.name}: run {i} {run.name} finished; skipped", flush=True)
                continue
            if stop:
                break
            verb = "resuming" if state == "started" else "starting"
            print(
                f"=== sweep {sweep.name}: {verb} run {i} of {len(sweep.runs)}, {run.name}: {_params_text(run.params)}",
                flush=True,
            )
            child[:] = [subprocess.Popen([sys.executable, "-m", "flowers_dist", "train", *train_args(sweep, run)])]
            rc = child[0].wait()
            if rc == EXIT_PREEMPTED or (stop and rc != 0):
                print(
                    f"sweep {sweep.name}: stopped in run {i} {run.name} after its checkpoint; run the same command to continue",
                    flush=True,
                )
                return EXIT_PREEMPTED
            if rc != 0:
                failed.append((run.name, rc))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if failed:
        print(f"sweep {sweep.name}: {len(failed)} run(s) failed: " + ", ".join(f"{n} (exit {rc})" for n, rc in failed))
        return 1
    return 0


# -- SLURM: one job array -----------------------------------------------------------------------------------------
def array_script(sweep: Sweep, spec_path: Path, out: Path, root: Path) -> str:
    """The array job's script: task I asks for run I's train arguments, then runs launch/slurm.sbatch's body on them
    (stop signals passed on, checkpoint, exit 75, `scontrol requeue` of this task alone: its SLURM_JOB_ID)."""
    header = [
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name={sweep.name}",
        f"#SBATCH --output={out.resolve() / 'slurm' / '%x-%A_%a.out'}",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@300",
        *(f"#SBATCH {option}" for option in sweep.sbatch),
    ]
    # The paths as given, from the same folder: the runs' overrides (train.output_dir) must match sweep.json's.
    ask = shlex.join(["-m", "flowers_dist", "sweep", str(spec_path), "--out", str(out)])
    body = f"""\
# Sweep {sweep.name}, written by `flowers-dist sweep --slurm`: array task I trains run I of {out.resolve() / PLAN_FILE}
# under launch/slurm.sbatch (sourced, so that this shell is the batch shell its traps and requeue act on).
set -euo pipefail
cd {shlex.quote(str(root.resolve()))}
# A stop before the training exists (SLURM's warning, a preemption): requeue at once, nothing is lost.
early=""
trap 'early=USR1' USR1
trap 'early=TERM' TERM
args=$("${{PYTHON:-python}}" {ask} --task "$SLURM_ARRAY_TASK_ID" --train-args)
if [[ -z "$args" ]]; then
    exit 0  # the run had finished (a resubmitted array); the command said so on stderr
fi
if [[ -n "$early" ]]; then
    echo "=== job $SLURM_JOB_ID: SIG$early before the training started; requeueing"
    scontrol requeue "$SLURM_JOB_ID"
    exit 75
fi
trap - USR1 TERM
mapfile -t train_args <<<"$args"
# shellcheck source=launch/slurm.sbatch
source launch/slurm.sbatch "${{train_args[@]}}"
"""
    return "\n".join(header) + "\n" + body


def array_spec(indices: list[int], limit: int) -> str:
    """sbatch's --array value: the tasks (a range when contiguous), then `%limit` on how many run at once."""
    contiguous = indices == list(range(indices[0], indices[-1] + 1))
    tasks = f"{indices[0]}-{indices[-1]}" if contiguous and len(indices) > 1 else ",".join(map(str, indices))
    return tasks + (f"%{limit}" if limit else "")


def submit(sweep: Sweep, spec_path: Path, out: Path, dry_run: bool) -> int:
    """sbatch the unfinished runs as one array (dry run: print the command and the script instead)."""
    root = Path.cwd()
    if not (root / "launch" / "slurm.sbatch").is_file():
        raise ConfigError(f"sweep --slurm: no launch/slurm.sbatch in {root}: run it from the project root")
    todo = [run.index for run in sweep.runs if status(run_dir(out, run)) != "finished"]
    script_path = out / "sweep.sbatch"
    script = array_script(sweep, spec_path, out, root)
    command = (
        ["sbatch", "--parsable", f"--array={array_spec(todo, sweep.max_concurrent)}", str(script_path)] if todo else []
    )
    if dry_run:
        print(shlex.join(command) if todo else f"sweep {sweep.name}: every run has finished; nothing to submit")
        print(f"--- {script_path}\n{script}", end="")
        return 0
    if not todo:
        print(f"sweep {sweep.name}: every run has finished; nothing to submit")
        return 0
    (out / "slurm").mkdir(parents=True, exist_ok=True)
    script_path.write_text(script)
    try:
        proc = subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError:
        raise ConfigError("sweep --slurm: sbatch not found (SLURM's client commands must be on PATH)") from None
    if proc.returncode != 0:
        raise ConfigError(
            f"sweep --slurm: sbatch exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}"
        )
    job = proc.stdout.strip().split(";")[0]
    with open(out / "slurm" / "submissions.jsonl", "a") as fh:
        fh.write(json.dumps({"job_id": job, "tasks": todo, "array": command[2]}) + "\n")
    print(f"sweep {sweep.name}: submitted array job {job} ({command[2]}), {len(todo)} of {len(sweep.runs)} runs")
    print(f"logs: {out / 'slurm'}/{sweep.name}-{job}_<task>.out; when done: flowers-dist report --compare {out}")
    return 0


# -- the command ------------------------------------------------------------------------------------------------
def listing(sweep: Sweep, out: Path) -> str:
    lines = [f"sweep {sweep.name}: {len(sweep.runs)} runs ({sweep.method}) of {sweep.base} in {out}"]
    for run in sweep.runs:
        lines.append(f"{run.index:>4}  {run.name}  {status(run_dir(out, run)):<8}  {_params_text(run.params)}")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    sweep, out = plan(args.spec, args.out)
    if args.task is not None and not 0 <= args.task < len(sweep.runs):
        raise ConfigError(f"sweep {args.spec}: --task {args.task} is out of range (runs 0 to {len(sweep.runs) - 1})")
    if args.train_args and args.task is None:
        raise ConfigError("sweep: --train-args needs --task I")
    if args.dry_run and not args.slurm:
        raise ConfigError("sweep: --dry-run goes with --slurm")
    if args.list:
        print(listing(sweep, out), end="")
        return 0
    if args.slurm and args.dry_run:
        return submit(sweep, args.spec, out, dry_run=True)
    record(sweep, out, args.spec)
    if args.slurm:
        return submit(sweep, args.spec, out, dry_run=False)
    if args.train_args:
        run = sweep.runs[args.task]
        if status(run_dir(out, run)) == "finished":
            print(f"sweep {sweep.name}: run {run.index} {run.name} has finished; nothing to do", file=sys.stderr)
            return 0
        print("\n".join(train_args(sweep, run)))
        return 0
    return run_here(sweep, out, [args.task] if args.task is not None else list(range(len(sweep.runs))))
