"""A pair profile saved by `specmemo profile --save-profile` drives plan's speedup prediction."""

import json
import shutil

import pytest

from specmemo.paths import REPO_ROOT
from specmemo.profiling.report import save_pair_profile


def copy_profiles(tmp_path, monkeypatch, measured_pairs: bool = False):
    """The repository's profiles in a temporary SPECMEMO_PROFILES, without the measured pair
    profiles unless asked."""
    profiles = tmp_path / "profiles"
    shutil.copytree(REPO_ROOT / "profiles", profiles)
    monkeypatch.setenv("SPECMEMO_PROFILES", str(profiles))
    if not measured_pairs:
        for measured in (profiles / "pairs").glob("*.toml"):
            measured.unlink()
    return profiles


def test_saved_alpha_and_c_are_used_by_plan(tmp_path, monkeypatch, cli):
    profiles = copy_profiles(tmp_path, monkeypatch)
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
    copy_profiles(tmp_path, monkeypatch, measured_pairs=True)
    args = ("plan", "--target", "smollm2-135m-instruct", "--draft", "ngram", "--context", "1000", "--dtype", "q4",
            "--json")
    runs = {"specmemo": {"drafted_tokens": 100, "accepted_tokens": 80, "draft_seconds": 0.01, "outputs": [1]},
            "specmemo-ar": {"seconds": 2.0, "new_tokens": 100}}
    save_pair_profile("smollm2-135m-instruct", "ngram", runs)
    device = json.loads(cli(*args).stdout)
    assert device["cost_curve_source"].startswith("device profile (q4") and device["cost_curve"][0] == 1.0
    steep = [1.0, 1.2, 1.4, 1.6, 1.9, 2.1, 2.3, 2.5, 2.7, 2.9, 3.1, 3.3, 3.5, 3.7, 3.9, 4.1]
    from specmemo.host import cpu_name

    save_pair_profile("smollm2-135m-instruct", "ngram", runs, "q4", steep, cpu_name())
    measured = json.loads(cli(*args).stdout)
    assert measured["cost_curve"] == steep
    assert measured["cost_curve_source"] == f"measured: smollm2-135m-instruct__ngram.toml on {cpu_name()}"
    # the engine drafts each step's best k ≤ the plan's: on this curve 3 beats the plan's 5
    k = measured["draft_len"]
    at = [(1 - 0.8 ** (j + 1)) / (0.2 * (steep[j] + j * 0.005)) for j in range(1, k + 1)]
    assert k == 5 and max(at) == at[2] > at[-1]
    assert abs(measured["predicted_speedup"] - max(at)) < 1e-3
    # A steep curve keeps 96% of the best speedup with a shorter draft than free verification would.
    assert measured["speedup_budget_draft_len"] <= 3


def test_a_head_pairs_measured_rank_acceptance_drives_the_tree_prediction(tmp_path, monkeypatch, cli):
    """The draft head's card gives plan its held-out ranks; a profile run's measured ranks replace them."""
    copy_profiles(tmp_path, monkeypatch)
    args = ("plan", "--target", "smollm2-135m-instruct", "--draft", "head", "--context", "1000", "--dtype", "q4",
            "--json")
    before = json.loads(cli(*args).stdout)
    assert before["tree_ranks_source"].startswith("the head's card")
    assert before["components"]["draft_weights"] > 0
    # A head step took 0.12 of a target step (the card's estimate is about that); acceptance fell to 0.3.
    runs = {"specmemo": {"drafted_tokens": 100, "accepted_tokens": 30, "draft_seconds": 0.24, "outputs": [1],
                         "rank_hits": [30, 10, 5, 0], "rank_visits": [100, 100, 100, 0], "tokens_per_s": 60.0},
            "specmemo-ar": {"seconds": 2.0, "new_tokens": 100, "tokens_per_s": 50.0}}
    path = save_pair_profile("smollm2-135m-instruct", "head", runs)
    assert "ranks = [0.3, 0.1, 0.05]\n" in path.read_text() and "speedup = 1.2000" in path.read_text()
    after = json.loads(cli(*args).stdout)
    # The fourth rank was never offered: it stays the card's.
    assert after["tree_ranks"] == [0.3, 0.1, 0.05, before["tree_ranks"][3]]
    assert after["tree_ranks_source"].startswith("measured") and "card" in after["tree_ranks_source"]
    assert after["predicted_speedup"] < before["predicted_speedup"]
    # A rank offered a handful of times is not saved: 0 of 3 would keep trees from offering it again.
    runs["specmemo"].update(rank_hits=[30, 0, 0, 0], rank_visits=[100, 3, 0, 0])
    assert "ranks = [0.3]\n" in save_pair_profile("smollm2-135m-instruct", "head", runs).read_text()
    assert json.loads(cli(*args).stdout)["tree_ranks"][1:] == before["tree_ranks"][1:]


