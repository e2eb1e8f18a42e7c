"""The README's first command, then the checkpoint it leaves used for eval and predict."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE, SHARED_FLOWERS, TINY, cli, metrics
from PIL import Image

from flowers_dist import checkpoint_file, config
from flowers_dist.config import ModelConfig
from flowers_dist.model import build_model

QUICKSTART_DATA = REPO / "data" / "flowers_quickstart"


@pytest.mark.e2e
def test_readme_quickstart_learns(tmp_path):
    readme = (REPO / "README.md").read_text()
    assert "flowers-dist train --config configs/quickstart.yaml" in readme
    # One thread: about 50 CPU-seconds in all; two threads on cores other jobs keep busy spin in
    # OpenMP barriers and took 8 minutes an epoch here (the user's command keeps torch's default).
    proc = cli(
        ["train", "--config", "configs/quickstart.yaml", f"train.output_dir={tmp_path}", "train.name=qs"],
        env={"OMP_NUM_THREADS": "1"},
        timeout=1800,
    )
    assert "best val accuracy" in proc.stdout
    run = tmp_path / "qs"
    records = metrics(run)
    epochs = [r for r in records if r["event"] == "epoch"]
    assert len(epochs) == config.load(REPO / "configs" / "quickstart.yaml").train.epochs
    n_val = sum(1 for _ in (QUICKSTART_DATA / "val").rglob("*.jpg"))
    assert n_val >= 100 and all(r["val_count"] == n_val for r in epochs)
    # It learns: the training loss falls by a third and the final val accuracy is far above chance
    # (0.2; one standard deviation of a guess over 120 images is 0.037). Measured finals: about 0.7.
    assert epochs[-1]["train_loss"] < 0.67 * epochs[0]["train_loss"], [r["train_loss"] for r in epochs]
    assert epochs[-1]["val_acc"] >= 0.55, [r["val_acc"] for r in epochs]
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"]
    assert json.loads((run / "classes.json").read_text()) == ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    env = json.loads((run / "environment.json").read_text())
    assert env["world_size"] == 1 and env["torch"]
    assert (run / "config.yaml").read_text().startswith("data:")
    assert (run / "checkpoints" / "last.pt").stat().st_size > 1e6


@pytest.mark.e2e
def test_quickstart_sample_is_small_and_regenerates_from_the_full_set(tmp_path):
    files = sorted(QUICKSTART_DATA.rglob("*.jpg"))
    assert 100 <= len(files) < 1000 and sum(f.stat().st_size for f in files) < 5e6
    listed = (QUICKSTART_DATA / "FILES.txt").read_text().split()[1::2]
    assert sorted(listed) == [str(f.relative_to(QUICKSTART_DATA)) for f in files]
    if not (SHARED_FLOWERS / "train").is_dir():
        pytest.skip("the full flower_photos set is not at ../shared/flowers")
    out = tmp_path / "sample"
    subprocess.run(
        [sys.executable, str(REPO / "data" / "make_sample.py"), str(SHARED_FLOWERS), str(out)], check=True, timeout=600
    )
    # The same source files (by SHA-256 of their bytes) and the same image sizes; the JPEG bytes
    # themselves may differ with the Pillow / libjpeg version.
    assert (out / "FILES.txt").read_text() == (QUICKSTART_DATA / "FILES.txt").read_text()
    for f in files[::50]:
        with Image.open(f) as committed, Image.open(out / f.relative_to(QUICKSTART_DATA)) as made:
            assert made.size == committed.size and min(made.size) == 80


@pytest.mark.e2e
def test_eval_and_predict_commands(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "best.pt"
    proc = cli(["eval", str(ckpt), "--data", str(SAMPLE), "--workers", "0"])
    assert "confusion matrix" in proc.stdout and "per-class accuracy" in proc.stdout and "/23)" in proc.stdout

    images = tmp_path / "imgs"
    images.mkdir()
    for f in sorted((SAMPLE / "val" / "roses").iterdir())[:2]:
        shutil.copy(f, images / f.name)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    proc = cli(["predict", str(ckpt), str(images), "--topk", "2", "--json"])
    results = json.loads(proc.stdout)
    ok = [r for r in results if "top" in r]
    assert len(ok) == 2 and len(results) == 3
    for r in ok:
        assert len(r["top"]) == 2 and r["top"][0]["prob"] >= r["top"][1]["prob"]
        assert {t["class"] for t in r["top"]} <= {"daisy", "dandelion", "roses", "sunflowers", "tulips"}
    assert "error" in next(r for r in results if r["path"].endswith("broken.jpg"))


def test_help_and_data_fetch_start_without_torch():
    # torch, timm and accelerate take seconds to import; commands that need none of them skip them.
    code = (
        "import sys; from flowers_dist.cli import _parser; _parser().parse_args(['data', 'fetch', 'x']); "
        "import flowers_dist.data.fetch; print(sorted(m for m in ('torch', 'timm', 'accelerate') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.e2e
def test_module_and_console_script_agree():
    # `python -m flowers_dist` (what accelerate launch -m and torchrun -m run) and the installed
    # `flowers-dist` script must be one program: same help, same one-line errors, same exit codes.
    script = shutil.which("flowers-dist", path=str(Path(sys.executable).parent)) or shutil.which("flowers-dist")
    assert script, "the flowers-dist console script is not installed (pip install -e .)"
    for args in (["--help"], ["train", "--help"], ["eval", "--help"], ["train", "--config", "configs/no-such.yaml"]):
        module = subprocess.run([sys.executable, "-m", "flowers_dist", *args], capture_output=True, text=True, cwd=REPO)
        console = subprocess.run([script, *args], capture_output=True, text=True, cwd=REPO)
        assert (module.returncode, module.stdout, module.stderr) == (
            console.returncode,
            console.stdout,
            console.stderr,
        ), args
    assert module.returncode != 0 and "configs/no-such.yaml" in module.stderr and "Traceback" not in module.stderr


@pytest.mark.e2e
@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("clang++") is None,
    reason="torch.compile on the CPU needs a C++ compiler",
)
def test_compiled_training_saves_checkpoints_the_plain_model_loads(tmp_path):
    # A compiled module's state_dict prefixes every key with `_orig_mod.`; the checkpoint must not.
    proc = cli(
        [
            "train",
            "--config",
            "configs/quickstart.yaml",
            *TINY,
            "model.compile=true",
            "train.epochs=1",
            "train.max_steps_per_epoch=2",
            f"train.output_dir={tmp_path}",
            "train.name=c",
        ],
        timeout=900,
    )
    assert "torch.compile (inductor)" in proc.stdout
    ckpt = tmp_path / "c" / "checkpoints" / "last.pt"
    saved = checkpoint_file.load(ckpt)["model"]  # verified against its digest, as eval and resume read it
    assert list(saved) == list(build_model(ModelConfig(pretrained="none"), 5).state_dict())
    epoch = [r for r in metrics(tmp_path / "c") if r["event"] == "epoch"][0]
    assert epoch["val_count"] == 23 and epoch["train_images"] == 16
    proc = cli(["eval", str(ckpt), "--data", str(SAMPLE), "--workers", "0"])
    assert "/23)" in proc.stdout
