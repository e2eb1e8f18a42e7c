"""`data.stage_to`, on a pack of the 63 sample photos: a verified copy on first use, reused on a requeue, a partial
copy redone, a corrupted shard or a full disk refused in one line before training, a folder of class folders refused,
and `parts.checked_data` handing out splits that point into the staged copy."""

from __future__ import annotations

import json
import shutil
import time
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.state import AcceleratorState
from conftest import REPO, SAMPLE, TINY, cli, metrics, mounted_tmpfs

from flowers_dist import parts
from flowers_dist.config import Config
from flowers_dist.data import shards, stage
from flowers_dist.data.pack import pack
from flowers_dist.distributed import make_accelerator
from flowers_dist.errors import DataError
from flowers_dist.parts import checked_data

SHARD_MB = 0.3  # several shards per split


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("src") / "flowers"
    shutil.copytree(SAMPLE, source)  # the data check writes its cache into the root
    out = tmp_path_factory.mktemp("packed") / "pack"
    pack(source, out, shard_mb=SHARD_MB)
    return out


@pytest.fixture
def own_pack(packed, tmp_path) -> Path:
    """A copy of the pack this test may damage."""
    return Path(shutil.copytree(packed, tmp_path / "own"))


def listed_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def count_copies(monkeypatch) -> list[str]:
    copies: list[str] = []
    real = shutil.copyfile

    def counting(src, dst, *args, **kwargs):
        copies.append(str(src))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", counting)
    return copies


def test_staging_copies_every_file_of_the_pack_and_verifies_it(packed, tmp_path):
    staged = stage.stage(packed, str(tmp_path / "local"))
    assert not staged.reused and staged.root.parent == tmp_path / "local"
    assert staged.root.name.startswith(stage.PREFIX)
    assert listed_files(staged.root) == listed_files(packed)  # byte for byte, manifest included
    manifest = json.loads((packed / shards.MANIFEST).read_text())
    assert staged.copied == sum(p.stat().st_size for p in packed.rglob("*") if p.is_file())
    assert staged.copied == stage.needed_bytes(manifest, (packed / shards.MANIFEST).stat().st_size)
    shards.load(staged.root, verify=True)
    assert [p.name for p in (tmp_path / "local").iterdir() if p.is_dir()] == [staged.root.name]
    assert "staged" in staged.line() and str(staged.root) in staged.line()


def test_a_second_stage_reuses_the_copy_without_copying(packed, tmp_path, monkeypatch):
    first = stage.stage(packed, str(tmp_path))
    mtimes = {p: p.stat().st_mtime_ns for p in first.root.rglob("*")}
    copies = count_copies(monkeypatch)
    again = stage.stage(packed, str(tmp_path))
    assert again.reused and again.root == first.root and again.copied == 0
    assert copies == []
    assert {p: p.stat().st_mtime_ns for p in first.root.rglob("*")} == mtimes
    assert "reused" in again.line()


def test_a_partial_copy_without_its_manifest_is_cleaned_and_redone(packed, tmp_path, monkeypatch):
    dest = stage.destination(packed, str(tmp_path))
    (dest / "train").mkdir(parents=True)
    (dest / "train" / "shard-000000.tar").write_bytes(b"half a shard")
    (dest / "leftover.tmp").write_bytes(b"x")
    copies = count_copies(monkeypatch)
    staged = stage.stage(packed, str(tmp_path))
    assert not staged.reused and staged.root == dest
    assert listed_files(dest) == listed_files(packed)  # the leftover is gone, the shard whole
    assert len(copies) == len(listed_files(packed)) - 1  # every file but the manifest, written apart


def test_a_complete_looking_copy_with_a_truncated_shard_is_redone(packed, tmp_path):
    dest = stage.stage(packed, str(tmp_path)).root
    shard = dest / "val" / "shard-000000.idx"
    shard.write_bytes(shard.read_bytes()[:-5])
    staged = stage.stage(packed, str(tmp_path))
    assert not staged.reused and listed_files(dest) == listed_files(packed)