def test_auto_picks_the_drafter_that_measured_fastest(tmp_path, monkeypatch):
    from specmemo.models.resolve import fastest_drafter, resolve, resolve_pair

    profiles = copy_profiles(tmp_path, monkeypatch)
    target = resolve("smollm2-135m-instruct")
    assert fastest_drafter(target) == "ngram"   # nothing measured: the weightless default
    (profiles / "pairs" / "smollm2-135m-instruct__head.toml").write_text("alpha = 0.3\nspeedup = 0.93\n")
    assert fastest_drafter(target) == "ngram"   # a drafter measured slower than none never wins
    (profiles / "pairs" / "smollm2-135m-instruct__ngram.toml").write_text("alpha = 0.5\nspeedup = 1.2\n")
    (profiles / "pairs" / "smollm2-135m-instruct__head.toml").write_text("alpha = 0.6\nspeedup = 1.3\n")
    assert resolve_pair("smollm2-135m-instruct", "auto")[2] == "head"
    (profiles / "pairs" / "smollm2-135m-instruct__ngram.toml").write_text("alpha = 0.5\nspeedup = 1.4\n")
    assert resolve_pair("smollm2-135m-instruct", "auto")[2] == "ngram"
    (profiles / "pairs" / "smollm2-135m-instruct__ngram+head.toml").write_text("alpha = 0.5\nspeedup = 1.45\n")
    assert resolve_pair("smollm2-135m-instruct", "auto")[2] == "ngram+head"


def test_a_drafter_that_drafts_in_few_steps_is_predicted_from_its_measured_share(tmp_path, monkeypatch, cli):
    """n-gram lookup drafts only where it finds a match: the steps without one commit a token at
    one step's cost, which the prediction now counts from the profile run's histogram."""
    copy_profiles(tmp_path, monkeypatch)
    args = ("plan", "--target", "smollm2-135m-instruct", "--draft", "ngram", "--context", "1000", "--json")
    runs = {"specmemo": {"drafted_tokens": 100, "accepted_tokens": 60, "draft_seconds": 0.0, "outputs": [1],
                         "steps": 200, "accepted_histogram": {"0": 10, "2": 15, "3": 5}},
            "specmemo-ar": {"seconds": 2.0, "new_tokens": 100}}
    path = save_pair_profile("smollm2-135m-instruct", "ngram", runs)
    assert "drafted_share = 0.1500" in path.read_text()      # 30 of 200 steps drafted
    plan = json.loads(cli(*args).stdout)
    assert plan["drafted_share"] == 0.15 and plan["drafted_share_source"].startswith("measured")
    alpha, curve, k = plan["alpha"], plan["cost_curve"], plan["draft_len"]
    per_step = [((1 - alpha ** (j + 1)) / (1 - alpha), (curve[j] if curve else 1.0)) for j in range(1, k + 1)]
    want = max((0.15 * t + 0.85) / (0.15 * c + 0.85) for t, c in per_step)
    assert abs(plan["predicted_speedup"] - want) < 1e-3
    assert want < max(t / c for t, c in per_step)             # below what drafting every step would give


