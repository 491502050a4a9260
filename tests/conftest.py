import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def cli():
    """Invoke the real typer app in-process; returns the click Result (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from specmemo.cli import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


@pytest.fixture(autouse=True)
def own_calibration(tmp_path_factory, monkeypatch):
    """Each test plans from the device profile unless it records a calibration itself: a record left
    by another test (or by this machine's own runs) would make its plans depend on test order."""
    monkeypatch.setenv("SPECMEMO_CALIBRATION", str(tmp_path_factory.mktemp("calibration") / "calibration.json"))
