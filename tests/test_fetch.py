"""`flowers-dist data fetch` against a local HTTP server serving a small flower_photos.tgz."""

from __future__ import annotations

import functools
import http.server
import io
import json
import tarfile
from pathlib import Path

import pytest
from conftest import SAMPLE, cli, local_server

from flowers_dist.data.fetch import COMPLETE, FetchError, fetch_flowers, sha256_of, stratified_split
from flowers_dist.data.folder import scan_dataset


def _sample_files() -> dict[str, dict[str, Path]]:
    """class -> {file name: path}, over both splits of the bundled sample (the archive has no split)."""
    by_class: dict[str, dict[str, Path]] = {}
    for path in sorted(SAMPLE.glob("*/*/*.jpg")):
        by_class.setdefault(path.parent.name, {})[path.name] = path
    return by_class


def _make_archive(target: Path, by_class: dict[str, dict[str, Path]]) -> str:
    """Write flower_photos.tgz laid out like TensorFlow's (flower_photos/<class>/*.jpg + LICENSE.txt); return its sha256."""
    lines = [
        "All images in this archive are licensed under the Creative Commons By-Attribution License, available at:",
        "https://creativecommons.org/licenses/by/2.0/",
        "",
        "The photographers are listed below, thanks to all of them for making their work available.",
        "",
    ]
    lines += [
        f"{name}/{f}: https://www.flickr.com/photos/example/{f.split('_')[0]}"
        for name, files in by_class.items()
        for f in files
    ]
    with tarfile.open(target, "w:gz") as tar:
        license_bytes = ("\n".join(lines) + "\n").encode()
        info = tarfile.TarInfo("flower_photos/LICENSE.txt")
        info.size = len(license_bytes)
        tar.addfile(info, io.BytesIO(license_bytes))
        for name, files in by_class.items():
            for f, path in files.items():
                tar.add(path, arcname=f"flower_photos/{name}/{f}")
    return sha256_of(target)