def test_profile_refuses_an_unknown_dtype_in_one_line_before_starting_engines(cli, tmp_path):
    r = cli("profile", "--dtype", "bogus", "--limit", "1", "--out", tmp_path / "p")
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1].startswith("error: unknown dtype 'bogus'")
    assert not (tmp_path / "p").exists()   # refused before any engine ran


def test_lookup_then_head_is_predicted_from_its_two_parts():
    """ngram+head drafts a lookup chain on the share of steps where lookup matches and a head tree
    on the rest: with no matches it is the head, with matches everywhere the lookup, and between."""
    from dataclasses import replace

    from specmemo.budget.speedup import PairProfile

    curve = (1.0, 1.14, 1.28, 1.38, 1.82, 1.86)
    head = PairProfile(0.38, 0.05, "head", curve, ranks=(0.38, 0.12, 0.05))
    lookup = PairProfile(0.64, 0.0, "ngram", curve, drafted_share=0.27)
    alone = [head.speedup(5), replace(lookup, drafted_share=1.0).speedup(5)]
    both = [replace(head, lookup=replace(lookup, drafted_share=s)).speedup(5) for s in (0.0, 0.27, 1.0)]
    assert both[0] == pytest.approx(alone[0]) and both[2] == pytest.approx(alone[1])
    assert alone[0] < both[1] < alone[1]


def test_plan_predicts_lookup_then_head_from_the_saved_ngram_and_head_profiles(tmp_path, monkeypatch, cli):
    profiles = copy_profiles(tmp_path, monkeypatch)
    pairs = profiles / "pairs"
    (pairs / "smollm2-135m-instruct__ngram.toml").write_text("alpha = 0.64\nc = 0.0\ndrafted_share = 0.27\n")
    (pairs / "smollm2-135m-instruct__head.toml").write_text("alpha = 0.38\nc = 0.05\nranks = [0.38, 0.12]\n")
    args = ("plan", "--target", "smollm2-135m-instruct", "--context", "512", "--dtype", "q4", "--json")
    got = {d: json.loads(cli(*args, "--draft", d).stdout) for d in ("ngram", "head", "ngram+head")}
    assert "lookup: measured: smollm2-135m-instruct__ngram.toml" in got["ngram+head"]["speedup_source"]
    # Lookup drafts on 27% of steps (as n-gram alone), the head on the rest (where n-gram drafts nothing).
    assert got["ngram"]["predicted_speedup"] < got["ngram+head"]["predicted_speedup"]
    assert got["head"]["predicted_speedup"] < got["ngram+head"]["predicted_speedup"]


def test_a_lookup_then_head_run_saves_both_parts_and_plan_predicts_from_them(tmp_path, monkeypatch, cli):
    copy_profiles(tmp_path, monkeypatch)
    # 100 steps: 40 lookup chains (120 drafted, 90 accepted, 0.01 s), 60 head trees (60 drafted,
    # 0.12 s); a target step takes 0.02 s.
    runs = {"specmemo": {"drafted_tokens": 180, "accepted_tokens": 114, "draft_seconds": 0.13, "outputs": [1],
                         "steps": 100, "accepted_histogram": {"1": 100}, "rank_hits": [24, 0, 0, 0],
                         "rank_visits": [60, 0, 0, 0], "lookup": [40, 120, 90, 0.01], "tokens_per_s": 80.0},
            "specmemo-ar": {"seconds": 2.0, "new_tokens": 100, "tokens_per_s": 50.0}}
    text = save_pair_profile("smollm2-135m-instruct", "ngram+head", runs).read_text()
    assert "lookup_share = 0.4000\nlookup_alpha = 0.7500\n" in text
    assert "c = 0.1000\n" in text          # the head's: 0.12 s over its 60 drafts, per 0.02 s step
    plan = json.loads(cli("plan", "--target", "smollm2-135m-instruct", "--draft", "ngram+head", "--context", "512",
                          "--dtype", "q4", "--json").stdout)
    assert plan["c"] == 0.1 and "lookup: measured: smollm2-135m-instruct__ngram+head.toml" in plan["speedup_source"]


