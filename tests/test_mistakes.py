"""The val images a model gets wrong: selection and order, the page and the grid from real files (folder and pack),
the Recorder's hand-over to the sinks, and a run's W&B table and images read back from its offline files."""

import base64
import io
import json
import re
import time

import pytest
import torch
from conftest import SAMPLE, TINY, cli, metrics
from PIL import Image
from torch import nn
from wandb_offline import image, read_run, table

from flowers_dist import mistakes
from flowers_dist.config import DataConfig
from flowers_dist.data import Placement, scan_split, shards
from flowers_dist.data.pack import pack
from flowers_dist.mistakes import COLUMNS, Prediction, predict_split, publish, worst
from flowers_dist.recorder import Recorder
from flowers_dist.sinks import Media, Picture, Table

CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
CPU = Placement(rank=0, world_size=1, device=torch.device("cpu"), workers=0)
DATA = DataConfig(image_size=32)


class Constant(nn.Module):
    """A model with known outputs: the same logits for every image, so class 0 with softmax probability P0."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([2.0, 1.0, 0.0, 0.0, -1.0]), requires_grad=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.shape[1:] == (3, 32, 32)
        return self.logits.expand(len(images), -1)


P = torch.tensor([2.0, 1.0, 0.0, 0.0, -1.0]).softmax(0).tolist()


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    out = tmp_path_factory.mktemp("pack") / "flowers_sample"
    pack(SAMPLE, out, shard_mb=0.3)  # several shards per split
    return shards.split(shards.load(out), "val")


def test_worst_keeps_the_wrong_ones_most_confident_first():
    preds = [
        Prediction(0, "a.jpg", 0, 0, 0.99, 0.99),  # right: never listed, however confident
        Prediction(1, "b.jpg", 1, 0, 0.40, 0.30),
        Prediction(2, "c.jpg", 2, 3, 0.90, 0.05),
        Prediction(3, "e.jpg", 0, 4, 0.60, 0.20),
        Prediction(4, "d.jpg", 0, 4, 0.60, 0.20),  # a tie: by file
    ]
    assert [p.file for p in worst(preds, 10)] == ["c.jpg", "d.jpg", "e.jpg", "b.jpg"]
    assert [p.file for p in worst(preds, 2)] == ["c.jpg", "d.jpg"]
    assert worst(preds, 0) == [] and worst(preds[:1], 5) == []


def test_predictions_of_a_known_model_on_a_folder_and_on_a_pack(packed):
    folder = scan_split(SAMPLE / "val", CLASSES)
    by_folder = predict_split(Constant(), folder, DATA, CPU, batch_size=8)
    assert [p.index for p in by_folder] == list(range(23))
    assert [p.file for p in by_folder] == [folder.name(i) for i in range(23)]  # daisy/x.jpg
    for p in by_folder:
        assert p.predicted == 0 and p.confidence == pytest.approx(P[0]) and p.true_prob == pytest.approx(P[p.true])
        assert p.true == folder.labels[p.index] and p.wrong == (p.true != 0)
    by_pack = predict_split(Constant(), packed, DATA, CPU, batch_size=5)
    # A pack names each sample by the file it was packed from; the same samples, the same answers.
    assert sorted((p.file, p.true) for p in by_pack) == sorted((f"val/{p.file}", p.true) for p in by_folder)


def _page_rows(page: str) -> list[tuple[Image.Image, list[str]]]:
    rows = re.findall(r"<tr><td><img src='data:image/jpeg;base64,([^']+)' alt=''></td>(.*?)</tr>", page)
    return [(Image.open(io.BytesIO(base64.b64decode(b64))), re.findall(r"<td>(.*?)</td>", rest)) for b64, rest in rows]


@pytest.mark.parametrize("source", ["folder", "pack"])
def test_page_grid_and_table_from_real_files(tmp_path, packed, source):
    split = packed if source == "pack" else scan_split(SAMPLE / "val", CLASSES)
    preds = predict_split(Constant(), split, DATA, CPU, batch_size=8)
    wrong = [p for p in preds if p.wrong]
    media = publish(tmp_path, preds, split, limit=6)
    rows = _page_rows((tmp_path / "mistakes.html").read_text())
    assert len(wrong) == 23 - split.labels.count(0) and len(rows) == 6
    expected = worst(preds, 6)
    for (thumb, cells), p in zip(rows, expected):
        assert max(thumb.size) == 100 and thumb.format == "JPEG"
        assert cells == [CLASSES[p.true], "daisy", f"{P[0]:.3f}", f"{P[p.true]:.3f}", p.file]
    # The thumbnail is the sample's own picture, read from its file or from its bytes in the shard.
    source_file = SAMPLE / expected[0].file if source == "pack" else SAMPLE / "val" / expected[0].file
    with Image.open(source_file) as original:
        assert rows[0][0].size == tuple(round(s * 100 / max(original.size)) for s in original.size)
    grid = Image.open(tmp_path / "mistakes.png")
    assert grid.format == "PNG" and grid.size == (4 * 120, 24 + 2 * (120 + 34))  # 6 mistakes: two rows of four
    t = media.tables["val/mistakes"]
    assert t.columns == COLUMNS and len(t.rows) == 6
    assert [r[1:] for r in t.rows] == [(CLASSES[p.true], "daisy", p.confidence, p.true_prob, p.file) for p in expected]
    assert all(
        isinstance(r[0], Picture) and Image.open(io.BytesIO(r[0].data)).size == rows[0][0].size for r in t.rows[:1]
    )
    assert media.notes == (
        f"val mistakes: {len(wrong)} of 23 wrong; the 6 most confident in {tmp_path / 'mistakes.html'}",
    )


def test_no_mistakes_still_writes_a_page_and_a_grid(tmp_path):
    split = scan_split(SAMPLE / "val", CLASSES)
    right = [Prediction(i, split.name(i), split.labels[i], split.labels[i], 0.9, 0.9) for i in range(len(split))]
    media = publish(tmp_path, right, split, limit=64)
    assert "no mistakes" in (tmp_path / "mistakes.html").read_text() and not _page_rows(
        (tmp_path / "mistakes.html").read_text()
    )
    assert Image.open(tmp_path / "mistakes.png").format == "PNG" and media.tables["val/mistakes"].rows == ()


class MediaSink:
    def __init__(self, shows: bool):
        self.shows_pictures, self.got = shows, []

    def log_step(self, record):
        pass

    log_epoch = log_step

    def log_media(self, step, media):
        self.got.append((step, media))


@pytest.mark.parametrize("shows", [False, True])
def test_the_recorder_hands_pictures_to_its_sinks_at_the_last_rows_step(tmp_path, capsys, shows):
    sinks = [MediaSink(False), MediaSink(shows)]
    rec = Recorder(tmp_path, is_main=True, progress="lines", sinks=sinks)
    rec.log_epoch({"step": 12, "epoch": 0})
    asked = []
    media = Media(tables={"val/mistakes": Table(("a",), ((1,),))}, notes=("a note",))
    rec.log_media(lambda plots: asked.append(plots) or media)
    assert asked == [shows]  # the report's plots are drawn only for a sink that shows pictures
    assert all(s.got == [(12, media)] for s in sinks)
    assert capsys.readouterr().out.strip().endswith("a note")
    other = Recorder(tmp_path, is_main=False, progress="lines", sinks=[MediaSink(True)])
    other.log_media(lambda plots: pytest.fail("only the main process computes pictures"))


def test_thumbnails_of_a_pack_come_from_the_sample_bytes(packed):
    folder = scan_split(SAMPLE / "val", CLASSES)
    i = 3
    j = next(k for k, m in enumerate(packed.members) if m.source == f"val/{folder.name(i)}")
    assert mistakes.thumbnail(packed, j) == mistakes.thumbnail(folder, i)


@pytest.mark.e2e
def test_a_run_logs_its_mistakes_and_plots_to_wandb_and_the_run_folder(tmp_path, packed):
    home = tmp_path / "home"
    home.mkdir()
    env = {"WANDB_MODE": "offline", "HOME": str(home), "WANDB_DATA_DIR": None, "WANDB_DIR": None}
    started = time.perf_counter()
    proc = cli(
        [
            "train",
            "--config",
            "configs/quickstart.yaml",
            *TINY,
            "train.epochs=1",
            "train.max_steps_per_epoch=2",
            "data.loader=torch",  # the epoch's evaluation and the mistakes pass then see the same pixels
            "tracking.mistakes=8",
            f"train.output_dir={tmp_path}",
            "train.name=m",
        ],
        env=env,
    )
    run = tmp_path / "m"
    epoch = [r for r in metrics(run) if r["event"] == "epoch"][-1]
    wrong = epoch["val_count"] - sum(epoch["val_confusion"][i][i] for i in range(len(CLASSES)))
    assert f"val mistakes: {wrong} of 23 wrong; the {min(8, wrong)} most confident" in proc.stdout
    assert wrong > 0, "the tiny run got every val image right: nothing to check"

    (file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    logged = read_run(file)
    t = table(logged, "val/mistakes")
    assert t["columns"] == list(COLUMNS) and len(t["rows"]) == min(8, wrong)
    assert all(r[1] != r[2] for r in t["rows"])  # only wrong predictions
    confidences = [r[3] for r in t["rows"]]
    assert confidences == sorted(confidences, reverse=True) and all(0 < c <= 1 for c in confidences)
    thumb = Image.open(io.BytesIO(t["rows"][0][0]["bytes"]))
    assert max(thumb.size) == 100
    assert (SAMPLE / "val" / t["rows"][0][5]).is_file() and t["rows"][0][1] == t["rows"][0][5].split("/")[0]
    # The report's plots, as images of the run, merged into the last row (the epoch's step).
    assert Image.open(io.BytesIO(image(logged, "report/loss"))).format == "PNG"
    assert Image.open(io.BytesIO(image(logged, "report/confusion"))).format == "PNG"
    assert next(row for row in logged["history"] if "report/loss/path" in row)["_step"] == epoch["step"]

    page = (run / "report" / "mistakes.html").read_text()
    assert [cells[-1] for _, cells in _page_rows(page)] == [r[5] for r in t["rows"]]
    assert Image.open(run / "report" / "mistakes.png").format == "PNG"

    # `eval --report` on the pack: the same page from the shards, and a W&B run of its own (job_type eval).
    out = tmp_path / "eval"
    ev = cli(
        [
            "eval",
            str(run / "checkpoints" / "last.pt"),
            "--data",
            str(packed.root.parent),
            "--loader",
            "torch",
            "--report",
            str(out),
        ],
        env=env,
    )
    assert f"val mistakes: {wrong} of 23 wrong" in ev.stdout
    rows = _page_rows((out / "mistakes.html").read_text())
    assert [cells[-1] for _, cells in rows] == [f"val/{r[5]}" for r in t["rows"]]
    (eval_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    evaluated = read_run(eval_file)
    assert evaluated["job_type"] == "eval" and evaluated["run_id"] != logged["run_id"]
    assert [r[5] for r in table(evaluated, "val/mistakes")["rows"]] == [f"val/{r[5]}" for r in t["rows"]]
    assert json.loads(json.dumps(evaluated["config"]["tracking"]))["mistakes"] == 8
    assert time.perf_counter() - started < 120