class _Handler(http.server.SimpleHTTPRequestHandler):
    timeout = 30  # a stuck client connection cannot hold a server thread forever

    def do_GET(self):  # noqa: N802 (the http.server name)
        if self.path == "/truncated/flower_photos.tgz":
            # Promise more bytes than are sent, then hang up: a download cut short.
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"\x1f\x8b" + b"\0" * 998)
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, format, *args):  # keep pytest output quiet
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, sha256 of flower_photos.tgz, class -> {name: path}); the server lives for this module."""
    root = tmp_path_factory.mktemp("www")
    by_class = _sample_files()
    sha = _make_archive(root / "flower_photos.tgz", by_class)
    with local_server(functools.partial(_Handler, directory=str(root))) as url:
        yield url, sha, by_class


def _listing(split_dir: Path) -> dict[str, set[str]]:
    return {d.name: {f.name for f in d.iterdir()} for d in sorted(split_dir.iterdir())}


def _assert_nothing_made(dest: Path) -> None:
    left = sorted(p.name for p in dest.iterdir()) if dest.exists() else []
    assert left == [], f"left behind in {dest}: {left}"


def test_fetch_writes_a_stratified_deterministic_split(served, tmp_path):
    base, sha, by_class = served
    a = fetch_flowers(tmp_path / "a", url=f"{base}/flower_photos.tgz", sha256=sha, progress=False)
    train, val = _listing(a / "train"), _listing(a / "val")

    assert set(train) == set(val) == set(by_class)
    for name, files in by_class.items():
        assert len(val[name]) == round(len(files) * 0.2), name
        assert not train[name] & val[name], name
        assert train[name] | val[name] == set(files), name
        for f in val[name]:  # moved out of the archive unchanged
            assert (a / "val" / name / f).read_bytes() == files[f].read_bytes()

    assert (a / COMPLETE).read_text().strip() == sha
    record = json.loads((a / "split.json").read_text())
    assert record["sha256"] == sha and record["seed"] == 0 and record["val_fraction"] == 0.2
    assert {part: {k: set(v) for k, v in classes.items()} for part, classes in record["split"].items()} == {
        "train": train,
        "val": val,
    }
    assert sorted(p.name for p in a.iterdir()) == [
        COMPLETE,
        "split.json",
        "train",
        "val",
    ]  # no archive, staging or LICENSE
    train_split, val_split = scan_dataset(a)  # what `train` will read
    assert len(train_split) + len(val_split) == sum(len(f) for f in by_class.values())

    b = fetch_flowers(tmp_path / "b", url=f"{base}/flower_photos.tgz", sha256=sha, progress=False)
    assert _listing(b / "train") == train and _listing(b / "val") == val
    assert (b / "split.json").read_text() == (a / "split.json").read_text()


def test_fetch_on_a_complete_folder_does_nothing(served, tmp_path, capsys):
    base, sha, _ = served
    dest = fetch_flowers(tmp_path / "d", url=f"{base}/flower_photos.tgz", sha256=sha, progress=False)
    before = {p: p.stat().st_mtime_ns for p in dest.rglob("*")}
    capsys.readouterr()
    # A URL that would fail proves that nothing is downloaded.
    fetch_flowers(dest, url=f"{base}/missing.tgz", sha256="0" * 64, progress=False)
    assert "already complete" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*")} == before


def test_wrong_checksum_fails_and_leaves_nothing(served, tmp_path):
    base, sha, _ = served
    dest = tmp_path / "d"
    wrong = "0" * 64
    with pytest.raises(FetchError) as info:
        fetch_flowers(dest, url=f"{base}/flower_photos.tgz", sha256=wrong, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("checksum mismatch") and wrong in message and sha in message
    _assert_nothing_made(dest)  # no .part, no archive, no train/, val/ or .complete


def test_http_404_is_a_clear_error(served, tmp_path):
    base, sha, _ = served
    with pytest.raises(
        FetchError, match=r"^download of http://127\.0\.0\.1:\d+/missing\.tgz failed: HTTP Error 404"
    ) as info:
        fetch_flowers(tmp_path / "d", url=f"{base}/missing.tgz", sha256=sha, progress=False)
    assert "\n" not in str(info.value)
    _assert_nothing_made(tmp_path / "d")


def test_truncated_download_is_named_as_such(served, tmp_path):
    base, sha, _ = served
    with pytest.raises(FetchError, match=r"cut short: got 1000 of 100000 bytes"):
        fetch_flowers(tmp_path / "d", url=f"{base}/truncated/flower_photos.tgz", sha256=sha, progress=False)
    _assert_nothing_made(tmp_path / "d")


def test_refuses_to_replace_folders_it_did_not_write(served, tmp_path):
    base, sha, _ = served
    mine = tmp_path / "d" / "train" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("keep me")
    with pytest.raises(FetchError, match="already holds train/ that fetch did not write"):
        fetch_flowers(tmp_path / "d", url=f"{base}/flower_photos.tgz", sha256=sha, progress=False)
    assert mine.read_text() == "keep me"


def test_leftovers_of_an_interrupted_fetch_are_replaced(served, tmp_path):
    base, sha, by_class = served
    dest = tmp_path / "d"
    for leftover in (dest / ".staging" / "extracted", dest / "train" / "daisy"):
        leftover.mkdir(parents=True)
    (dest / "train" / "daisy" / "stale.jpg").write_bytes(b"not a jpeg")
    fetch_flowers(dest, url=f"{base}/flower_photos.tgz", sha256=sha, progress=False)
    assert "stale.jpg" not in _listing(dest / "train")["daisy"]
    assert not (dest / ".staging").exists()


def test_kept_archive_with_another_checksum_is_downloaded_again(served, tmp_path):
    base, sha, _ = served
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "flower_photos.tgz").write_bytes(b"an archive from somewhere else")
    fetch_flowers(dest, url=f"{base}/flower_photos.tgz", sha256=sha, keep_archive=True, progress=False)
    assert sha256_of(dest / "flower_photos.tgz") == sha


def test_small_classes_keep_an_image_in_each_split():
    split = stratified_split({"a": ["1.jpg", "2.jpg"], "b": [f"{i}.jpg" for i in range(10)]}, 0.2, seed=0)
    assert [len(split["train"]["a"]), len(split["val"]["a"])] == [1, 1]  # round(0.4) would leave val empty
    assert [len(split["train"]["b"]), len(split["val"]["b"])] == [8, 2]
    with pytest.raises(FetchError, match="class 'c' has 1 image"):
        stratified_split({"c": ["1.jpg"]}, 0.2, seed=0)


@pytest.mark.e2e
def test_cli(served, tmp_path):
    base, sha, _ = served
    args = ["data", "fetch", str(tmp_path / "d"), "--url", f"{base}/flower_photos.tgz"]

    bad = cli([*args, "--sha256", "0" * 64], timeout=120, check=False)
    assert bad.returncode == 2, bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowers-dist: error: checksum mismatch for http://127.0.0.1:"), (
        bad.stderr
    )
    _assert_nothing_made(tmp_path / "d")

    good = cli([*args, "--sha256", sha, "--seed", "0"], timeout=120)
    assert "wrote" in good.stdout and (tmp_path / "d" / COMPLETE).is_file()
