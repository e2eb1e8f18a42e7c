"""`flowers-dist data pack` and its reader, on the 63 sample photos: the shards hold the source's bytes and labels,
interleaved, in GNU tars with wds2idx indexes that agree with tarfile and DALI; packing is deterministic,
leaves no complete-looking pack when interrupted, and the reader's checks catch a damaged shard."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tarfile
from pathlib import Path

import pytest
from conftest import SAMPLE

from flowers_dist.cli import main
from flowers_dist.data import pack as pack_module
from flowers_dist.data import shards
from flowers_dist.data.folder import IMAGE_SUFFIXES
from flowers_dist.data.pack import interleave, pack
from flowers_dist.errors import DataError

SHARD_MB = 0.3  # about ten photos a shard: several shards per split
SPLITS = ("train", "val")


def all_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def source_files(root: Path, split: str) -> dict[str, int]:
    """Every image under root/split/<class>/ -> its class index, found without the package's scanner."""
    classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
    return {
        f.relative_to(root).as_posix(): label
        for label, c in enumerate(classes)
        for f in (root / split / c).iterdir()
        if f.suffix.lower() in IMAGE_SUFFIXES
    }


def tar_samples(tar_path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes}, read with tarfile (independently of the index)."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def second_shard_member(packed: Path) -> int:
    """How many tar members are written before the third member of train's second shard (two per sample)."""
    first = json.loads((packed / "manifest.json").read_text())["splits"]["train"]["shards"][0]["samples"]
    return 2 * first + 2


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    # A copy: the data check writes its cache into the root, and a test below adds a broken file to its own copy.
    root = tmp_path_factory.mktemp("src") / "flowers"
    shutil.copytree(SAMPLE, root)
    return root


