"""`flowers-dist bench`: every mode runs on tiny inputs; its figures are checked against hand counts and planted delays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import timm
import torch
from conftest import REPO, cli, metrics

from flowers_dist.bench.scaling import accelerate_launch
from flowers_dist.bench.step import count_flops
from flowers_dist.cli import main

# The sample photos, ResNet-18 and the recipe's rotation and colour jitter, whatever the quickstart trains.
TINY_BENCH = [
    "--config",
    "configs/quickstart.yaml",
    "data.root=data/flowers_sample",
    "model.name=resnet18.tv_in1k",
    "data.rotation=15",
    "data.color_jitter=0.2",
    "data.image_size=32",
    "train.global_batch_size=4",
]


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


def test_counted_flops_of_a_conv_and_a_linear_layer_match_a_count_by_hand():
    # 3x3 conv 3->8 on 6x6 (padding 1), then a linear 288->5, no biases, batch 2; 2 FLOPs per multiply-add.
    h = w = 6
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.Flatten(), torch.nn.Linear(8 * h * w, 5, bias=False)
    )
    images, labels = torch.randn(2, 3, h, w), torch.zeros(2, dtype=torch.long)
    conv = 2 * 2 * (8 * h * w) * (3 * 3 * 3)  # batch x outputs x inputs per output
    linear = 2 * 2 * (8 * h * w) * 5
    assert count_flops(model, images, labels, backward=False) == conv + linear
    # Backward: the linear layer's input and weight gradients; the conv's weight gradient only
    # (the images need no gradient).
    assert count_flops(model, images, labels) == 2 * conv + 3 * linear


@pytest.mark.parametrize("layout", ["folder", "pack"])
def test_loader_mode_measures_both_loaders_and_the_decode_ceilings(tmp_path, capsys, layout):
    out = tmp_path / "loader.json"
    root = []
    if layout == "pack":  # the same photos as WebDataset shards: every setting reads them from the pack
        assert main(["data", "pack", "data/flowers_sample", str(tmp_path / "pack"), "--shard-size", "1"]) == 0
        root = [f"data.root={tmp_path / 'pack'}"]
    assert main(["bench", "loader", *TINY_BENCH, *root, "--repeats", "1", "--out", str(out)]) == 0
    results = _read(out)
    rows = {r["setting"]: r["images_per_s"] for r in results["rows"]}
    # The quickstart rotates and jitters colours: the DALI graph with DALI's own operators runs as well.
    assert set(rows) == {"dali", "torch", "dali_decode_only", "pil_decode_only", "dali_with_dali_ops"}
    for r in rows.values():
        assert len(r["values"]) == 1 and r["values"][0] > 0  # one repeat of one timed epoch each
    # The ratios are those of the measurements in the rows, each read from its own repeat.
    assert results["ratio_dali_over_torch"] == pytest.approx(rows["dali"]["values"][0] / rows["torch"]["values"][0])
    assert results["fused_finish_speedup"] == pytest.approx(
        rows["dali"]["values"][0] / rows["dali_with_dali_ops"]["values"][0]
    )
    assert results["images"] == 40  # the sample's train split, every file
    assert "DALI / PyTorch" in capsys.readouterr().out


def test_step_mode_reports_flops_against_a_matmul_peak(tmp_path):
    out = tmp_path / "step.json"
    assert (
        main(
            [
                "bench",
                "step",
                *TINY_BENCH,
                "--formats",
                "channels_last",
                "--repeats",
                "2",
                "--steps",
                "1",
                "--warmup",
                "1",
                "--matmul-size",
                "256",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    results = _read(out)
    peak = results["matmul_peak"]["fp32"]["flops_per_s"]["max"]
    [row] = results["rows"]
    assert row["precision"] == "fp32" and row["memory_format"] == "channels_last"
    assert peak > 0 and row["images_per_s"]["median"] > 0 and 0 < row["fraction_of_matmul_peak"]
    # Independently of the counter: 224 px is 7 x 32 px and every ResNet-18 feature map divides by 7
    # (112/16 ... 7/1), so a 32 px forward is the published 1.82 GMACs / 49 (the 5-way head is
    # negligible). A training step is the forward, plus twice it backward, less the first conv's
    # input gradient (the images need none: 118 MMACs at 224 px).
    forward = 2 * 1.82e9 / 49
    assert row["flops_per_image"] == pytest.approx(3 * forward - 2 * 118e6 / 49, rel=0.03)


def test_step_mode_refuses_fp16_on_the_cpu(tmp_path):
    with pytest.raises(ValueError, match="fp16"):
        main(["bench", "step", *TINY_BENCH, "--precisions", "fp16", "--out", str(tmp_path / "x.json")])


# `bench train` with known delays planted where the split must find them: a loader that sleeps
# before every batch (data wait), a sleep after every step (compute) and, with several processes,
# an extra all-reduce in every synchronised step that rank 0 enters 1.5 s before the others
# (communication: rank 0 waits in it). Under no_sync the extra all-reduce is skipped, as DDP's is.
SPLIT_DRIVER = """
import json, os, sys, time
import torch, torch.distributed as dist
from flowers_dist import parts
from flowers_dist.bench import loop

LOAD, COMPUTE, COMM = (float(os.environ[k]) for k in ("PLANT_LOAD_S", "PLANT_COMPUTE_S", "PLANT_COMM_S"))
build_loader, optimizer_step, extra = parts.build_loader, loop.optimizer_step, []


