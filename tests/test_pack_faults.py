"""Faults of a packed data set, each done to a real copy of a real pack of the 63 sample photos: a truncated or
replaced shard, a missing or stale index and a manifest that disagrees are one line naming the file before training;
a sample that no longer decodes is a logged skip with the PyTorch loader and one line naming its shard and key with
DALI; `data check PACK` names every one of them; a staging disk that fills mid-copy is one line."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState
from conftest import SAMPLE, TINY, cli, metrics, mounted_tmpfs

from flowers_dist.cli import main
from flowers_dist.config import DataConfig
from flowers_dist.data import shards, stage
from flowers_dist.data.pack import pack
from flowers_dist.data.pack_check import check_pack
from flowers_dist.data.torch_loader import ImageFiles, eval_transform
from flowers_dist.data.usable import usable_splits
from flowers_dist.errors import DataError

SHARD_MB = 0.3  # several shards per split


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src") / "flowers"
    shutil.copytree(SAMPLE, root)  # the data check writes its cache into the root
    return root


@pytest.fixture(scope="module")
def packed(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "pack"
    pack(source, out, shard_mb=SHARD_MB)
    return out


@pytest.fixture(scope="module")
def other_pack(source, tmp_path_factory) -> Path:
    """The same data packed with another shard size: its index files are stale for `packed`."""
    out = tmp_path_factory.mktemp("other") / "pack"
    pack(source, out, shard_mb=0.5)
    return out


@pytest.fixture
def own_pack(packed, tmp_path) -> Path:
    """A copy of the pack this test may damage."""
    return Path(shutil.copytree(packed, tmp_path / "own"))


def _manifest(pack_root: Path) -> dict:
    return json.loads((pack_root / shards.MANIFEST).read_text())


def _edit_manifest(pack_root: Path, edit: Callable[[dict], None]) -> None:
    manifest = _manifest(pack_root)
    edit(manifest)
    (pack_root / shards.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _swap(a: Path, b: Path) -> None:
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)


def _same_size_shards(pack_root: Path) -> tuple[str, str]:
    """Two train shards of the same byte size (tars are padded to 10 KiB records): a swap keeps every size."""
    by_size: dict[int, list[str]] = {}
    for sh in _manifest(pack_root)["splits"]["train"]["shards"]:
        by_size.setdefault(sh["bytes"], []).append(sh["file"])
    pair = next(files for files in by_size.values() if len(files) > 1)
    return pair[0], pair[1]


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-10240])  # the last record: the end marker and part of the last sample


def _zero_tail(p: Path) -> None:
    """The second half zeroed, the size kept: a copy that stopped inside a preallocated file."""
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))


def _more_daisies(manifest: dict) -> None:
    manifest["splits"]["train"]["class_counts"]["daisy"] += 1


def _fewer_samples_in_a_shard(manifest: dict) -> None:
    manifest["splits"]["val"]["shards"][1]["samples"] -= 1


# fault -> (what it does to a copy of the pack, given the other pack; what the start-up error says; the line
# `data check PACK` prints)
START_FAULTS = {
    "truncated shard": (
        lambda root, other: _truncate(root / "train/shard-000001.tar"),
        r"train/shard-000001\.tar is \d+ bytes, the manifest says \d+ \(truncated or replaced\)",
        r"train/shard-000001\.tar: \d+ bytes, the manifest says",
    ),
    "zeroed tail, same size": (
        lambda root, other: _zero_tail(root / "train/shard-000003.tar"),
        r"index train/shard-000003\.idx does not fit train/shard-000003\.tar: the tar holds no member at byte \d+",
        r"train/shard-000003\.tar: fails its SHA-256 check .*; the index does not fit the tar",
    ),
    "missing index": (
        lambda root, other: (root / "train/shard-000001.idx").unlink(),
        r"train/shard-000001\.idx is missing",
        r"train/shard-000001\.idx: missing",
    ),
    "indexes swapped": (
        lambda root, other: _swap(root / "train/shard-000000.idx", root / "train/shard-000001.idx"),
        r"train/shard-000000\.idx .*\(the index of train/shard-000000\.tar: stale, written for another shard or pack\?\)",
        r"train/shard-000000\.idx: \d+ bytes, the manifest says",
    ),
    "index of another pack": (
        lambda root, other: shutil.copyfile(other / "train/shard-000000.idx", root / "train/shard-000000.idx"),
        r"train/shard-000000\.idx .*\(the index of train/shard-000000\.tar: stale",
        r"train/shard-000000\.idx: ",
    ),
    "shards swapped, same size": (
        lambda root, other: _swap(*(root / f for f in _same_size_shards(root))),
        r"index train/shard-00000\d\.idx does not fit train/shard-00000\d\.tar: the tar holds '\d{8}\.jpg' at byte 512",
        r"train/shard-00000\d\.tar: fails its SHA-256 check .*; the index does not fit the tar: member 0 is",
    ),
    "manifest count edited": (
        lambda root, other: _edit_manifest(root, _more_daisies),
        r"manifest\.json disagrees with train/samples\.tsv: train holds 'daisy' sample\(s\): (\d+) by the manifest, "
        r"(?!\1)\d+ by the listing",
        r"train/samples\.tsv: disagrees with manifest\.json: train holds 'daisy'",
    ),
    "manifest shard count edited": (
        lambda root, other: _edit_manifest(root, _fewer_samples_in_a_shard),
        r"index val/shard-000001\.idx does not fit val/shard-000001\.tar: it lists (\d+) samples, the manifest (?!\1)",
        r"val/shard-000001\.idx: lists (\d+) samples, manifest\.json says (?!\1)\d+",
    ),
}


@pytest.mark.parametrize("fault", START_FAULTS)
def test_a_fault_of_the_pack_is_one_line_naming_it_before_training_and_in_data_check(fault, own_pack, other_pack):
    damage, at_start, in_check = START_FAULTS[fault]
    assert check_pack(own_pack, DataConfig()).exit_code == 0  # the copy was whole
    damage(own_pack, other_pack)
    with pytest.raises(DataError) as err:
        usable_splits(DataConfig(root=str(own_pack)))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"packed data {own_pack}: ")
    assert re.search(at_start, message), message
    report = check_pack(own_pack, DataConfig())
    assert report.exit_code == 2 and any(re.fullmatch(in_check + ".*", b) for b in report.bad), report.bad


@pytest.fixture
def no_accelerator_left():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)  # `train` in this process made one


def test_a_shards_class_counts_are_compared_by_data_check_not_at_start(own_pack):
    """Per shard and class the manifest's counts only inform (a start reads no such table): the full check names them."""

    def move_a_daisy(manifest: dict) -> None:
        counts = manifest["splits"]["train"]["shards"][2]["class_counts"]
        first, second = sorted(counts)[:2]
        counts[first], counts[second] = counts[first] + 1, counts[second] - 1

    _edit_manifest(own_pack, move_a_daisy)
    usable_splits(DataConfig(root=str(own_pack)))
    assert check_pack(own_pack, DataConfig()).bad == [
        "train/samples.tsv: train/shard-000002.tar holds 'daisy' sample(s): 3 by manifest.json, 2 by the listing"
    ]


