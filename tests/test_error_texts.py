"""The exact one-line errors of bad YAML, of errors under several processes, and of bad data with the check off."""

import shutil

import pytest
from broken_files import broken_dataset
from conftest import SAMPLE, TINY, cli


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("flowers-dist: error:")]


def _main(args, capsys) -> tuple[int, list[str]]:
    """The CLI in this process (a subprocess would spend seconds importing torch for a config error)."""
    from flowers_dist.cli import main

    code = main(args)
    return code, _errors(capsys.readouterr().err)


@pytest.mark.e2e
def test_yaml_errors_give_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  root: x\n  loader: [torch\ntrain:\n  epochs: 2\n")
    assert _main(["train", "--config", str(bad)], capsys) == (
        2,
        [
            f"flowers-dist: error: config file {bad} is not valid YAML: line 4, column 6: expected ',' or ']', "
            "but got ':' (while parsing a flow sequence started at line 3, column 11)"
        ],
    )
    bad.write_text("data:\n  root: x\n   loader: torch\n")
    assert _main(["train", "--config", str(bad)], capsys)[1] == [
        f"flowers-dist: error: config file {bad} is not valid YAML: line 3, column 10: mapping values are not allowed here"
    ]
    assert _main(["train", "--config", "configs/quickstart.yaml", "optim.lr=[1"], capsys)[1] == [
        "flowers-dist: error: override 'optim.lr=[1': value is not valid YAML (line 1, column 3: "
        "expected ',' or ']', but got '<stream end>' (while parsing a flow sequence started at line 1, column 1))"
    ]
    # And as a user runs it: the one line is all of stderr.
    bad.write_text("data: [\n")
    proc = cli(["data", "check", str(tmp_path), "--config", str(bad)], check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "line 2, column 1" in proc.stderr


def test_only_rank_0_prints_a_user_error(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [\n")
    monkeypatch.setenv("RANK", "1")
    assert _main(["train", "--config", str(bad)], capsys) == (2, [])
    monkeypatch.setenv("RANK", "0")
    code, errors = _main(["train", "--config", str(bad)], capsys)
    assert code == 2 and len(errors) == 1


@pytest.mark.e2e
def test_errors_before_training_are_printed_once_over_two_processes(tmp_path):
    proc = cli(
        [
            "train",
            "--config",
            "configs/quickstart.yaml",
            *TINY,
            "train.global_batch_size=3",
            f"train.output_dir={tmp_path}",
        ],
        nprocs=2,
        check=False,
    )
    assert proc.returncode != 0
    assert _errors(proc.stderr) == [
        "flowers-dist: error: config key 'train.global_batch_size': 3 does not split evenly over 2 processes x train.grad_accum_steps 1"
    ]
    # An error only the main process finds (it alone checks the data) reaches, and stops, every rank.
    root = tmp_path / "data"
    shutil.copytree(SAMPLE, root)
    for f in (root / "train" / "roses").iterdir():
        f.write_bytes(b"")
    proc = cli(
        ["train", "--config", "configs/quickstart.yaml", *TINY, f"data.root={root}", f"train.output_dir={tmp_path}"],
        nprocs=2,
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0
    assert _errors(proc.stderr) == [
        f"flowers-dist: error: class folder {root}/train/roses has no usable image (8 skipped) "
        f"(`flowers-dist data check {root}` lists every problem)"
    ]
    assert not (tmp_path / "quickstart").exists() and not list(tmp_path.glob("quickstart-*"))  # no run folder left


@pytest.mark.e2e
def test_dali_with_the_check_off_names_the_suspects_and_the_check(tmp_path):
    pytest.importorskip("nvidia.dali")
    root = tmp_path / "data"
    broken_dataset(SAMPLE, root, leak=False)
    proc = cli(
        [
            "train",
            "--config",
            "configs/quickstart.yaml",
            *TINY,
            f"data.root={root}",
            "data.loader=dali",
            "data.check=false",
            "train.epochs=1",
            f"train.output_dir={tmp_path}",
            "train.name=r",
        ],
        check=False,
    )
    assert proc.returncode == 2
    [line] = _errors(proc.stderr)
    assert f"the DALI pipeline failed on {root}/train" in line and "zz_" in line
    assert line.endswith(
        f"(data.check=true, the default, leaves undecodable files out; `flowers-dist data check {root}` lists them)"
    )


@pytest.mark.e2e
def test_data_check_without_a_root_is_one_line():
    proc = cli(["data", "check"], check=False)
    assert proc.returncode == 2 and _errors(proc.stderr) == [
        "flowers-dist: error: data check needs ROOT (or --restore MANIFEST)"
    ]
