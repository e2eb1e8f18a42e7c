"""The run's record in parts, without training: metrics_log's one rule, the sinks, the console and the clock."""

import json
import time
from types import SimpleNamespace

import pytest

from flowers_dist import config, metrics_log, sinks
from flowers_dist.cli import main
from flowers_dist.console import Console
from flowers_dist.errors import EXIT_USER_ERROR, MetricsError
from flowers_dist.recorder import Recorder
from flowers_dist.report import read_metrics
from flowers_dist.run_clock import RunClock

ENV = {"world_size": 2, "devices": ["cpu"]}


def _lines(path, *lines: bytes) -> None:
    path.write_bytes(b"".join(lines))


# -- metrics_log ----------------------------------------------------------------------------------
def test_a_line_counts_once_it_ends_with_a_newline_and_order_is_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _lines(
        path,
        b'{"event": "start"}\n',
        b'{"event": "step", "step": 2}\n',
        b"\n",
        b'{"event": "step", "step": 1}\n',
        b'{"event": "epoch", "ep',
    )
    assert metrics_log.read(path) == [{"event": "start"}, {"event": "step", "step": 2}, {"event": "step", "step": 1}]
    # Even a last line that parses is not a record until its newline is there: the writer may be mid-line.
    _lines(path, b'{"event": "start"}\n', b'{"event": "end"}')
    assert metrics_log.read(path) == [{"event": "start"}]
    assert metrics_log.read(tmp_path / "absent.jsonl") == []


@pytest.mark.parametrize(
    "damage, reason",
    [(b'{"event": "st', "not a JSON record"), (b"\xff\xfe{}", "not a JSON record"), (b"[1, 2]", "not a JSON object")],
)
def test_a_damaged_whole_line_is_an_error_that_names_it(tmp_path, damage, reason):
    path = tmp_path / "metrics.jsonl"
    _lines(path, b'{"event": "start"}\n', b"\n", damage + b"\n", b'{"event": "end"}\n')
    with pytest.raises(MetricsError, match=rf"metrics\.jsonl, line 3: {reason}"):
        metrics_log.read(path)


def test_repair_cuts_only_an_unterminated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert metrics_log.repair(path) == 0  # absent
    whole = b'{"event": "start"}\n{"event": "step", "step": 1}\n'
    _lines(path, whole)
    assert metrics_log.repair(path) == 0 and path.read_bytes() == whole
    _lines(path, whole, b'{"event": "st')
    assert metrics_log.repair(path) == len(b'{"event": "st') and path.read_bytes() == whole
    metrics_log.append(path, {"event": "resume"})  # lands on a line of its own, not glued to the torn one
    assert [r["event"] for r in metrics_log.read(path)] == ["start", "step", "resume"]


def test_append_writes_whole_stamped_lines_in_order(tmp_path):
    path = tmp_path / "metrics.jsonl"
    before = time.time()
    for i in range(3):
        metrics_log.append(path, {"event": "step", "step": i})
    data = path.read_bytes()
    assert data.count(b"\n") == 3 and data.endswith(b"\n")
    records = metrics_log.read(path)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(before - 0.01 <= r["time"] <= time.time() + 0.01 for r in records)


def test_latest_per_keeps_the_last_record_of_each_key(tmp_path):
    records = [
        {"event": "epoch", "epoch": 0, "v": "a"},
        {"event": "epoch", "epoch": 1, "v": "b"},
        {"event": "resume"},
        {"event": "epoch", "epoch": 1, "v": "c"},
        {"event": "step", "epoch": 5},
    ]
    assert [r["v"] for r in metrics_log.latest_per(records, "epoch", "epoch")] == ["a", "c"]


