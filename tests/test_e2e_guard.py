"""The guard that keeps the fast subset (`pytest -m "not e2e"`) honest: a test without the e2e mark that starts a
training process, a launcher or SLURM fails, and says which mark to add."""

import subprocess
import sys

import conftest as guard
import pytest

pytest_plugins = ["pytester"]

PYTHON = sys.executable


@pytest.mark.parametrize(
    "argv, starts",
    [
        ([PYTHON, "-m", "flowers_dist", "train"], True),
        ([PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "-m", "flowers_dist"], True),
        ([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2"], True),
        (["/venv/bin/flowers-dist", "--help"], True),
        (["accelerate", "launch", "train.py"], True),
        (["srun", "--ntasks", "2", "hostname"], True),
        (["sbatch", "launch/slurm.sbatch"], True),
        (["bash", "launch/accelerate.sh", "--config", "c.yaml"], True),
        ([PYTHON, "launch/gpu_check.py"], True),
        (["shellcheck", "-x", "launch/accelerate.sh", "launch/common.sh"], False),
        ([PYTHON, "-c", "import flowers_dist"], False),
        ([PYTHON, "data/make_sample.py", "in", "out"], False),
        (["hadolint", "Dockerfile"], False),
        (["mount", "-t", "tmpfs", "tmpfs", "/mnt"], False),
    ],
)
def test_training_processes_and_launchers_are_told_from_small_tools(argv, starts):
    assert guard.starts_training(argv) == starts


def test_the_guard_refuses_before_anything_starts_and_lets_small_tools_run():
    before = subprocess.Popen.__init__
    with guard.no_training_processes("this test") as refused:
        with pytest.raises(
            guard.UnmarkedEndToEnd, match=r"this test is not marked e2e but starts `.* -m flowers_dist --help`"
        ):
            subprocess.run([PYTHON, "-m", "flowers_dist", "--help"], capture_output=True)
        assert subprocess.run([PYTHON, "-c", "print('small')"], capture_output=True, text=True).stdout == "small\n"
    assert refused == [f"{PYTHON} -m flowers_dist --help"]
    assert subprocess.Popen.__init__ is before  # put back on the way out


def test_an_unmarked_test_that_starts_the_cli_fails_even_when_it_catches_the_refusal(pytester):
    pytester.makepyfile(
        test_inner=f"""
        import subprocess
        import pytest

        CLI = [{PYTHON!r}, "-m", "flowers_dist", "--help"]

        @pytest.fixture
        def run_in_fixture():
            subprocess.run(CLI)

        def test_starts_the_cli():
            subprocess.run(CLI)

        def test_catches_the_refusal():
            try:
                subprocess.run(CLI)
            except Exception:
                pass

        def test_starts_it_in_a_fixture(run_in_fixture):
            pass

        def test_runs_a_small_tool():
            subprocess.run([{PYTHON!r}, "-c", "pass"], check=True)
    """
    )
    result = pytester.inline_run("-p", "no:cacheprovider", plugins=[guard])
    reports = {r.nodeid.split("::")[-1]: r for r in result.getreports("pytest_runtest_logreport") if r.failed}
    assert set(reports) == {"test_starts_the_cli", "test_catches_the_refusal", "test_starts_it_in_a_fixture"}
    assert all(
        "is not marked e2e but start" in str(r.longrepr) and "flowers_dist --help" in str(r.longrepr)
        for r in reports.values()
    )
    assert reports["test_starts_it_in_a_fixture"].when == "setup"
    result.assertoutcome(passed=1, failed=3)
