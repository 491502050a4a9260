"""`specmemo profile` against transformers' generate, with and without its cache."""

import json
import subprocess
import sys

import pytest


SPECMEMO = [sys.executable, "-m", "specmemo"]


@pytest.mark.slow
def test_profile_compares_hf_ar_with_and_without_its_cache(tmp_path):
    r = subprocess.run([*SPECMEMO, "profile", "--limit", "1", "--turns", "2", "--max-new-tokens", "8",
                        "--engines", "specmemo-ar,hf-ar,hf-ar-cached", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {row["engine"]: row for row in report["runs"]}
    assert rows["hf-ar-cached"]["turns"] == 2 and rows["hf-ar-cached"]["turns_identical_to_hf_ar"] == 2
    assert "past_key_values" in (tmp_path / "report.md").read_text()