def test_a_flipped_byte_in_the_source_is_one_line_naming_the_shard_and_leaves_no_copy(own_pack, tmp_path):
    shard = own_pack / "train" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # the size stays: only the checksum can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        stage.stage(own_pack, str(tmp_path / "local"))
    message = str(err.value)
    assert "\n" not in message and "train/shard-000001.tar" in message and "SHA-256" in message
    dest = stage.destination(own_pack, str(tmp_path / "local"))
    assert not dest.exists()  # no half copy is left on the node's disk


def test_no_room_is_one_line_before_anything_is_copied(packed, tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    copies = count_copies(monkeypatch)
    with pytest.raises(DataError) as err:
        stage.stage(packed, str(tmp_path / "local"))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"data.stage_to={tmp_path / 'local'}: needs 0.00 GB, 0.00 GB free")
    assert copies == [] and not (tmp_path / "local").exists()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 1 MiB tmpfs (root only): smaller than the 2 MB pack."""
    with mounted_tmpfs(tmp_path / "disk", "1m") as mount:
        yield mount


def test_a_real_disk_too_small_is_refused_before_copying(packed, tiny_tmpfs):
    with pytest.raises(DataError, match=r"needs 0\.00 GB, 0\.00 GB free") as err:
        stage.stage(packed, str(tiny_tmpfs / "flowers-dist"))
    assert "\n" not in str(err.value)
    assert not any(tiny_tmpfs.iterdir())


def test_a_folder_of_class_folders_is_refused_in_one_line(tmp_path):
    with pytest.raises(DataError) as err:
        stage.stage(SAMPLE, str(tmp_path))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("data.stage_to needs a packed data set: run `flowers-dist data pack")
    assert list(tmp_path.iterdir()) == []


def test_environment_variables_in_the_folder_are_expanded_and_an_unset_one_is_an_error(packed, tmp_path, monkeypatch):
    monkeypatch.setenv("NODE_SCRATCH", str(tmp_path / "scratch"))
    assert stage.destination(packed, "$NODE_SCRATCH/fd").parent == tmp_path / "scratch" / "fd"
    monkeypatch.delenv("NODE_SCRATCH")
    with pytest.raises(DataError, match=r"data.stage_to=\$NODE_SCRATCH/fd: an environment variable in it is not set"):
        stage.destination(packed, "$NODE_SCRATCH/fd")


def test_the_slurm_script_stages_a_pack_unless_told_otherwise(packed, tmp_path):
    quickstart = str(REPO / "configs" / "quickstart.yaml")
    assert stage.slurm_default(["--config", quickstart, f"data.root={packed}"]) == (
        "data.stage_to=$SLURM_TMPDIR/flowers-dist"
    )
    assert stage.slurm_default(["--config", quickstart, f"data.root={SAMPLE}"]) is None  # a folder: not staged
    assert stage.slurm_default(["--config", quickstart, f"data.root={packed}", "data.stage_to="]) is None
    own = tmp_path / "own.yaml"
    own.write_text(f"data:\n  root: {packed}\n  stage_to: /nvme/me\n")
    assert stage.slurm_default(["--config", str(own)]) is None  # the config's own choice stands
    assert stage.slurm_default(["--config", quickstart, "data.nope=1"]) is None  # training reports that


@pytest.fixture
def accelerator():
    acc = make_accelerator("cpu", "no")
    yield acc
    AcceleratorState._reset_state(reset_partial_state=True)  # no Accelerator leaks into other tests


def test_checked_data_trains_from_the_staged_copy(packed, tmp_path, accelerator, capsys, monkeypatch):
    monkeypatch.setenv("NODE_SCRATCH", str(tmp_path))
    cfg = Config()
    cfg.data.root, cfg.data.stage_to = str(packed), "$NODE_SCRATCH/fd"
    cfg.train.global_batch_size = 8
    data = checked_data(cfg, accelerator)
    staged = stage.destination(packed, str(tmp_path / "fd"))
    assert (staged / shards.MANIFEST).is_file()
    for split in (data.train, data.val):
        assert split.root.parent == staged
        assert {m.shard.parent.parent for m in split.members} == {staged}
    unstaged = checked_data(Config(data=type(cfg.data)(root=str(packed))), accelerator)
    assert [m.key for m in data.train.members] == [m.key for m in unstaged.train.members]
    assert [m.label for m in data.val.members] == [m.label for m in unstaged.val.members]
    assert f"data.stage_to: staged 2 MB to {staged}" in capsys.readouterr().out


def test_checked_data_raises_a_staging_error_as_a_data_error(tmp_path, accelerator):
    cfg = Config()
    cfg.data.root, cfg.data.stage_to = str(SAMPLE), str(tmp_path)
    with pytest.raises(DataError, match="data.stage_to needs a packed data set"):
        checked_data(cfg, accelerator)


class OtherRanks:
    """gather_object as a 2-process world would answer it: this rank's item, then the other rank's."""

    def __init__(self, other_outcome) -> None:
        self.other_outcome, self.calls = other_outcome, []

    def __call__(self, items: list) -> list:
        self.calls.append(items[0])
        other = True if isinstance(items[0], bool) else self.other_outcome
        return [items[0], other]


def test_an_error_on_another_node_is_raised_on_a_rank_whose_own_staging_worked(packed, tmp_path, monkeypatch):
    gather = OtherRanks(DataError("data.stage_to=/x: needs 9.00 GB, 1.00 GB free on /x"))
    monkeypatch.setattr(parts, "gather_object", gather)
    rank1 = SimpleNamespace(is_local_main_process=False, process_index=1)
    cfg = type(Config().data)(root=str(packed), stage_to=str(tmp_path))
    with pytest.raises(DataError, match="needs 9.00 GB, 1.00 GB free"):
        parts.staged_data(cfg, rank1)
    assert gather.calls[-1] == stage.destination(packed, str(tmp_path))  # its own part went well
    assert not any(tmp_path.iterdir())  # only a local main process copies


def test_the_processes_keep_meeting_while_a_slow_copy_runs(packed, tmp_path, monkeypatch):
    real = stage.stage

    def slow(*args):
        time.sleep(0.5)
        return real(*args)

    monkeypatch.setattr(stage, "stage", slow)
    monkeypatch.setattr(parts, "STAGE_POLL_S", 0.05)
    gather = OtherRanks(stage.destination(packed, str(tmp_path)))
    monkeypatch.setattr(parts, "gather_object", gather)
    rank0 = SimpleNamespace(is_local_main_process=True, process_index=0)
    cfg = type(Config().data)(root=str(packed), stage_to=str(tmp_path))
    assert parts.staged_data(cfg, rank0).root == str(stage.destination(packed, str(tmp_path)))
    polls = [c for c in gather.calls if isinstance(c, bool)]
    assert len(polls) >= 5 and polls[-1] and not any(polls[:-1])  # short collectives, none waiting for the copy


@pytest.mark.e2e
def test_two_processes_stage_once_and_train_from_the_copy(packed, tmp_path):
    local = tmp_path / "local"
    proc = cli(
        [
            "train",
            "--config",
            str(REPO / "configs" / "quickstart.yaml"),
            *TINY,
            f"data.root={packed}",
            f"data.stage_to={local}",
            "data.loader=torch",
            "train.epochs=1",
            "train.max_steps_per_epoch=1",
            f"train.output_dir={tmp_path / 'runs'}",
            "train.name=staged",
            "tracking.wandb=disabled",
        ],
        nprocs=2,
    )
    out = proc.stdout + proc.stderr
    assert out.count("data.stage_to: staged") == 1, out[-3000:]
    (staged,) = [p for p in local.iterdir() if p.is_dir()]
    assert listed_files(staged) == listed_files(packed)
    assert any(record["event"] == "end" for record in metrics(tmp_path / "runs" / "staged"))


@pytest.mark.e2e
def test_a_copy_failing_its_check_on_the_local_main_process_stops_both_processes_in_one_line(own_pack, tmp_path):
    shard = own_pack / "val" / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0x01
    shard.write_bytes(bytes(data))
    proc = cli(
        [
            "train",
            "--config",
            str(REPO / "configs" / "quickstart.yaml"),
            *TINY,
            f"data.root={own_pack}",
            f"data.stage_to={tmp_path / 'local'}",
            f"train.output_dir={tmp_path / 'runs'}",
        ],
        nprocs=2,
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("flowers-dist: error:")]
    assert errors == [
        "flowers-dist: error: data.stage_to: staged val/shard-000000.tar fails its SHA-256 check against the "
        f"manifest of {own_pack} (source corrupted?)"
    ]
    assert not (tmp_path / "runs").exists()  # stopped before a run folder was claimed
