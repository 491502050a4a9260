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
