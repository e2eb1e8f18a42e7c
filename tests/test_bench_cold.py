"""Cold data in `bench loader`: eviction from the page cache, its check with mincore, and the folder-vs-shards benchmark."""

from __future__ import annotations

import importlib.util
import json
import mmap
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO
from test_bench import TINY_BENCH

from flowers_dist.bench import pagecache
from flowers_dist.cli import main

SAMPLE = REPO / "data" / "flowers_sample"


def _photos(tmp_path: Path, count: int = 6) -> list[Path]:
    """Real JPEGs copied to tmp_path and flushed, so that nothing dirty keeps them cached."""
    out = []
    for src in sorted((SAMPLE / "train").rglob("*.jpg"))[:count]:
        dst = tmp_path / src.name
        shutil.copyfile(src, dst)
        out.append(dst)
    return out


def _fincore_pages(path: Path) -> int:
    out = subprocess.run(["fincore", "-rno", "PAGES", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def _evicts_here(paths: list[Path]) -> None:
    """Skip where the file system keeps evicted pages; judged by fincore where it exists (not by the code under test)."""
    pagecache.evict(paths)
    if shutil.which("fincore"):
        left = sum(_fincore_pages(p) for p in paths)
    else:
        left = pagecache.residency(paths).resident_pages
    if left > sum(p.stat().st_size for p in paths) / mmap.PAGESIZE / 2:
        pytest.skip(f"this file system keeps pages after posix_fadvise(DONTNEED) ({left} pages still resident)")


def test_evicted_files_are_measured_out_of_the_cache_and_read_files_back_in(tmp_path):
    photos = _photos(tmp_path)
    _evicts_here(photos)
    assert pagecache.residency(photos).fraction == 0.0
    for p in photos:
        p.read_bytes()
    read = pagecache.residency(photos)
    assert read.fraction == 1.0 and read.files == len(photos)
    assert read.total_pages == sum(-(-p.stat().st_size // mmap.PAGESIZE) for p in photos)
    check = pagecache.evict_and_check(photos)
    assert check["cold"] and check["resident_fraction"] == 0.0 and check["evictions"] == 1


@pytest.mark.skipif(shutil.which("fincore") is None, reason="util-linux fincore is not installed")
def test_resident_pages_agree_with_fincore_on_a_partly_read_file(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(b"".join(p.read_bytes() for p in sorted((SAMPLE / "train").rglob("*.jpg"))))
    _evicts_here([big])
    fd = os.open(big, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead: only the pages read come in
        for page in (0, 10, 100):
            os.pread(fd, 1, page * mmap.PAGESIZE)
    finally:
        os.close(fd)
    ours = pagecache.residency([big]).resident_pages
    assert 0 < ours < -(-big.stat().st_size // mmap.PAGESIZE)
    assert ours == _fincore_pages(big)


def test_a_mapped_file_stays_cached_and_the_check_says_so(tmp_path):
    (photo,) = _photos(tmp_path, 1)
    _evicts_here([photo])
    with open(photo, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapping:
        bytes(mapping)  # a reader's mmap (DALI's default) pins the pages it touched
        check = pagecache.evict_and_check([photo], pause_s=0.0)
    assert not check["cold"] and check["resident_fraction"] == 1.0
    assert check["mapped_files"] == 1 and check["evictions"] == 3


@pytest.mark.parametrize("layout", ["folder", "pack"])
def test_loader_mode_at_both_temperatures_writes_warm_and_checked_cold_rows(tmp_path, capsys, layout):
    root = []
    if layout == "pack":  # DALI's shard reader must not map the shards, or they never leave the cache
        assert main(["data", "pack", str(SAMPLE), str(tmp_path / "pack"), "--shard-size", "1"]) == 0
        root = [f"data.root={tmp_path / 'pack'}"]
    out = tmp_path / "loader.json"
    args = ["bench", "loader", *TINY_BENCH, *root, "--repeats", "1", "--temperature", "both", "--out", str(out)]
    assert main(args) == 0
    results = json.loads(out.read_text())["results"]
    rows = {(r["setting"], r["temperature"]): r for r in results["rows"]}
    settings = {"dali", "torch", "dali_decode_only", "pil_decode_only", "dali_with_dali_ops"}
    assert set(rows) == {(s, t) for s in settings for t in ("warm", "cold")}
    assert results["temperatures"] == ["warm", "cold"]
    # The folder's 40 train images, or the pack's shards, their indexes, its listing and manifest.
    assert results["files_evicted"] == (
        40 if layout == "folder" else 2 * len(list((tmp_path / "pack/train").glob("*.tar"))) + 2
    )
    for s in settings:
        assert "residency" not in rows[s, "warm"]
        (check,) = rows[s, "cold"]["residency"]  # one repeat of one timed epoch
        assert check["cold"] and check["resident_fraction"] < pagecache.EVICTED_BELOW
        # DALI's file reader maps the few files it reads ahead; its shard reader must map none.
        assert check["mapped_files"] == 0 or layout == "folder"
        warm, cold = rows[s, "warm"]["images_per_s"]["median"], rows[s, "cold"]["images_per_s"]["median"]
        assert results["cold_over_warm"][s] == pytest.approx(cold / warm)
    assert results["cold_check"]["verified"] and "mincore" in results["cold_check"]["method"]
    printed = capsys.readouterr().out
    assert "cold/warm" in printed and "warm img/s" in printed and "cold: every timed epoch started" in printed


def test_many_files_benchmark_makes_packs_and_measures_both_layouts(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("many_files", REPO / "benchmarks" / "many_files.py")
    many_files = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(many_files)
    out = tmp_path / "many.json"
    small = ["data.image_size=32", "train.global_batch_size=8"]
    results = many_files.main(
        ["--n", "60", "--source", str(SAMPLE), "--keep", str(tmp_path), "--out", str(out), *small]
    )
    assert json.loads(out.read_text())["n"] == 60
    folder, shards = results["layouts"]["folder"], results["layouts"]["shards"]
    assert folder["images"] == shards["images"] == 60 == len(list((tmp_path / "folder/train").rglob("*.jpg")))
    assert folder["files"] == 60 and shards["files"] < folder["files"]
    for layout in (folder, shards):
        temps = {(r["setting"], r["temperature"]) for r in layout["rows"]}
        assert temps == {(s, t) for s in ("dali", "torch") for t in ("warm", "cold")}
        assert layout["cold_check"]["verified"] and layout["listing_s"] > 0
        assert set(layout["first_batch_cold_s"]) == {"dali", "torch"} and min(layout["first_batch_cold_s"].values()) > 0
    printed = capsys.readouterr().out
    assert "| folder | 60 | 60 |" in printed and "| shards | 60 |" in printed and "processor:" in printed