def test_report_reads_by_the_same_rule_and_names_a_damaged_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"event": "start"},
        {"event": "epoch", "epoch": 0, "val_acc": 0.1},
        {"event": "step", "step": 1},
        {"event": "resume"},
        {"event": "epoch", "epoch": 0, "val_acc": 0.2},
    ]
    _lines(path, *[json.dumps(r).encode() + b"\n" for r in rows], b'{"event": "end", "to')
    m = read_metrics(tmp_path)
    assert [r["val_acc"] for r in m["epochs"]] == [0.2] and m["end"] is None and len(m["starts"]) == 2
    _lines(path, json.dumps(rows[0]).encode() + b"\n", b"garbage\n")
    assert main(["report", str(tmp_path)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"flowers-dist: error: {path}, line 2: not a JSON record (Expecting value)"]


# -- sinks ----------------------------------------------------------------------------------------
class ListSink:
    """The next sink, as a reader would write it: a class with the Sink methods and a for_run."""

    def __init__(self):
        self.started, self.records, self.ended = None, [], "not yet"

    @classmethod
    def for_run(cls, ctx):
        return cls()

    def start(self, cfg, classes, env):
        self.started = (cfg, classes, env)

    def log_step(self, record):
        self.records.append(record)

    log_epoch = log_data_check = log_event = log_step

    def finish(self, record):
        self.ended = record
        if record is not None:
            self.records.append(record)


def _a_run(rec: Recorder, resumed: bool = False, global_step: int = 0) -> None:
    """What a run records, in train.py's order, with records shaped like its own."""
    rec.start(config.load(None), ["daisy", "roses"], ENV, 0, resumed=resumed, start_step=0, global_step=global_step)
    rec.log_data_check({"event": "data_check", "skipped": 1, "skipped_by_kind": {"unreadable": 1}})
    for step in (global_step + 1, global_step + 2):
        rec.log_step(
            {
                "epoch": 0,
                "step": step,
                "loss": 1.5,
                "lr": 0.1,
                "images_per_s": 10.0,
                "images_per_s_per_process": 5.0,
                "step_time": 0.1,
                "data_wait_fraction": 0.2,
                "elapsed": 1.0,
            }
        )
    rec.log_epoch(
        {
            "epoch": 0,
            "step": global_step + 2,
            "train_loss": 1.4,
            "train_acc": 0.5,
            "val_loss": 1.3,
            "val_acc": 0.6,
            "epoch_time": 2.0,
            "images_per_s": 10.0,
            "val_per_class": {"daisy": 0.5, "roses": 0.7},
            "val_confusion": [],
        }
    )
    rec.log({"event": "stopped", "signal": "SIGTERM", "epoch": 0, "step": 2})
    rec.finish({"best_val_acc": 0.6, "best_epoch": 0})


def test_a_sink_added_to_the_list_receives_what_metrics_jsonl_gets(tmp_path):
    ctx = sinks.SinkContext(tmp_path)
    built = sinks.for_run(ctx, kinds=(*sinks.SINKS, ListSink))
    assert [type(s) for s in built] == [sinks.JsonlSink, ListSink]  # W&B is off without an accelerator
    listed = built[1]
    rec = Recorder(tmp_path, is_main=True, progress="lines", sinks=built)
    _a_run(rec)
    on_disk = [{k: v for k, v in r.items() if k != "time"} for r in metrics_log.read(rec.metrics_path)]
    assert [r["event"] for r in on_disk] == ["start", "data_check", "step", "step", "epoch", "stopped", "end"]
    assert listed.records == on_disk
    assert listed.started[1] == ["daisy", "roses"] and listed.started[2] == ENV
    assert listed.ended == {"event": "end", "best_val_acc": 0.6, "best_epoch": 0}
    assert json.loads((tmp_path / "classes.json").read_text()) == ["daisy", "roses"]
    assert (tmp_path / "config.yaml").is_file() and json.loads((tmp_path / "environment.json").read_text()) == ENV


def test_a_resume_repairs_the_log_and_logs_past_the_steps_a_tracker_has_seen(tmp_path, capsys):
    path = metrics_log.path_of(tmp_path)
    first = [{"event": "start"}, *({"event": "step", "step": s} for s in (1, 2, 3, 4, 5))]
    _lines(path, *[json.dumps(r).encode() + b"\n" for r in first], b'{"event": "step", "st')
    listed = ListSink()
    rec = Recorder(tmp_path, is_main=True, progress="lines", sinks=[sinks.JsonlSink(path), listed])
    _a_run(rec, resumed=True, global_step=2)  # the checkpoint was at step 2; steps 3-5 had been logged
    assert "dropped a torn last line (21 bytes)" in capsys.readouterr().out
    rows = [
        (r["step"], r.get("wandb_step"))
        for r in metrics_log.read(path)[len(first) :]
        if r["event"] in ("step", "epoch")
    ]
    assert rows == [(3, 6), (4, 7), (4, 7)]  # one axis past step 5, kept in metrics.jsonl for the next resume
    assert [(r["step"], r["wandb_step"]) for r in listed.records if r["event"] == "step"] == [(3, 6), (4, 7)]
    note = [json.loads(line) for line in (tmp_path / "resumes.jsonl").read_text().splitlines()]
    assert [(n["from_epoch"], n["world_size"], n["overrides"]) for n in note] == [(0, 2, [])]
    assert not (tmp_path / "config.yaml").exists()  # config.yaml keeps what the run was started with


class FakeAccelerator:
    """What the W&B sink and the Recorder call on Accelerate, recorded instead of sent."""

    def __init__(self, tmp_path):
        self.calls = []
        self.run = SimpleNamespace(dir=str(tmp_path / "wandb" / "offline-run-x" / "files"), summary={})

    def init_trackers(self, project, config, init_kwargs):
        self.calls.append(("init", project, init_kwargs["wandb"]["mode"]))

    def log(self, values, step):
        self.calls.append(("log", step, sorted(values)))

    def get_tracker(self, name, unwrap):
        return self.run

    def end_training(self):
        self.calls.append(("end_training",))


def test_the_wandb_sink_logs_every_row_at_its_tracker_step_and_the_rest_as_summary(tmp_path, capsys):
    accelerator = FakeAccelerator(tmp_path)
    tracking_cfg = config.load(None).tracking
    rec = Recorder(tmp_path, True, "lines", accelerator, tracking_cfg, "offline")
    assert [type(s) for s in rec.sinks] == [sinks.JsonlSink, sinks.WandbSink]
    _a_run(rec)
    assert f"upload later with: wandb sync {tmp_path / 'wandb'}" in capsys.readouterr().out
    kinds = [c[0] for c in accelerator.calls]
    assert kinds == ["init", "log", "log", "log", "end_training"]
    assert [c[1] for c in accelerator.calls if c[0] == "log"] == [1, 2, 2]  # one increasing step on every call
    assert "val/accuracy_roses" in accelerator.calls[3][2]
    assert accelerator.run.summary == {
        "data/skipped": 1,
        "data/skipped_unreadable": 1,
        "run/best_val_acc": 0.6,
        "run/best_epoch": 0,
    }
    disabled = Recorder(tmp_path / "d", True, "lines", FakeAccelerator(tmp_path), tracking_cfg, "disabled")
    assert [type(s) for s in disabled.sinks] == [sinks.JsonlSink]


# -- the main process alone -----------------------------------------------------------------------
def test_only_the_main_process_prints_draws_and_writes_but_every_rank_ends_training(tmp_path, capsys):
    accelerator = FakeAccelerator(tmp_path)
    other = Recorder(tmp_path / "rank1", False, "bar", accelerator, config.load(None).tracking, "offline")
    assert other.sinks == []
    _a_run(other)
    other.print("hello from rank 1")
    other.epoch_bar(4, 0, 1).advance(2, 1.0, 3.0)
    other.close_bar()
    out = capsys.readouterr()
    assert out.out == "" and out.err == "" and not (tmp_path / "rank1").exists()
    assert accelerator.calls == [("end_training",)]

    main_rec = Recorder(tmp_path / "rank0", True, "bar")
    main_rec.print("hello from rank 0")
    main_rec.epoch_bar(4, 0, 3).advance(2, 1.0, 3.0)
    main_rec.close_bar()
    out = capsys.readouterr()
    assert out.out == "hello from rank 0\n" and "epoch 1/3" in out.err


def test_the_bar_is_drawn_only_where_someone_watches(capsys):
    lines = Console(True, "lines")
    lines.epoch_bar(4, 0, 1)
    lines.advance(4)
    lines.close_bar()
    auto = Console(True, "auto")  # stderr is pytest's capture, not a terminal
    auto.epoch_bar(4, 0, 1)
    auto.close_bar()
    assert capsys.readouterr().err == ""


def test_the_clock_continues_from_the_checkpoint_time():
    clock = RunClock()
    assert 0 <= clock.elapsed() < 1
    clock.continue_from(100.0)
    assert 100.0 <= clock.elapsed() < 101.0
    rec = Recorder("unused", is_main=False, progress="lines", clock=clock)
    rec.continue_clock(50.0)
    assert rec.started == clock.started and 50.0 <= rec.elapsed() < 51.0
