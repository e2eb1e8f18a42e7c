"""`flowers-dist bench tta`: the first evaluation at a target, the medians over repeats and the table on hand-made
records; and two configs trained by the real `train` on the quickstart data, read back against their own records."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, cli, metrics

from flowers_dist.bench.tta import (
    cpu_info,
    curve,
    differences,
    first_at_or_above,
    labels_of,
    plan,
    report,
    summarise,
)
from flowers_dist.cli import main
from flowers_dist.errors import EXIT_USER_ERROR


def _epoch(epoch: int, val_acc: float, *, steps: int = 2, train_time: float = 1.0, elapsed: float = 0.0) -> dict:
    """An `epoch` record with the fields bench tta reads (train writes these and more)."""
    return {
        "event": "epoch",
        "epoch": epoch,
        "step": (epoch + 1) * steps,
        "val_acc": val_acc,
        "train_time": train_time,
        "elapsed": elapsed or 1.5 * (epoch + 1),
        "time": 1000.0 + 2 * (epoch + 1),
    }


def _run(label: str, accs: list[float], repeat: int = 0) -> dict:
    points = curve([_epoch(e, a) for e, a in enumerate(accs)], global_batch=8, launched=1000.0)
    return {"config": label, "repeat": repeat, "curve": points, "best": max(points, key=lambda p: p["val_acc"])}


def test_curve_accumulates_training_time_and_images_and_reads_wall_time_from_the_launch():
    points = curve([_epoch(0, 0.3, train_time=2.0), _epoch(1, 0.5, train_time=3.0)], global_batch=8, launched=999.0)
    assert [p["train_time"] for p in points] == [2.0, 5.0]  # training alone, summed over epochs
    assert [p["images"] for p in points] == [16, 32]  # optimizer steps x global batch
    assert [p["elapsed"] for p in points] == [1.5, 3.0]  # the run's own clock, as recorded
    assert [p["wall"] for p in points] == [3.0, 5.0]  # record time - launch


def test_first_evaluation_at_or_above_the_target():
    points = curve([_epoch(0, 0.2), _epoch(1, 0.5), _epoch(2, 0.7), _epoch(3, 0.6)], 8, 1000.0)
    assert first_at_or_above(points, 0.5)["epoch"] == 1  # equal counts as reached
    assert first_at_or_above(points, 0.55)["epoch"] == 2
    assert first_at_or_above(points, 0.0)["epoch"] == 0
    assert first_at_or_above(points, 0.71) is None
    assert first_at_or_above([], 0.0) is None


def test_summary_takes_medians_over_repeats_with_a_miss_counted_as_infinitely_late():
    runs = [
        _run("a", [0.4, 0.8], 0),
        _run("b", [0.3, 0.5, 0.6], 0),
        _run("a", [0.7, 0.9], 1),
        _run("b", [0.2, 0.4, 0.72], 1),
        _run("a", [0.1, 0.2], 2),  # a never reaches 0.7 in this repeat
        _run("b", [0.2, 0.3, 0.5], 2),
    ]
    a, b = summarise(runs, ["a", "b"], [0.7])
    assert (a["reached"], a["repeats"], a["epochs"]) == (2, 3, 2)
    assert a["time_to_target_s"] == 3.0  # median of 3.0 (epoch 1), 1.5 (epoch 0) and a miss
    assert a["images_to_target"] == 32 and a["epoch_to_target"] == 1
    assert a["best_val_acc"] == 0.9 and a["best_epoch"] == 1  # the best any repeat saw
    assert b["reached"] == 1 and b["time_to_target_s"] is None and b["images_to_target"] is None
    table = report([a, b]).splitlines()
    assert "time to target (run clock)" in table[0] and "images to target" in table[0]
    assert "3.0 s (epoch 2), 2/3 reached" in table[1] and table[1].split()[-3:] == ["32", "0.9000", "2"]
    assert "not reached in 2 of 3 (best 0.7200 at epoch 3)" in table[2]


def test_a_target_never_reached_is_said_with_the_best_accuracy_and_its_epoch():
    (row,) = summarise([_run("only", [0.25, 0.29, 0.27])], ["only"], [0.9])
    line = report([row]).splitlines()[1]
    assert "not reached (best 0.2900 at epoch 2)" in line
    assert line.split()[-3:] == ["-", "0.2900", "3"]


def test_runs_are_interleaved_and_configs_named_by_their_files(tmp_path):
    assert plan(["a", "b"], 2) == [(0, "a"), (0, "b"), (1, "a"), (1, "b")]
    paths = [tmp_path / "x" / "q.yaml", tmp_path / "q.yaml", tmp_path / "r.yaml", tmp_path / "q.yaml"]
    assert labels_of(paths) == ["q", "q-2", "r", "q-3"]


def test_differences_name_the_keys_that_differ():
    a = {"optim": {"lr": 0.05, "momentum": 0.9}, "data": {"scale": [0.25, 1.0]}}
    b = {"optim": {"lr": 0.01, "momentum": 0.9}, "data": {"scale": [0.08, 1.0]}}
    assert differences({"a": a, "b": b}) == {
        "data.scale": {"a": [0.25, 1.0], "b": [0.08, 1.0]},
        "optim.lr": {"a": 0.05, "b": 0.01},
    }
    assert differences({"a": a, "a-2": a}) == {}


def test_cpu_info_reads_the_model_name_and_the_bf16_flags():
    text = (
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu avx512_bf16 amx_bf16 amx_tile\n"
    )
    assert cpu_info(text) == {"model_name": "Intel(R) Xeon(R) Platinum 8480+", "avx512_bf16": True, "amx_bf16": True}
    assert cpu_info("model name\t: AMD EPYC\nflags\t: fpu avx2\n")["avx512_bf16"] is False
    assert cpu_info()["model_name"]  # this machine's


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "70"], "--target 70: a val accuracy is a fraction in [0, 1]"),
        ([], "bench tta needs --target ACC"),
        (["--target", "0.5", "--repeats", "0"], "--repeats and --nprocs must be >= 1"),
    ],
)
def test_bad_arguments_fail_in_one_line_before_any_training(capsys, args, message):
    assert main(["bench", "tta", "--config", str(REPO / "configs" / "quickstart.yaml"), *args]) == EXIT_USER_ERROR
    assert message in capsys.readouterr().err


def test_other_modes_take_one_config(capsys):
    config = str(REPO / "configs" / "quickstart.yaml")
    assert main(["bench", "step", "--config", config, "--config", config]) == EXIT_USER_ERROR
    assert "bench step takes one --config" in capsys.readouterr().err


@pytest.mark.e2e
def test_tta_trains_two_configs_and_reports_what_their_records_say(tmp_path):
    """Two configs (the quickstart, and it at another learning rate) trained by `train` on the quickstart data; target 0
    is reached at the first evaluation, target 1 never (4 steps on 32-px crops cannot classify all 120 val photos)."""
    other = tmp_path / "quickstart_lr.yaml"
    other.write_text((REPO / "configs" / "quickstart.yaml").read_text().replace("lr: 0.05", "lr: 0.01"))
    out = tmp_path / "tta.json"
    tiny = ["data.image_size=32", "train.epochs=2", "train.max_steps_per_epoch=2", "train.progress=lines"]
    tiny += ["tracking.mistakes=0", "tracking.artifacts=none", f"train.output_dir={tmp_path / 'runs'}"]
    proc = cli(
        ["bench", "tta", "--config", "configs/quickstart.yaml", "--config", str(other), "--target", "0"]
        + ["--target", "1", *tiny, "--out", str(out)]
    )
    record = json.loads(out.read_text())
    results = record["results"]
    assert record["environment"]["world_size"] == 1 and record["environment"]["cpu"] == cpu_info()
    assert results["differences"] == {"optim.lr": {"quickstart": 0.05, "quickstart_lr": 0.01}}
    assert [(r["config"], r["repeat"]) for r in results["runs"]] == [("quickstart", 0), ("quickstart_lr", 0)]
    summary = {(row["config"], row["target"]): row for row in results["summary"]}
    for run in results["runs"]:
        records = [r for r in metrics(run["run_dir"]) if r["event"] == "epoch"]
        assert [(p["epoch"], p["step"], p["val_acc"], p["elapsed"]) for p in run["curve"]] == [
            (r["epoch"], r["step"], r["val_acc"], r["elapsed"]) for r in records
        ]
        # Images from steps x global batch, against the images the run counted itself.
        assert [p["images"] for p in run["curve"]] == [64, 128] == [32 * r["step"] for r in records]
        assert [p["images"] for p in run["curve"]] == [
            records[0]["train_images"],
            sum(r["train_images"] for r in records),
        ]
        assert run["curve"][1]["train_time"] == pytest.approx(records[0]["train_time"] + records[1]["train_time"])
        assert (
            0 < run["curve"][0]["elapsed"] < run["curve"][0]["wall"] < run["curve"][1]["wall"] < run["process_wall_s"]
        )
        first = summary[(run["config"], 0.0)]
        assert (first["reached"], first["epoch_to_target"], first["images_to_target"]) == (1, 0, 64)
        assert first["time_to_target_s"] == records[0]["elapsed"]
        never = summary[(run["config"], 1.0)]
        assert (never["reached"], never["time_to_target_s"], never["images_to_target"]) == (0, None, None)
        best = max(records, key=lambda r: (r["val_acc"], -r["epoch"]))
        assert (never["best_val_acc"], never["best_epoch"]) == (best["val_acc"], best["epoch"])
        assert f"not reached (best {best['val_acc']:.4f} at epoch {best['epoch'] + 1})" in proc.stdout
        # The run's own time to target (train's end record) was asked for the same target, and agrees.
        end = [r for r in metrics(run["run_dir"]) if r["event"] == "end"][-1]
        assert (end["target_accuracy"], end["time_to_target"]) == (1.0, None)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _ablation():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tta_ablation", REPO / "benchmarks" / "tta_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_ablation_climbs_from_the_seed_to_the_committed_fast_proxy_one_group_at_a_time():
    from flowers_dist import config
    from flowers_dist.config import levers_on

    ablation = _ablation()
    table = ablation.rows(seed_epochs=10)
    loaded = [config.load(ablation.SEED, overrides) for _, _, overrides in table]
    fast = config.load(ablation.FAST)
    assert loaded[0].train.epochs == 10 and levers_on(loaded[0]) == {} and loaded[0].data.image_size == 128
    assert loaded[0].optim == config.load(ablation.SEED).optim  # the seed's recipe itself, only from scratch
    last = loaded[-1].to_dict()
    last["data"]["root"] = fast.data.root
    assert last == fast.to_dict()  # the table ends at the committed recipe, key for key
    assert levers_on(loaded[-1]) == levers_on(fast) != {}
    for (name, _, before), (_, _, after), (_, _, keys) in zip(table[1:], table[2:], ablation.GROUPS[1:]):
        assert {o.split("=")[0] for o in after[len(before) :]} == set(keys), name  # one group more per row
    with pytest.raises(ValueError, match="miss \\['optim.label_smoothing'\\]"):
        ablation.rows(10, [g for g in ablation.GROUPS if g[0] != "smoothing"])


def test_the_ablation_table_names_the_processor_and_times_each_row_against_the_seed():
    ablation = _ablation()
    runs = [_run("seed", [0.5, 0.72]), _run("fast", [0.71, 0.8]), _run("slow", [0.3, 0.4])]
    rows = summarise(runs, ["seed", "fast", "slow"], [0.7])
    result = {
        "environment": {"cpu": cpu_info("model name\t: AMD EPYC\nflags\t: fpu avx512_bf16\n")},
        "results": {"summary": rows, "repeats": 1},
    }
    text = ablation.markdown(result, ["seed", "+ fast", "+ slow"])
    assert "AMD EPYC, avx512_bf16 True, amx_bf16 False" in text
    assert "| seed | 2 | 3 s (epoch 2) | 1.00x | 0.720 |" in text
    assert "| + fast | 2 | 2 s (epoch 1) | 0.50x | 0.800 |" in text
    assert "| + slow | 2 | not reached | - | 0.400 |" in text
