"""Real multi-process runs on the CPU (gloo), launched the way users launch them."""

import json

import pytest
from conftest import SAMPLE, TINY, cli, metrics

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("nprocs", [1, 2])
def test_step_schedule_and_world_size(tmp_path, nprocs):
    # StepLR decaying every 2 epochs over 7 one-step epochs crosses three boundaries: a scheduler
    # stepped once per process (Accelerate's prepared schedulers) would decay at epoch 1 on 2
    # processes. The learning rate is the one the loop really used, as recorded per epoch. A tiny
    # model on 16 px crops keeps each epoch (and its checkpoint) small.
    cli(
        [
            "train",
            "--config",
            "configs/quickstart.yaml",
            *TINY,
            "model.name=test_resnet",
            "data.image_size=16",
            "optim.schedule=step",
            "optim.lr=0.001",
            "optim.step_size=2",
            "optim.gamma=0.1",
            "optim.warmup_epochs=0",
            "train.epochs=7",
            "train.max_steps_per_epoch=1",
            f"train.output_dir={tmp_path}",
            "train.name=s",
        ],
        nprocs=nprocs,
        env={"OMP_NUM_THREADS": "1"},
    )  # a tiny model gains nothing from 2 threads, and loses much on a busy machine
    records = metrics(tmp_path / "s")
    start = records[0]
    assert start["event"] == "start" and start["world_size"] == nprocs
    epochs = {r["epoch"]: r for r in records if r["event"] == "epoch"}
    assert sorted(epochs) == list(range(7))
    for epoch, lr in {0: 1e-3, 1: 1e-3, 2: 1e-4, 3: 1e-4, 4: 1e-5, 5: 1e-5, 6: 1e-6}.items():
        assert epochs[epoch]["lr"] == pytest.approx(lr, rel=1e-9), (epoch, epochs[epoch]["lr"])
    # Each step consumed one full global batch, split over the processes.
    assert all(r["train_images"] == 8 for r in epochs.values())
    end = records[-1]
    assert end["event"] == "end" and len(end["weights_digest_per_rank"]) == nprocs
    assert len(set(end["weights_digest_per_rank"])) == 1, "ranks ended with different weights"


def test_exact_evaluation_over_1_2_3_processes(trained_run, tmp_path):
    # 23 sample val images (a prime): no batch size or process count splits them evenly.
    n_val = sum(1 for _ in (SAMPLE / "val").rglob("*.jpg"))
    assert n_val == 23
    results = {}
    for nprocs in (1, 2, 3):
        out = tmp_path / f"eval{nprocs}.json"
        cli(
            [
                "eval",
                str(trained_run / "checkpoints" / "last.pt"),
                "--data",
                str(SAMPLE),
                "--batch-size",
                "4",
                "--workers",
                "0",
                "--json",
                str(out),
            ],
            nprocs=nprocs,
        )
        results[nprocs] = json.loads(out.read_text())
        assert results[nprocs]["world_size"] == nprocs
    for r in results.values():
        assert r["count"] == 23
        assert r["correct"] == results[1]["correct"]
        assert r["confusion"] == results[1]["confusion"]
        assert r["accuracy"] == pytest.approx(results[1]["accuracy"])
        assert sum(map(sum, r["confusion"])) == 23