@pytest.fixture(scope="module")
def packed(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "out"
    pack(source, out, shard_mb=SHARD_MB)
    return out


def test_interleave_spreads_every_class_over_the_whole_order():
    # Written class by class (DALI's buffer shuffle would then give one-class batches); uneven classes.
    labels = [c for c in range(10) for _ in range(60 + 10 * c)]
    order = interleave(labels, seed=0)
    assert sorted(order) == list(range(len(labels)))
    assert order == interleave(labels, seed=0) and order != interleave(labels, seed=1)
    seq = [labels[i] for i in order]
    # A plain shuffle leaves some 40-sample stretch without one of the 10 classes; an even spread never does.
    assert all(len(set(seq[i : i + 40])) == 10 for i in range(len(seq) - 40))


def test_packing_twice_gives_identical_bytes(source, packed, tmp_path):
    again = tmp_path / "again"
    pack(source, again, shard_mb=SHARD_MB)
    first, second = all_files(packed), all_files(again)
    assert sorted(first) == sorted(second)
    assert len([n for n in first if n.endswith(".tar")]) >= 5
    assert all(first[n] == second[n] for n in first)
    other_seed = tmp_path / "seed1"
    pack(source, other_seed, shard_mb=SHARD_MB, seed=1)
    assert all_files(other_seed)["train/shard-000000.tar"] != first["train/shard-000000.tar"]


def test_shards_are_gnu_tars_with_fixed_metadata(packed):
    tars = sorted(packed.rglob("*.tar"))
    for tar_path in tars:
        data = tar_path.read_bytes()
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
        for m in members:
            header = data[m.offset : m.offset + 512]
            assert header[257:265] == b"ustar  \0", f"{tar_path.name}:{m.name} is not a GNU header"  # PAX: ustar\x0000
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.pax_headers) == (0, 0, 0, "", "", 0o644, {})
            assert m.isreg()
        # image then label, per sample
        assert [m.name.partition(".")[2] for m in members] == ["jpg", "cls"] * (len(members) // 2)


def test_shards_hold_every_usable_file_once_with_its_bytes_and_label(source, packed):
    manifest = json.loads((packed / "manifest.json").read_text())
    for split in SPLITS:
        expected = source_files(source, split)
        listing = [line.split("\t") for line in (packed / split / "samples.tsv").read_text().splitlines()[1:]]
        source_of = {key: src for key, _, _, src in listing}
        seen = []
        for tar_path in sorted((packed / split).glob("shard-*.tar")):
            for key, parts in tar_samples(tar_path).items():
                src = source_of[key]
                assert parts["jpg"] == (source / src).read_bytes()
                assert int(parts["cls"].decode("ascii")) == expected[src]
                seen.append(src)
        assert sorted(seen) == sorted(expected), split
        assert manifest["splits"][split]["samples"] == len(expected)


def test_index_files_agree_with_tarfile_and_wds2idx(packed, tmp_path):
    for tar_path in sorted(packed.rglob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = [(m.name, m.offset_data, m.size) for m in tar.getmembers()]
        index = tar_path.with_suffix(".idx").read_text().splitlines()
        assert index[0] == f"v1.2 {len(members) // 2}"
        from_index = [
            (name, int(offset), int(size))
            for line in index[1:]
            for _, offset, size, name in zip(*[iter(line.split())] * 4)
        ]
        assert from_index == members
    # NVIDIA's own tool (installed with DALI) writes the same bytes.
    wds2idx = pytest.importorskip("wds2idx")
    tar_path = packed / "val" / "shard-000000.tar"
    with wds2idx.IndexCreator(str(tar_path), str(tmp_path / "ref.idx"), verbose=False) as creator:
        creator.create_index()
    assert (tmp_path / "ref.idx").read_bytes() == tar_path.with_suffix(".idx").read_bytes()


def test_classes_are_interleaved_in_and_across_shards(packed):
    manifest = json.loads((packed / "manifest.json").read_text())
    classes = len(manifest["classes"])
    for split in SPLITS:
        shards_ = manifest["splits"][split]["shards"]
        assert len(shards_) >= 2
        for shard in shards_:
            if shard["samples"] >= 2 * classes:
                assert len(shard["class_counts"]) > 1, shard["file"]
        labels = [line.split("\t")[1] for line in (packed / split / "samples.tsv").read_text().splitlines()[1:]]
        assert len(set(labels[: 2 * classes])) >= classes - 1, labels[: 2 * classes]


def test_manifest_describes_the_files(source, packed):
    manifest = json.loads((packed / "manifest.json").read_text())
    assert (manifest["format"], manifest["version"], manifest["seed"]) == ("flowers-dist-shards", 1, 0)
    assert manifest["source"]["root"] == str(source.resolve())
    assert manifest["classes"] == sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    for split in SPLITS:
        s = manifest["splits"][split]
        expected = source_files(source, split)
        per_class = {c: sum(1 for label in expected.values() if label == i) for i, c in enumerate(manifest["classes"])}
        assert s["class_counts"] == per_class
        assert sum(sh["samples"] for sh in s["shards"]) == s["samples"] == len(expected)
        for c in per_class:
            assert sum(sh["class_counts"].get(c, 0) for sh in s["shards"]) == per_class[c]
        for sh in s["shards"]:
            for name, size, digest in (
                (sh["file"], sh["bytes"], sh["sha256"]),
                (sh["index"], sh["index_bytes"], sh["index_sha256"]),
            ):
                data = (packed / name).read_bytes()
                assert (len(data), hashlib.sha256(data).hexdigest()) == (size, digest)
            assert sh["bytes"] <= SHARD_MB * 1e6
    assert manifest["check"] == {"skipped": [], "skipped_by_kind": {}}


def test_a_broken_jpeg_is_left_out_and_named(source, tmp_path):
    root = tmp_path / "src"
    shutil.copytree(source, root)
    photo = next((root / "train" / "daisy").iterdir())
    (root / "train" / "daisy" / "zz_truncated.jpg").write_bytes(photo.read_bytes()[:3000])
    out = tmp_path / "out"
    manifest = pack(root, out, shard_mb=SHARD_MB).manifest
    assert [(v["path"], v["kind"]) for v in manifest["check"]["skipped"]] == [
        ("train/daisy/zz_truncated.jpg", "truncated")
    ]
    assert manifest["check"]["skipped_by_kind"] == {"truncated": 1}
    assert manifest["splits"]["train"]["samples"] == len(source_files(source, "train"))
    assert "zz_truncated" not in (out / "train" / "samples.tsv").read_text()


def test_an_interrupted_pack_looks_unfinished_and_a_rerun_packs_it_whole(source, packed, tmp_path, monkeypatch):
    out = tmp_path / "out"
    inside_second_shard = second_shard_member(packed)
    real_member, calls = pack_module._member, []

    def failing_member(name, size):
        calls.append(name)
        if len(calls) > inside_second_shard:
            raise RuntimeError("injected: the pack dies here")
        return real_member(name, size)

    monkeypatch.setattr(pack_module, "_member", failing_member)
    with pytest.raises(RuntimeError, match="injected"):
        pack(source, out, shard_mb=SHARD_MB)
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "train").iterdir()) == ["shard-000000.idx", "shard-000000.tar"]
    assert not (out / "manifest.json").exists() and not shards.is_packed(out)
    with pytest.raises(DataError, match="no manifest.json"):
        shards.load(out)
    # An earlier, larger pack's extra shards go too.
    (out / "val").mkdir()
    (out / "val" / "shard-000099.tar").write_bytes(b"stale")
    pack(source, out, shard_mb=SHARD_MB)
    assert all_files(out) == all_files(packed)


