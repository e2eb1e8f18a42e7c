"""`flowers-dist data check`, its cache and quarantine, and what each decoder does with each kind of broken file."""

import json
import os
import shutil
from pathlib import Path

import pytest
from broken_files import broken_dataset
from conftest import SAMPLE, cli

from flowers_dist.config import DataConfig
from flowers_dist.data.check import check_dataset
from flowers_dist.data.usable import usable_splits

# The kind data check must give each generated file (see broken_files.broken_files).
EXPECTED = {
    "zz_truncated.jpg": "truncated",
    "zz_zero_bytes.jpg": "zero_bytes",
    "zz_text.jpg": "not_image",
    "zz_png_named.jpg": "not_jpeg",
    "zz_cmyk.jpg": "cmyk",
    "zz_grayscale.jpg": "grayscale",
    "zz_progressive.jpg": "progressive",
    "zz_exif_rotated.jpg": "exif_orientation",
    "zz_one_pixel.jpg": "too_small",
    "zz_huge.jpg": "too_large",
    "zz_garbled.jpg": "unreadable",
    "zz_symlink_loop.jpg": "unreadable",
}
SKIPPED_KINDS = {"truncated", "zero_bytes", "not_image", "too_small", "too_large", "unreadable"}


def _tree(root: Path) -> dict[str, str]:
    """Every entry under root (links as links) with its content, to compare before and after."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.name.startswith(".flowers-dist-check"):
            continue
        if p.is_symlink():
            out[rel] = "link->" + os.readlink(p)
        elif p.is_file():
            out[rel] = p.read_bytes().hex()
    return out


@pytest.fixture
def broken(tmp_path) -> Path:
    root = tmp_path / "data"
    broken_dataset(SAMPLE, root)
    dandelion = sorted((root / "train" / "dandelion").iterdir())[0]
    shutil.copyfile(dandelion, root / "train" / "dandelion" / "zz_copy.jpg")  # identical bytes twice in a split
    return root


@pytest.mark.e2e
def test_data_check_names_each_kind_and_exits_1(broken, tmp_path):
    proc = cli(["data", "check", str(broken), "--json", str(tmp_path / "r.json")], check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    kinds = {(Path(f["path"]).parent.parent.name, Path(f["path"]).name): f["kind"] for f in report["files"]}
    for split, _folder in (("train", "daisy"), ("val", "roses")):
        for name, kind in EXPECTED.items():
            assert kinds[(split, name)] == kind, (split, name, kinds.get((split, name)))
    assert kinds[("train", "zz_copy.jpg")] == "duplicate"
    assert kinds[("val", "zz_leaked_from_train.jpg")] == "leak"
    # Everything else is a plain photo; none of them is reported.
    assert len(report["files"]) == 2 * len(EXPECTED) + 2
    assert report["classes"]["train"]["daisy"] == {"files": 8 + len(EXPECTED), "usable": 8 + 5}
    assert "zz_truncated.jpg: truncated" in proc.stdout and "exit 1" in proc.stdout
    for kind in ("cmyk", "too_large", "truncated"):  # each kind found comes with what the decoders do with it
        assert f"  {kind}: PIL" in proc.stdout


@pytest.mark.e2e
def test_fatal_layouts_exit_2_and_a_clean_set_exits_0(tmp_path):
    assert cli(["data", "check", str(SAMPLE)], check=False).returncode == 0
    root = tmp_path / "data"
    broken_dataset(SAMPLE, root, empty_class=True, leak=False)
    proc = cli(["data", "check", str(root)], check=False)
    assert proc.returncode == 2 and "train/zz_empty holds no images (an empty class)" in proc.stdout
    shutil.rmtree(root / "train" / "zz_empty")
    proc = cli(["data", "check", str(root)], check=False)
    assert proc.returncode == 2 and "val classes missing from train: zz_empty" in proc.stdout
    shutil.rmtree(root / "val" / "zz_empty")
    for f in (root / "train" / "roses").iterdir():  # a class whose every file is broken is an empty class
        f.write_bytes(b"")
    proc = cli(["data", "check", str(root)], check=False)
    assert proc.returncode == 2 and "train/roses has no usable image (8 skipped)" in proc.stdout
    assert cli(["data", "check", str(tmp_path / "nowhere")], check=False).returncode == 2
    # A folder of class folders (what eval reads) is checked as one split.
    proc = cli(["data", "check", str(root / "val")], check=False)
    assert proc.returncode == 1 and "roses/zz_truncated.jpg: truncated" in proc.stdout


@pytest.mark.e2e
def test_quarantine_moves_and_restore_puts_back(broken, tmp_path):
    before = _tree(broken)
    q = tmp_path / "quarantine"
    proc = cli(["data", "check", str(broken), "--quarantine", str(q)], check=False)
    assert proc.returncode == 0, proc.stdout  # what is left in the data set is clean
    moved = json.loads((q / "manifest.json").read_text())["moved"]
    assert sorted(Path(m["from"]).name for m in moved if Path(m["from"]).parent.name == "daisy") == sorted(
        n for n, k in EXPECTED.items() if k in SKIPPED_KINDS
    )
    assert not os.path.lexists(broken / "train" / "daisy" / "zz_truncated.jpg")
    assert (q / "train" / "daisy" / "zz_symlink_loop.jpg").is_symlink()  # the link itself, not a copy
    assert cli(["data", "check", str(broken)], check=False).returncode == 0
    assert len(_tree(broken)) + len(moved) == len(before)  # moved, not deleted or copied
    proc = cli(["data", "check", "--restore", str(q / "manifest.json")], check=False)
    assert proc.returncode == 0 and f"restored {len(moved)} file(s)" in proc.stdout
    assert _tree(broken) == before


def test_check_is_cached_by_path_size_and_mtime(broken, tmp_path):
    cfg = DataConfig(root=str(broken), check_cache=str(tmp_path / "cache.json"))
    first = check_dataset(broken, cfg, workers=2)
    again = check_dataset(broken, cfg, workers=2)
    assert first.probed == again.cached + again.probed and again.probed == 2  # only the symlink loops (no stat)
    assert [p.kind for ps in again.probes.values() for p in ps] == [p.kind for ps in first.probes.values() for p in ps]
    # A good photo broken after the check is caught: its size and mtime changed.
    victim = sorted((broken / "train" / "sunflowers").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:500])
    third = check_dataset(broken, cfg, workers=1)
    assert third.probed == 3
    assert next(p for p in third.probes["train"] if p.path == str(victim)).kind == "truncated"
    # Training reads the same cache and gets only decodable files, labels kept in step.
    train, val, skipped = usable_splits(cfg)
    assert str(victim) not in map(str, train.files) and skipped.count == sum(1 for _ in third.skipped()) - 2
    assert all(f.parent.name == train.classes[lab] for f, lab in zip(train.files, train.labels))


def test_cache_lives_in_the_root_when_writable_else_in_the_home_cache(tmp_path, monkeypatch):
    from flowers_dist.data.check_cache import CACHE_NAME, cache_path

    assert cache_path(tmp_path) == tmp_path / CACHE_NAME
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:  # mode bits decide even for root, who could write there anyway
        assert cache_path(ro).parent == tmp_path / "xdg" / "flowers-dist"
        assert cache_path(ro) != cache_path(tmp_path / "elsewhere")  # one file per data root
    finally:
        ro.chmod(0o755)


def test_decoders_do_what_the_table_says(tmp_path):
    """DALI's CPU decoder on each generated file: the kept kinds decode to PIL's pixels, the skipped ones fail."""
    pytest.importorskip("nvidia.dali")
    import numpy as np
    from broken_files import write_broken
    from nvidia.dali import fn, pipeline_def, types

    from flowers_dist.data.torch_loader import load_rgb

    photo = next(
        p for p in sorted((SAMPLE / "train" / "daisy").iterdir()) if load_rgb(p).size[0] != load_rgb(p).size[1]
    )
    files = {p.name: p for p in write_broken(tmp_path, photo)}

    def dali(path):
        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def pipe():
            jpegs, _ = fn.readers.file(files=[str(path)])
            return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)

        p = pipe()
        p.build()
        return np.array(p.run()[0][0])

    for name in ("zz_png_named.jpg", "zz_cmyk.jpg", "zz_grayscale.jpg", "zz_progressive.jpg", "zz_exif_rotated.jpg"):
        pil = np.asarray(load_rgb(files[name]))
        assert np.array_equal(dali(files[name]), pil), name
    assert np.asarray(load_rgb(files["zz_exif_rotated.jpg"])).shape[:2] == np.asarray(load_rgb(photo)).shape[1::-1]
    for name in ("zz_truncated.jpg", "zz_zero_bytes.jpg", "zz_text.jpg", "zz_garbled.jpg"):
        with pytest.raises(RuntimeError):
            dali(files[name])


def test_the_main_process_error_is_sent_to_every_rank():
    """shared(): what rank 0 computes, or the DataError it meets, goes through the broadcast, so no rank
    is left waiting in it (the launcher would otherwise kill the waiting ranks, not let them exit with 2)."""
    from flowers_dist.data.folder import DataError
    from flowers_dist.data.usable import shared

    sent = []

    def fail():
        raise DataError("class folder x holds no images")

    with pytest.raises(DataError, match="holds no images"):
        shared(fail, True, sent.append)
    assert len(sent) == 1 and isinstance(sent[0][0], DataError)  # rank 0 broadcast the error before raising it
    with pytest.raises(DataError, match="holds no images"):
        shared(lambda: pytest.fail("only the main process computes"), False, lambda box: box.__setitem__(0, sent[0][0]))
    assert shared(lambda: (1, 2), True, lambda box: None) == (1, 2)


@pytest.mark.parametrize("name", ["flowers_quickstart", "flowers_sample"])
def test_the_bundled_samples_are_clean(name, tmp_path):
    """The README's first command must not open with a warning about the project's own data."""
    root = SAMPLE.parent / name
    report = check_dataset(root, DataConfig(check_cache=str(tmp_path / "cache.json")), workers=2)
    assert report.exit_code == 0, report.format()
    kinds = {p.kind for ps in report.probes.values() for p in ps}
    assert not kinds & {"duplicate", "leak", "outside_class_folders"} and not report.skipped(), report.format()


def _make_sample_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_sample", SAMPLE.parent / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_sample_passes_over_copies_of_a_photo_already_taken(tmp_path):
    make_sample = _make_sample_module()
    photos = sorted((SAMPLE / "train" / "roses").iterdir())[:3]
    folder = tmp_path / "roses"
    folder.mkdir()
    for p in photos:
        shutil.copy(p, folder / p.name)
    shutil.copy(photos[0], folder / "a_copy.jpg")  # the same bytes under another name
    order = [folder / "a_copy.jpg", *(folder / p.name for p in photos)]
    seen: set[str] = set()
    taken = make_sample.take_distinct(order, 3, seen)
    assert [src.name for src, _, _ in taken] == sorted(["a_copy.jpg", photos[1].name, photos[2].name])
    # Another class or split later: a copy of anything taken is passed over there too (a conflict or a leak).
    with pytest.raises(SystemExit, match="only 0 distinct photos, 1 wanted"):
        make_sample.take_distinct([folder / photos[0].name], 1, seen)


def _with_strays(tmp_path: Path) -> tuple[Path, list[Path]]:
    """The sample with a photo put directly in train/ and one in val/, outside every class folder."""
    root = tmp_path / "data"
    shutil.copytree(SAMPLE, root, ignore=shutil.ignore_patterns(".flowers-dist-check*"))
    strays = [root / "train" / "stray.jpg", root / "val" / "STRAY.JPEG"]
    shutil.copy(sorted((SAMPLE / "train" / "daisy").iterdir())[0], strays[0])
    shutil.copy(sorted((SAMPLE / "val" / "tulips").iterdir())[0], strays[1])
    return root, strays


def test_data_check_names_images_outside_class_folders(tmp_path):
    root, strays = _with_strays(tmp_path)
    clean = check_dataset(SAMPLE, DataConfig(check_cache=str(tmp_path / "clean.json")), workers=1)
    report = check_dataset(root, DataConfig(check_cache=str(tmp_path / "cache.json")), workers=1)
    assert report.exit_code == 1
    assert [(s, p.path, p.kind) for s, p in report.skipped()] == [
        ("train", str(strays[0]), "outside_class_folders"),
        ("val", str(strays[1]), "outside_class_folders"),
    ]
    text = report.format()
    assert "train/stray.jpg: outside_class_folders: directly in train/, outside any class folder" in text
    assert "  outside_class_folders: neither loader reads it" in text and "exit 1" in text
    assert {f["path"] for f in report.to_dict()["files"]} == {str(s) for s in strays}
    assert report.to_dict()["classes"] == clean.to_dict()["classes"]  # the classes' files are as before
    # A folder of class folders, as eval reads it, is one split: a photo beside the class folders is named too.
    assert [
        p.path
        for _, p in check_dataset(root / "val", DataConfig(check_cache=str(tmp_path / "v.json")), workers=1).skipped()
    ] == [str(strays[1])]


@pytest.mark.parametrize("check", [True, False])
def test_training_counts_images_outside_class_folders(tmp_path, caplog, check):
    root, strays = _with_strays(tmp_path)
    train, val, skipped = usable_splits(
        DataConfig(root=str(root), check=check, check_cache=str(tmp_path / "cache.json"))
    )
    assert (len(train), len(val)) == (40, 23) and not set(strays) & {*train.files, *val.files}
    assert skipped.count == 2 and skipped.by_kind == {"outside_class_folders": 2}
    assert [p for p, _, _ in skipped.files] == [str(s) for s in strays]
    assert skipped.record()["skipped_by_kind"] == {"outside_class_folders": 2}
    line = skipped.line()
    assert (
        "2 file(s) skipped (2 outside_class_folders)" if check else "2 file(s) outside class folders skipped"
    ) in line
    assert sum(str(strays[0]) in r.getMessage() for r in caplog.records) == 1  # named once in the log
