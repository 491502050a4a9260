"""A pair profile saved by `specmemo profile --save-profile` drives plan's speedup prediction."""

import json
import shutil

from specmemo.paths import REPO_ROOT
from specmemo.profiling.report import save_pair_profile


def test_saved_alpha_and_c_are_used_by_plan(tmp_path, monkeypatch, cli):
    profiles = tmp_path / "profiles"
    shutil.copytree(REPO_ROOT / "profiles", profiles)
    for measured in (profiles / "pairs").glob("*.toml"):
        measured.unlink()
    monkeypatch.setenv("SPECMEMO_PROFILES", str(profiles))
    args = ("plan", "--target", "smollm2-135m-instruct", "--draft", "ngram", "--context", "1000", "--json")
    before = json.loads(cli(*args).stdout)
    assert before["speedup_source"] == "default"
    # specmemo accepted 80 of 100 drafted tokens; drafting took 0.1 ms per token against 20 ms per target step.
    runs = {"specmemo": {"drafted_tokens": 100, "accepted_tokens": 80, "draft_seconds": 0.01, "outputs": [1]},
            "specmemo-ar": {"seconds": 2.0, "new_tokens": 100}}
    path = save_pair_profile("smollm2-135m-instruct", "ngram", runs)
    assert path.parent == profiles / "pairs"
    after = json.loads(cli(*args).stdout)
    assert after["speedup_source"].startswith("measured")
    assert after["alpha"] == 0.8 and after["c"] == 0.005
    assert after["predicted_speedup"] > before["predicted_speedup"]
    # With a better acceptance, keeping 96% of the best speedup needs a longer draft.
    assert after["speedup_budget_draft_len"] > before["speedup_budget_draft_len"]


def test_a_measured_cost_curve_lowers_the_prediction_and_names_its_source(tmp_path, monkeypatch, cli):
    profiles = tmp_path / "profiles"
    shutil.copytree(REPO_ROOT / "profiles", profiles)
    monkeypatch.setenv("SPECMEMO_PROFILES", str(profiles))
    args = ("plan", "--target", "smollm2-135m-instruct", "--draft", "ngram", "--context", "1000", "--dtype", "q4",
            "--json")
    runs = {"specmemo": {"drafted_tokens": 100, "accepted_tokens": 80, "draft_seconds": 0.01, "outputs": [1]},
            "specmemo-ar": {"seconds": 2.0, "new_tokens": 100}}
    save_pair_profile("smollm2-135m-instruct", "ngram", runs)
    device = json.loads(cli(*args).stdout)
    assert device["cost_curve_source"] == "device profile (q4)" and device["cost_curve"][0] == 1.0
    steep = [1.0, 1.2, 1.4, 1.6, 1.9, 2.1, 2.3, 2.5, 2.7, 2.9, 3.1, 3.3, 3.5, 3.7, 3.9, 4.1]
    save_pair_profile("smollm2-135m-instruct", "ngram", runs, "q4", steep, "test host")
    measured = json.loads(cli(*args).stdout)
    assert measured["cost_curve"] == steep
    assert measured["cost_curve_source"] == "measured: smollm2-135m-instruct__ngram.toml on test host"
    k = measured["draft_len"]
    expected = (1 - 0.8 ** (k + 1)) / (0.2 * (steep[k] + k * 0.005))
    assert abs(measured["predicted_speedup"] - expected) < 1e-3
    # A steep curve keeps 96% of the best speedup with a shorter draft than free verification would.
    assert measured["speedup_budget_draft_len"] <= 3
