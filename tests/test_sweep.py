"""`flowers-dist sweep`: a spec expanded into runs (grid product, seeded random draws, strict errors), the sweep
folder continued where it stopped, the SLURM array it submits, and `report --compare` on real runs; end to end
here (runs one after another) and as a job array on the test cluster with one task preempted and requeued."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest
import test_slurm
import yaml
from conftest import REPO, TINY, cli, metrics
from test_slurm import _stop_inside_epoch, job_env

from flowers_dist import cli as flowers_cli
from flowers_dist import config, sweep

# Tiny runs: the sample photos at 32 px, timm's test_resnet from scratch, one epoch of 5 steps (40 photos, batch 8).
TINY_RUN = [
    *TINY,
    "model.name=test_resnet",
    "model.pretrained=none",
    "data.loader=torch",
    "train.epochs=1",
    "train.log_every=1",
    "train.stop_check_every=1",
]


def write_spec(folder: Path, **spec) -> Path:
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump({"base": "configs/quickstart.yaml", **spec}, sort_keys=False))
    return path


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = flowers_cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_grid_is_the_product_in_spec_order(tmp_path):
    spec = write_spec(tmp_path, name="g", parameters={"optim.lr": [0.01, 0.1], "train.seed": [0, 1, 2]})
    plan, out = sweep.plan(spec, tmp_path / "out")
    assert [r.params for r in plan.runs] == [
        {"optim.lr": lr, "train.seed": seed} for lr in (0.01, 0.1) for seed in (0, 1, 2)
    ]
    assert [r.name for r in plan.runs] == [f"g-{i}" for i in range(6)]
    cfg = config.load(plan.base, plan.runs[4].overrides)
    assert (cfg.optim.lr, cfg.train.seed, cfg.train.name) == (0.1, 1, "g-4")
    assert cfg.train.output_dir == str(tmp_path / "out" / "runs") and cfg.train.resume == "auto"
    assert (cfg.tracking.group, cfg.tracking.job_type) == ("g", "sweep")
    sweep.record(plan, out, spec)
    assert sweep.load(out) == plan  # sweep.json holds the whole plan


def test_random_search_is_reproducible_from_its_seed(tmp_path):
    params = {
        "optim.lr": {"min": 0.001, "max": 0.1, "log": True},
        "train.epochs": {"min": 2, "max": 5},
        "optim.momentum": [0.8, 0.9],
    }
    runs = [
        sweep.plan(write_spec(tmp_path, method="random", count=12, seed=seed, parameters=params), None)[0].runs
        for seed in (7, 7, 8)
    ]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    drawn = [r.params for r in runs[0]]
    assert all(0.001 <= d["optim.lr"] <= 0.1 for d in drawn)
    assert all(isinstance(d["train.epochs"], int) and 2 <= d["train.epochs"] <= 5 for d in drawn)
    assert {d["optim.momentum"] for d in drawn} == {0.8, 0.9}
    # Log-uniform: as many draws below the geometric middle (0.01) as above, not 90 % above as a uniform draw gives.
    assert 3 <= sum(d["optim.lr"] < 0.01 for d in drawn) <= 9, drawn


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"parameters": {"optim.lr": [0.1]}, "methd": "grid"}, "key 'methd' is unknown"),
        ({"parameters": {"optim.lrr": [0.1]}}, "run 0 (optim.lrr=0.1): config key 'optim.lrr' is unknown"),
        (
            {"parameters": {"train.epochs": [2, "x"]}},
            "run 1 (train.epochs=x): config key 'train.epochs': must be an integer",
        ),
        ({"parameters": {"optim.lr": {"min": 0.1, "max": 1}}}, "needs a list of values for method grid"),
        ({"method": "random", "parameters": {"optim.lr": [0.1]}}, "method random needs count"),
        ({"method": "random", "count": 2, "parameters": {"optim.lr": {"min": 0, "max": 1, "log": True}}}, "min > 0"),
        ({"parameters": {"train.name": ["a", "b"]}}, "train.name is the sweep's to set"),
        ({"parameters": {"optim.lr": [0.1]}, "slurm": {"max_jobs": 2}}, "slurm: key 'max_jobs' is unknown"),
        ({"parameters": {"optim.lr": []}}, "parameter 'optim.lr' has no values"),
    ],
)
def test_mistakes_in_a_spec_are_one_line_before_anything_starts(tmp_path, capsys, spec, message):
    code, out, err = run_cli(["sweep", write_spec(tmp_path, **spec), "--out", tmp_path / "out"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("flowers-dist: error: sweep "), err
    assert message in err, err
    assert not (tmp_path / "out").exists()


def _finish(run_dir: Path) -> None:
    """A run folder whose metrics hold an `end` record: what a finished run leaves (the e2e tests make real ones)."""
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"event": "start"}) + "\n" + json.dumps({"event": "end"}) + "\n")


def test_slurm_dry_run_submits_the_unfinished_runs_as_one_array(tmp_path, capsys):
    spec = write_spec(
        tmp_path,
        name="s",
        parameters={"train.seed": [0, 1, 2, 3]},
        slurm={"max_concurrent": 2, "sbatch": ["--time=01:00:00"]},
    )
    out = tmp_path / "out"
    code, text, _ = run_cli(["sweep", spec, "--out", out, "--slurm", "--dry-run"], capsys)
    assert code == 0 and text.splitlines()[0] == f"sbatch --parsable --array=0-3%2 {out / 'sweep.sbatch'}"
    assert "#SBATCH --requeue" in text and "#SBATCH --time=01:00:00" in text
    assert 'source launch/slurm.sbatch "${train_args[@]}"' in text
    assert not out.exists()  # a dry run writes nothing
    _finish(out / "runs" / "s-1")
    code, text, _ = run_cli(["sweep", spec, "--out", out, "--slurm", "--dry-run"], capsys)
    assert text.splitlines()[0].split()[2] == "--array=0,2,3%2"
    # What task 2 runs: the train arguments of run 2, one a line; a finished run prints none.
    code, text, _ = run_cli(["sweep", spec, "--out", out, "--task", "2", "--train-args"], capsys)
    assert text.splitlines() == ["--config", "configs/quickstart.yaml", *sweep.load(out).runs[2].overrides]
    code, text, err = run_cli(["sweep", spec, "--out", out, "--task", "1", "--train-args"], capsys)
    assert code == 0 and text == "" and "has finished" in err


def test_a_changed_spec_does_not_continue_another_sweep(tmp_path, capsys):
    out = tmp_path / "out"
    sweep.record(*sweep.plan(write_spec(tmp_path, parameters={"optim.lr": [0.1, 0.2]}), out), tmp_path / "spec.yaml")
    code, _, err = run_cli(["sweep", write_spec(tmp_path, parameters={"optim.lr": [0.1, 0.3]}), "--out", out], capsys)
    assert code == 2 and "holds another sweep (the spec changed since it was written)" in err, err


@pytest.mark.e2e
def test_sweep_runs_one_after_another_continues_and_compares(tmp_path, capsys):
    """Two tiny runs (about 30 s): `--task 0` trains run 0 alone; the whole sweep then skips it and trains run 1;
    `report --compare` tabulates both from their metrics and names the better one."""
    spec = write_spec(tmp_path, name="loc", parameters={"optim.lr": [0.0001, 0.05]}, overrides=TINY_RUN)
    out = tmp_path / "out"
    cli(["sweep", str(spec), "--out", str(out), "--task", "0"])
    runs = [out / "runs" / "loc-0", out / "runs" / "loc-1"]
    assert sweep.status(runs[0]) == "finished" and sweep.status(runs[1]) == "new"
    first = metrics(runs[0])
    proc = cli(["sweep", str(spec), "--out", str(out)])
    assert "run 0 loc-0 finished; skipped" in proc.stdout, proc.stdout
    assert metrics(runs[0]) == first and sweep.status(runs[1]) == "finished"
    saved = yaml.safe_load((runs[1] / "config.yaml").read_text())
    assert (
        saved["optim"]["lr"] == 0.05
        and saved["tracking"]["group"] == "loc"
        and saved["tracking"]["job_type"] == "sweep"
    )

    code, text, _ = run_cli(["report", "--compare", out], capsys)
    with open(out / "compare.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert (
        code == 0
        and [r["run"] for r in rows] == ["loc-0", "loc-1"]
        and [float(r["optim.lr"]) for r in rows] == [0.0001, 0.05]
    )
    best_acc = [max(r["val_acc"] for r in metrics(run) if r["event"] == "epoch") for run in runs]
    assert [float(r["best_val_acc"]) for r in rows] == pytest.approx(best_acc)
    assert all(r["status"] == "finished" and float(r["images_per_s"]) > 0 for r in rows)
    best = "loc-0" if best_acc[0] >= best_acc[1] else "loc-1"
    assert re.search(rf"^best \(val_acc\): {best} \(optim\.lr=", text, re.MULTILINE), text
    assert (out / "compare.png").stat().st_size > 10_000 and (out / "compare.md").read_text() in text


# -- the SLURM test cluster ---------------------------------------------------------------------------------------
cluster = test_slurm.cluster  # the fixture: this module's own two-node cluster, started for its one test


@pytest.mark.slurm
@pytest.mark.e2e
def test_sweep_as_a_job_array_with_one_task_preempted_and_requeued(cluster, tmp_path):
    """4 tiny runs as one array, 2 at a time, on the two-node test cluster; task 0 is stopped inside its epoch
    (scancel --signal=USR1 --batch), checkpoints, requeues itself alone and resumes; all 4 end; the compare table
    holds them."""
    spec = write_spec(
        tmp_path,
        name="arr",
        parameters={"train.seed": [0, 1], "optim.lr": [0.001, 0.002]},
        overrides=TINY_RUN,
        slurm={
            "max_concurrent": 2,
            "sbatch": ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"],
        },
    )
    out = tmp_path / "out"
    submitted = cluster.run(
        [sys.executable, "-m", "flowers_dist", "sweep", str(spec), "--out", str(out), "--slurm"],
        env=job_env(PROCS_PER_NODE="1"),
        cwd=REPO,
    ).stdout
    array = int(re.search(r"submitted array job (\d+) \(--array=0-3%2\)", submitted).group(1))
    task0 = int(cluster.wait(f"{array}_0", states=("RUNNING",), timeout=120)["JobId"])

    def why() -> str:
        logs = "".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted((out / "slurm").glob("*.out"))
        )
        return f"{logs}\n{cluster.logs(25)}"

    _stop_inside_epoch(cluster, out / "runs" / "arr-0", task0, workers=1)
    infos = [cluster.wait(f"{array}_{i}", timeout=300) for i in range(4)]
    assert all(i["JobState"] == "COMPLETED" and i["ExitCode"] == "0:0" for i in infos), f"{infos}\n{why()}"
    assert [i["Restarts"] for i in infos] == ["1", "0", "0", "0"], why()
    events = [r["event"] for r in metrics(out / "runs" / "arr-0")]
    assert events[0] == "start" and "stopped" in events and "resume" in events and events[-1] == "end", events
    assert all(sweep.status(out / "runs" / f"arr-{i}") == "finished" for i in range(4)), why()
    assert "attempt 2 (SLURM_RESTART_COUNT=1)" in (out / "slurm" / f"arr-{array}_0.out").read_text(), why()

    code = flowers_cli.main(["report", "--compare", str(out)])
    with open(out / "compare.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert code == 0 and [r["status"] for r in rows] == ["finished"] * 4
    assert [(r["train.seed"], r["optim.lr"]) for r in rows] == [
        ("0", "0.001"),
        ("0", "0.002"),
        ("1", "0.001"),
        ("1", "0.002"),
    ]
