"""`flowers-dist bench`: every mode runs on tiny inputs and writes well-formed, self-consistent figures."""

from __future__ import annotations

import json
import time

import pytest
import timm
import torch

from flowers_dist.bench.step import count_flops
from flowers_dist.cli import main

from conftest import cli, metrics

TINY_BENCH = ["--config", "configs/quickstart.yaml", "data.image_size=32", "train.global_batch_size=4"]


def _read(path) -> dict:
    record = json.loads(path.read_text())
    assert {"mode", "when", "environment", "config", "results"} <= record.keys()
    assert record["environment"]["torch"] == torch.__version__
    return record["results"]


def test_counted_flops_of_resnet18_match_the_published_macs():
    # timm / torchvision publish 1.82 GMACs for ResNet-18 at 224 px; FlopCounterMode counts 2 FLOPs per MAC.
    model = timm.create_model("resnet18", pretrained=False)
    flops = count_flops(model, torch.randn(1, 3, 224, 224), torch.zeros(1, dtype=torch.long), backward=False)
    assert flops == pytest.approx(2 * 1.82e9, rel=0.02)


def test_loader_mode_measures_both_loaders_and_the_decode_ceilings(tmp_path, capsys):
    out = tmp_path / "loader.json"
    assert main(["bench", "loader", *TINY_BENCH, "--repeats", "1", "--out", str(out)]) == 0
    results = _read(out)
    rows = {r["setting"]: r["images_per_s"] for r in results["rows"]}
    # The quickstart rotates and jitters colours: the DALI graph with DALI's own operators runs as well.
    assert set(rows) == {"dali", "torch", "dali_decode_only", "pil_decode_only", "dali_with_dali_ops"}
    for r in rows.values():
        assert 0 < r["min"] <= r["median"] <= r["max"]
    assert results["ratio_dali_over_torch"] == pytest.approx(rows["dali"]["median"] / rows["torch"]["median"])
    assert results["fused_finish_speedup"] == pytest.approx(rows["dali"]["median"] / rows["dali_with_dali_ops"]["median"])
    assert "DALI / PyTorch" in capsys.readouterr().out


def test_step_mode_reports_flops_against_a_matmul_peak(tmp_path):
    out = tmp_path / "step.json"
    assert main(["bench", "step", *TINY_BENCH, "--formats", "channels_last", "--repeats", "2", "--steps", "1",
                 "--warmup", "1", "--matmul-size", "256", "--out", str(out)]) == 0
    results = _read(out)
    peak = results["matmul_peak"]["fp32"]["flops_per_s"]["max"]
    [row] = results["rows"]
    assert row["precision"] == "fp32" and row["memory_format"] == "channels_last"
    assert peak > 0 and row["flops_per_image"] > 0 and row["images_per_s"]["median"] > 0
    assert row["achieved_flops_per_s"] == pytest.approx(row["images_per_s"]["median"] * row["flops_per_image"])
    assert row["fraction_of_matmul_peak"] == pytest.approx(row["achieved_flops_per_s"] / peak)


def test_step_mode_refuses_fp16_on_the_cpu(tmp_path):
    with pytest.raises(ValueError, match="fp16"):
        main(["bench", "step", *TINY_BENCH, "--precisions", "fp16", "--out", str(tmp_path / "x.json")])


def _check_split(results: dict, world: int) -> None:
    assert results["world_size"] == world and len(results["ranks"]) == world
    assert results["images_per_s"] > 0 and results["step_time"] > 0
    # The three parts are the step time, by construction of the medians...
    assert results["data_wait"] + results["compute"] + results["communication"] == pytest.approx(results["step_time"])
    assert sum(results["fractions"].values()) == pytest.approx(1.0)
    assert results["bottleneck"] in results["fractions"] and results["advice"]
    # ...and per rank, per step, data wait + compute is the step time (medians of each agree within a tolerance).
    for rank in results["ranks"]:
        assert rank["data_wait"]["median"] >= 0 and rank["compute"]["median"] > 0
        assert rank["data_wait"]["median"] + rank["compute"]["median"] == pytest.approx(rank["step_time"]["median"], rel=0.25)
        if world > 1:
            assert rank["compute_no_sync"]["median"] > 0 and rank["allreduce_gradient_buffer"]["median"] > 0


def test_scaling_mode_runs_train_on_one_and_two_processes(tmp_path):
    out = tmp_path / "scaling.json"
    proc = cli(["bench", "scaling", *TINY_BENCH, "--max-processes", "2", "--warmup", "1", "--steps", "3", "--out", str(out)])
    assert "efficiency" in proc.stdout
    results = _read(out)
    assert [r["processes"] for r in results["rows"]] == [1, 2]
    assert results["rows"][0]["efficiency"] == pytest.approx(1.0)
    for row in results["rows"]:
        assert row["images_per_s"] > 0 and row["efficiency"] > 0
        train = json.loads(open(row["json"]).read())
        assert train["mode"] == "train" and train["config"]["train"]["global_batch_size"] == 4 * row["processes"]
        _check_split(train["results"], row["processes"])


def test_startup_mode_times_a_fresh_process_to_its_first_step(tmp_path):
    out = tmp_path / "startup.json"
    started = time.perf_counter()
    assert main(["bench", "startup", *TINY_BENCH, "data.loader=torch", "data.num_workers=0", "--repeats", "1", "--out", str(out)]) == 0
    wall = time.perf_counter() - started
    results = _read(out)
    first, imports = results["time_to_first_step_s"], results["import_s"]
    # Both are measured from outside, in fresh processes run one after the other within the bench's wall time.
    # (No order between them is asserted: they are separate processes on a shared machine.)
    assert 0 < first["median"] and 0 < imports["median"] and first["median"] + imports["median"] < wall
    assert {"torch", "timm", "accelerate"} <= {r["package"] for r in results["largest_imports"]}
    run = tmp_path / "startup-0"
    assert any(r["event"] == "step" for r in metrics(run)), "the timed run never logged a step"