def other_class_host() -> str:
    """A host as profiles name them, of another kernel class than this machine's."""
    from specmemo.host import cpu_class

    return "Some CPU (family 1 model 1; AVX2)" if cpu_class() != "avx2" else \
        "Some CPU (family 1 model 1; AVX2, AVX-512, AVX512-BF16)"


def test_costs_measured_on_another_cpu_class_are_not_used_here(tmp_path, monkeypatch, cli):
    from specmemo.models.resolve import resolve, resolve_pair

    profiles = copy_profiles(tmp_path, monkeypatch)
    pairs = profiles / "pairs"
    args = ("plan", "--target", "smollm2-135m-instruct", "--draft", "ngram", "--context", "512", "--dtype", "q4", "--json")
    here = json.loads(cli(*args).stdout)
    elsewhere = f'host = "{other_class_host()}"\ncost_curve_q4 = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]\n'
    (pairs / "smollm2-135m-instruct__ngram.toml").write_text("alpha = 0.7\nc = 0.3\nspeedup = 9.0\n" + elsewhere)
    got = json.loads(cli(*args).stdout)
    # Its acceptance holds here; its draft cost and flat curve were another CPU's: this machine's curve instead.
    assert got["alpha"] == 0.7 and got["c"] == 0.0
    assert got["cost_curve_source"] == here["cost_curve_source"] and got["cost_curve"] == here["cost_curve"]
    assert "acceptance only" in got["speedup_source"]
    # auto ignores a speedup measured elsewhere: a head that measured 9× on another CPU but accepts
    # 1% of its drafts loses to lookup measured on this machine's class (any host of it).
    from specmemo.host import cpu_name

    (pairs / "smollm2-135m-instruct__head.toml").write_text("alpha = 0.01\nranks = [0.01]\nspeedup = 9.0\n" + elsewhere)
    (pairs / "smollm2-135m-instruct__ngram.toml").write_text(f'alpha = 0.5\nspeedup = 1.1\nhost = "{cpu_name()}"\n')
    assert resolve_pair("smollm2-135m-instruct", "auto")[2] == "ngram"
    # ... and predicts one measured elsewhere from its acceptance with this machine's costs.
    (pairs / "smollm2-135m-instruct__head.toml").write_text("alpha = 0.95\nranks = [0.95, 0.3]\nc = 0.01\n" + elsewhere)
    assert resolve_pair("smollm2-135m-instruct", "auto")[2] == "head"
    from specmemo.models.resolve import predicted_here

    assert predicted_here(resolve("smollm2-135m-instruct"), "head") > 1.1


def test_the_device_profile_gives_the_cost_curve_of_this_cpus_class(tmp_path, monkeypatch):
    from specmemo.budget.devices import load_device
    from specmemo.host import cpu_class

    profiles = copy_profiles(tmp_path, monkeypatch)
    cpu = profiles / "devices" / "cpu.toml"
    text = cpu.read_text()
    here, other = cpu_class(), "some-other-class"
    text = "\n".join(line for line in text.splitlines() if not line.startswith("cost_curve_class"))
    text = f'cost_curve_class = "{other}"\n' + text.split("\n[classes")[0]
    cpu.write_text(text)
    dev = load_device("cpu")
    assert dev.cost_curve("q4")[1] > 1.0 and f"measured on {other} CPUs" in dev.curve_source("q4")
    assert dev.kernels.draft_head_weights == ""
    # A table for this machine's class overrides the profile's keys: its curves, its head's weights.
    cpu.write_text(text + f'\n[classes.{here}]\ncost_curve_q4 = [1.0, 1.5, 2.5]\ndraft_head_weights = "int8"\n'
                          'packed_head = false\n')
    dev = load_device("cpu")
    assert dev.cost_curve("q4") == (1.0, 1.5, 2.5) and dev.curve_source("q4") == f"device profile (q4, {here} CPUs)"
    assert dev.cost_curve("fp32") == ()          # measured for the other class only
    from specmemo.models.quant import draft_head_weights

    assert dev.kernels.draft_head_weights == "int8" and draft_head_weights(dev.kernels) == "int8"