def test_train_stops_in_one_line_with_exit_2_and_leaves_no_run_folder(
    own_pack, tmp_path, capsys, monkeypatch, no_accelerator_left
):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    (own_pack / "val/shard-000002.idx").unlink()
    code = main(["train", "--config", "configs/quickstart.yaml", *TINY, f"data.root={own_pack}",
                 f"train.output_dir={tmp_path / 'runs'}", "train.name=r"])  # fmt: skip
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("flowers-dist: error:")]
    assert code == 2
    assert errors == [
        f"flowers-dist: error: packed data {own_pack}: val/shard-000002.idx is missing "
        "(pack again with `flowers-dist data pack`)"
    ]
    assert not (tmp_path / "runs" / "r").exists()


@pytest.fixture
def broken_sample(own_pack) -> tuple[Path, shards.Sample]:
    """The first sample of train's second shard with its first byte flipped (the JPEG's SOI): same size, so the
    start-up checks pass, and neither decoder takes it for an image any more."""
    sample = min(
        (s for s in shards.samples(shards.load(own_pack), "train") if s.shard.name == "shard-000001.tar"),
        key=lambda s: s.offset,
    )
    data = bytearray(sample.shard.read_bytes())
    data[sample.offset] ^= 0x01
    sample.shard.write_bytes(bytes(data))
    return own_pack, sample