class SlowLoader:
    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)

    def set_epoch(self, epoch, skip=0):
        self.inner.set_epoch(epoch, skip)

    def __iter__(self):
        for batch in self.inner:
            time.sleep(LOAD)
            yield batch


def planted_step(*args, sync_gradients=True, **kwargs):
    optimizer_step(*args, sync_gradients=sync_gradients, **kwargs)
    time.sleep(COMPUTE)
    if dist.is_initialized() and sync_gradients:
        if dist.get_rank() != 0:
            time.sleep(COMM)
        start = time.perf_counter()
        dist.all_reduce(torch.ones(1000))
        extra.append(time.perf_counter() - start)


parts.build_loader = lambda *a, **kw: SlowLoader(build_loader(*a, **kw))
loop.optimizer_step = planted_step
from flowers_dist.cli import main
code = main(sys.argv[1:])
with open(os.environ["PLANT_OUT"] + f".{os.environ.get('RANK', '0')}", "w") as f:
    json.dump(extra, f)
sys.exit(code)
"""


@pytest.mark.e2e
@pytest.mark.parametrize("world, accum", [(1, 1), (2, 1), (1, 2)])
def test_train_split_finds_planted_data_wait_compute_and_communication(tmp_path, world, accum):
    load, compute, comm = 0.4, 0.3, 1.5
    driver = tmp_path / "driver.py"
    driver.write_text(SPLIT_DRIVER)
    out = tmp_path / "train.json"
    args = [
        "bench",
        "train",
        *TINY_BENCH,
        "data.image_size=16",
        f"train.grad_accum_steps={accum}",
        "--warmup",
        "1",
        "--steps",
        "3",
        "--out",
        str(out),
    ]
    launch = [sys.executable] if world == 1 else accelerate_launch(world)
    # PYTHONPATH: the driver lives in tmp_path, and must import this checkout's flowers_dist.
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        "PLANT_LOAD_S": str(load),
        "PLANT_COMPUTE_S": str(compute),
        "PLANT_COMM_S": str(comm),
        "PLANT_OUT": str(tmp_path / "extra"),
    }
    proc = subprocess.run([*launch, str(driver), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _read(out)
    assert results["world_size"] == world and len(results["ranks"]) == world
    # The configured run: the global batch of 4 dealt over the processes and accumulation steps, and
    # sync_bn as `auto` decides it (on below 16 images per process when there are several processes).
    assert (results["micro_batch_size"], results["grad_accum_steps"]) == (4 // (world * accum), accum)
    assert results["sync_bn"] == (world > 1) and results["loader"] in ("torch", "dali")
    # A step is an optimizer step: it waits for each of its `accum` micro-batches; the sleep after the step is not data wait.
    assert load * accum <= results["data_wait"] < load * accum + compute
    assert results["compute"] >= compute
    assert results["images_per_s"] == pytest.approx(4 / results["step_time"])
    if world == 1:
        assert results["communication"] == 0
        return
    # Rank 0's time in the extra all-reduce (at least the 1.5 s it waits for its peer) is communication,
    # and it is not taken for data wait or compute.
    waited = sorted(json.loads((tmp_path / "extra.0").read_text()))
    median_wait = waited[len(waited) // 2]  # the warm-up step's may be shorter: the ranks start a little apart
    assert median_wait >= 0.9 * comm
    assert results["communication"] >= 0.8 * median_wait
    assert results["compute"] < compute + comm / 2
    assert results["bottleneck"] == "communication"


@pytest.mark.e2e
def test_scaling_mode_runs_train_on_one_and_two_processes(tmp_path):
    out = tmp_path / "scaling.json"
    proc = cli(
        ["bench", "scaling", *TINY_BENCH, "--max-processes", "2", "--warmup", "1", "--steps", "3", "--out", str(out)]
    )
    assert "efficiency" in proc.stdout
    results = _read(out)
    assert [r["processes"] for r in results["rows"]] == [1, 2]
    for row in results["rows"]:
        assert row["images_per_s"] > 0
        train = json.loads(open(row["json"]).read())
        assert train["mode"] == "train" and train["config"]["train"]["global_batch_size"] == 4 * row["processes"]
        assert train["results"]["world_size"] == row["processes"] == len(train["results"]["ranks"])
        # Each row's figures are those its own `bench train` run wrote, and the efficiency is made from them.
        assert row["images_per_s"] == train["results"]["images_per_s"]
    one, two = (r["images_per_s"] for r in results["rows"])
    assert results["rows"][1]["efficiency"] == pytest.approx(two / (2 * one))


@pytest.mark.e2e
def test_startup_mode_times_a_fresh_process_to_its_first_step(tmp_path):
    out = tmp_path / "startup.json"
    started = time.perf_counter()
    assert (
        main(
            [
                "bench",
                "startup",
                *TINY_BENCH,
                "data.loader=torch",
                "data.num_workers=0",
                "--repeats",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    wall = time.perf_counter() - started
    results = _read(out)
    first, imports = results["time_to_first_step_s"], results["import_s"]
    # Both are measured from outside, in fresh processes run one after the other within the bench's wall time.
    # (No order between them is asserted: they are separate processes on a shared machine.)
    assert 0 < first["median"] and 0 < imports["median"] and first["median"] + imports["median"] < wall
    assert {"torch", "timm", "accelerate"} <= {r["package"] for r in results["largest_imports"]}
    run = tmp_path / "startup-0"
    assert any(r["event"] == "step" for r in metrics(run)), "the timed run never logged a step"
