"""The real data set packed (`data pack ../shared/flowers`) and trained on by 2 processes with each loader: the pack
holds every file the data check keeps, and the run's audit records cover one epoch's samples once across the ranks."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SHARED_FLOWERS, cli, metrics

from flowers_dist import metrics_log
from flowers_dist.data import shards
from flowers_dist.data.audit import FOLDER, NAME, read_samples

pytestmark = pytest.mark.e2e

# ../shared/flowers/README.md: the complete splits, per class.
SOURCE_COUNTS = {
    "train": {"daisy": 506, "dandelion": 718, "roses": 512, "sunflowers": 559, "tulips": 639},
    "val": {"daisy": 127, "dandelion": 180, "roses": 129, "sunflowers": 140, "tulips": 160},
}
GLOBAL_BATCH = 512  # 2,931 samples: 5 optimizer steps of 256 per process; the tail of 371 is the epoch's drop
# Cheap on 2 cores: the quickstart's 0.37 M-parameter model from scratch (no download) on 64 px crops; every JPEG
# of the epoch is still decoded at full size (up to 500x375), which is what the run costs.
TRAIN = [
    "train",
    "--config",
    "configs/quickstart.yaml",
    "model.name=test_resnet",
    "model.pretrained=none",
    "data.image_size=64",
    "data.num_workers=0",
    "train.progress=lines",
    f"train.global_batch_size={GLOBAL_BATCH}",
    "train.eval_batch_size=128",
    "train.epochs=1",
    "train.record_samples=true",
    "tracking.mistakes=0",
]
DUPLICATE_OF = re.compile(r"^same bytes as (\S+)")


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Iterator[tuple[Path, str]]:
    """../shared/flowers packed by the CLI (its data check cached in a fresh folder: the real check runs), and the
    line the CLI printed; the 240 MB pack is deleted after the module."""
    if not (SHARED_FLOWERS / "train").is_dir():
        pytest.skip(f"the real data set is not at {SHARED_FLOWERS}")
    base = tmp_path_factory.mktemp("real_pack")
    out = base / "flowers"
    proc = cli(["data", "pack", str(SHARED_FLOWERS), str(out), "--progress", "none"], env={"XDG_CACHE_HOME": str(base)})
    yield out, proc.stdout.strip()
    shutil.rmtree(out, ignore_errors=True)


def _source_files(split: str) -> set[str]:
    return {p.relative_to(SHARED_FLOWERS).as_posix() for p in (SHARED_FLOWERS / split).rglob("*") if p.is_file()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_pack_holds_every_file_the_data_check_keeps(packed):
    out, line = packed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["root"] == str(SHARED_FLOWERS.resolve())
    skipped = manifest["check"]["skipped"]
    pack = shards.load(out, verify=True)  # every shard, index and listing against the manifest's SHA-256s
    sources: dict[str, set[str]] = {}
    for split, want in SOURCE_COUNTS.items():
        files = _source_files(split)
        assert Counter(f.split("/")[1] for f in files) == want  # what was there: the README's counts
        gone = {v["path"] for v in skipped if v["path"].startswith(f"{split}/")}
        samples = shards.samples(pack, split)
        # Each sample is its source file's bytes, under its class folder's label.
        for s in samples:
            assert pack.classes[s.label] == s.source.split("/")[1], s
            assert shards.read_sample(s) == (SHARED_FLOWERS / s.source).read_bytes(), s
        sources[split] = {s.source for s in samples}
        # Every source file is packed exactly once or named as left out, never both.
        assert len(samples) == len(sources[split]) == manifest["splits"][split]["samples"]
        assert sources[split] | gone == files and not sources[split] & gone
        per_class = Counter(f.split("/")[1] for f in gone)
        assert {c: n + per_class[c] for c, n in manifest["splits"][split]["class_counts"].items()} == want
    # What the check left out on this data set, and why: 3 byte-identical copies, each of a file that was packed.
    assert manifest["check"]["skipped_by_kind"] == {"duplicate": 3}
    assert manifest["splits"]["train"]["samples"] == 2931 and manifest["splits"]["val"]["samples"] == 736
    for verdict in skipped:
        original = DUPLICATE_OF.match(verdict["detail"]).group(1)
        copy = SHARED_FLOWERS / verdict["path"]
        assert original in sources["train"] and _sha256(copy) == _sha256(SHARED_FLOWERS / original), verdict
    assert line.startswith("packed train 2931 samples") and "3 file(s) left out by the data check" in line


def _per_rank(run: Path, epoch: int) -> dict[int, list[str]]:
    """Each process's records of the epoch (one part each: the run did not resume)."""
    parts: dict[int, list[str]] = {}
    for path in sorted((run / FOLDER).iterdir()):
        m = NAME.match(path.name)
        if m and int(m.group(1)) == epoch:
            assert int(m.group(3)) == 0, f"{path.name}: a part from a resumed step, in a run that did not resume"
            parts.setdefault(int(m.group(2)), []).extend(path.read_text().split())
    return parts


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_two_processes_train_each_sample_of_the_real_pack_once_and_evaluate_all(packed, tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    out, _ = packed
    cli([*TRAIN, f"data.root={out}", f"data.loader={loader}", f"train.output_dir={tmp_path}", "train.name=r"], nprocs=2)
    run = tmp_path / "r"
    pack = shards.load(out)
    train_keys = {m.key for m in shards.split(pack, "train").members}
    steps = len(train_keys) // GLOBAL_BATCH
    ranks = _per_rank(run, 0)
    counts = read_samples(run, 0)
    assert sorted(ranks) == [0, 1]
    assert all(len(keys) == steps * GLOBAL_BATCH // 2 for keys in ranks.values())
    assert not set(ranks[0]) & set(ranks[1])
    assert set(counts) <= train_keys and set(counts.values()) == {1} and len(counts) == steps * GLOBAL_BATCH
    (epoch,) = metrics_log.events(metrics(run), "epoch")
    assert epoch["train_images"] == steps * GLOBAL_BATCH and epoch["step"] == steps
    val_samples = len(shards.split(pack, "val").members)
    assert val_samples == 736 and epoch["val_count"] == val_samples
    assert sum(map(sum, epoch["val_confusion"])) == val_samples