def test_a_sample_that_does_not_decode_passes_the_start_and_data_check_names_it(broken_sample, capsys):
    root, sample = broken_sample
    train, _, _ = usable_splits(DataConfig(root=str(root)))  # sizes, indexes and counts are whole: not seen at start
    assert shards.suspect_samples(train.members) == [f"train/shard-000001.tar:{sample.key}"]
    assert main(["data", "check", str(root), "--progress", "none"]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert "  train/shard-000001.tar: fails its SHA-256 check against the manifest (corrupted)" in lines
    assert main(["data", "check", str(root), "--decode", "--workers", "2", "--progress", "none"]) == 2
    out = capsys.readouterr().out
    assert f"  train/shard-000001.tar:{sample.key}: not_image: unknown binary data (not an image)" in out.splitlines()
    assert "samples that do not decode (1):" in out and out.endswith("exit 2: training would stop or skip: pack again "
                                                                       "with `data pack`\n")  # fmt: skip


def test_the_torch_loader_skips_the_sample_naming_its_shard_and_key(broken_sample, caplog):
    root, sample = broken_sample
    train, _, _ = usable_splits(DataConfig(root=str(root)))
    dataset = ImageFiles(train, eval_transform(DataConfig(image_size=32)), seed=0)
    index = [m.key for m in train.members].index(sample.key)
    assert dataset[index, 0] is None and dataset[(index + 1) % len(train), 0] is not None
    assert f"skipping unreadable sample {sample.key} in {sample.shard}: cannot identify image file" in caplog.text


def test_damage_inside_a_jpegs_data_decodes_and_only_the_checksum_sees_it(own_pack):
    """A flipped byte in the middle of the entropy-coded data decodes to damaged pixels in PIL (and DALI), no error:
    `data check PACK` names the shard by its SHA-256, --decode has nothing to add."""
    sample = shards.samples(shards.load(own_pack), "val")[5]
    data = bytearray(sample.shard.read_bytes())
    data[sample.offset + sample.size // 2] ^= 0x01
    sample.shard.write_bytes(bytes(data))
    report = check_pack(own_pack, DataConfig(), decode=True)
    assert [b.split(":")[0] for b in report.bad] == [sample.shard.relative_to(own_pack).as_posix()]
    assert report.undecodable == [] and report.exit_code == 2


def test_a_staging_disk_that_fills_during_the_copy_is_one_line_and_leaves_nothing(packed, tmp_path, monkeypatch):
    """The free-space check passes (another job fills the disk meanwhile); the copy meets ENOSPC for real on a 1 MiB
    tmpfs. (A disk too small from the start is refused before copying: tests/test_stage.py.)"""
    with mounted_tmpfs(tmp_path / "disk", "1m") as disk:
        monkeypatch.setattr(stage, "free_bytes", lambda folder: 10**12)
        with pytest.raises(DataError) as err:
            stage.stage(packed, str(disk / "fd"))
        message = str(err.value)
        assert "\n" not in message and "No space left on device" in message
        assert message.startswith(f"data.stage_to={disk / 'fd'}: cannot copy {packed} to ")
        assert list((disk / "fd").iterdir()) in ([], [stage.destination(packed, str(disk / "fd")).with_suffix(".lock")])


def _train(root: Path, out: Path, loader: str, timeout: float):
    return cli(
        ["train", "--config", "configs/quickstart.yaml", *TINY, f"data.root={root}", f"data.loader={loader}",
         "train.epochs=1", f"train.output_dir={out}", "train.name=r"],
        timeout=timeout, check=False,
    )  # fmt: skip


@pytest.mark.e2e
def test_a_run_with_the_torch_loader_logs_the_skip_and_finishes(broken_sample, tmp_path):
    root, sample = broken_sample
    proc = _train(root, tmp_path, "torch", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping unreadable sample {sample.key} in {sample.shard}: cannot identify image file" in proc.stderr
    [epoch] = [r for r in metrics(tmp_path / "r") if r.get("event") == "epoch"]
    assert epoch["train_images"] == 39  # 40 packed, 40 // 8 full batches, one sample skipped


@pytest.mark.e2e
def test_a_run_with_dali_stops_in_one_line_naming_the_shard_and_key(broken_sample, tmp_path):
    pytest.importorskip("nvidia.dali")
    root, sample = broken_sample
    proc = _train(root, tmp_path, "dali", timeout=240)  # a hang would fail here, not block CI
    errors = [line for line in proc.stderr.splitlines() if line.startswith("flowers-dist: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert f"the DALI pipeline failed on {root}/train: " in errors[0]
    assert f"samples that look truncated or not images: train/shard-000001.tar:{sample.key} " in errors[0]
    assert errors[0].endswith(f"`flowers-dist data check {root} --decode` names every sample that does not decode)")