def test_a_pack_killed_inside_a_shard_leaves_no_complete_looking_shard(source, packed, tmp_path):
    out = tmp_path / "out"
    inside_second_shard = second_shard_member(packed)
    pid = os.fork()
    if pid == 0:  # the child packs and is killed inside the second shard: no exception handler runs
        try:
            real_member, calls = pack_module._member, []

            def dying_member(name, size):
                calls.append(name)
                if len(calls) > inside_second_shard:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_member(name, size)

            pack_module._member = dying_member
            pack(source, out, shard_mb=SHARD_MB)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "shard-000000.idx",
        "shard-000000.tar",
        "shard-000001.tar.tmp",
    ]
    assert (out / "train" / "shard-000000.tar").read_bytes() == (packed / "train" / "shard-000000.tar").read_bytes()
    assert not shards.is_packed(out)
    pack(source, out, shard_mb=SHARD_MB)
    assert all_files(out) == all_files(packed)


def test_a_pack_of_another_source_is_kept_unless_forced(source, packed, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(packed, out)
    assert pack(source, out, shard_mb=SHARD_MB).up_to_date
    other = tmp_path / "other"
    shutil.copytree(source, other)
    with pytest.raises(DataError, match="holds a pack of .*use --force"):
        pack(other, out, shard_mb=SHARD_MB)
    assert all_files(out) == all_files(packed)
    result = pack(other, out, shard_mb=SHARD_MB, force=True)
    assert not result.up_to_date and result.manifest["source"]["root"] == str(other.resolve())
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a pack"):
        pack(source, tmp_path / "foreign", shard_mb=SHARD_MB)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_reader_lists_and_reads_samples_as_tarfile_does(source, packed):
    assert shards.is_packed(packed) and not shards.is_packed(source)
    loaded = shards.load(packed, verify=True)
    assert loaded.classes == tuple(sorted(p.name for p in (source / "train").iterdir() if p.is_dir()))
    for split in SPLITS:
        listed = shards.samples(loaded, split)
        from_tar = {
            (tar_path, key): parts
            for tar_path in sorted((packed / split).glob("shard-*.tar"))
            for key, parts in tar_samples(tar_path).items()
        }
        assert len(listed) == len(from_tar) == len({s.key for s in listed})
        for s in listed:
            parts = from_tar[(s.shard, s.key)]
            assert shards.read_sample(s) == parts["jpg"] and s.label == int(parts["cls"]) and s.ext == "jpg"


def test_reader_catches_a_flipped_byte_a_truncated_shard_and_a_bad_manifest(packed, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(packed, out)
    shard = out / "train" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    shards.load(out)  # same size: only the checksum sees it
    with pytest.raises(DataError, match=r"train/shard-000001.tar fails its SHA-256"):
        shards.load(out, verify=True)
    shard.write_bytes(bytes(data[:-512]))
    with pytest.raises(DataError, match=r"train/shard-000001.tar is \d+ bytes, the manifest says"):
        shards.load(out)
    shard.unlink()
    with pytest.raises(DataError, match=r"train/shard-000001.tar is missing"):
        shards.load(out)
    (out / "manifest.json").write_text('{"format": "flowers-dist-shards", "version": 1, "spl')
    with pytest.raises(DataError, match="not JSON"):
        shards.load(out)


def test_cli_packs_and_errors_in_one_line(source, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["data", "pack", str(source), str(out), "--shard-size", "0.3", "--progress", "none"]) == 0
    printed = capsys.readouterr().out
    assert "packed train 40 samples in" in printed and "val 23 samples" in printed and str(out) in printed
    assert main(["data", "pack", str(tmp_path / "nowhere"), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere does not exist" in err[0]
    assert main(["data", "pack", str(source), str(source / "train" / "packed")]) == 2
    assert "inside its train/ or val/" in capsys.readouterr().err


def test_dali_reads_every_sample_once_per_epoch_with_the_index_files(packed):
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, types

    loaded = shards.load(packed)
    for split in SPLITS:
        part = loaded.splits[split]
        batch = 4  # does not divide 23: the padded last batch is cut at the epoch size

        @dali.pipeline_def(batch_size=batch, num_threads=1, device_id=None)
        def read(part=part):
            images, labels = fn.readers.webdataset(
                paths=[str(s.tar) for s in part.shards],
                index_paths=[str(s.index) for s in part.shards],
                ext=["jpg;jpeg;png", "cls"],
                dtypes=[types.UINT8, types.UINT8],
                missing_component_behavior="error",
                random_shuffle=True,
                initial_fill=8,
                pad_last_batch=True,
                name="Reader",
            )
            return images, labels

        pipe = read()
        pipe.build()
        size = pipe.epoch_size("Reader")
        assert size == part.samples
        want = sorted((shards.read_sample(s), s.label) for s in shards.samples(loaded, split))
        for _epoch in range(2):
            got = []
            for _ in range(-(-size // batch)):
                images, labels = pipe.run()
                got += [(images.at(i).tobytes(), int(labels.at(i).tobytes())) for i in range(len(images))]
            assert sorted(got[:size]) == want, split
