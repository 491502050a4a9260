"""The host calibration (budget.calibration): what a run measured beside its counted tensors is
recorded, keeps its largest figures, belongs to one host and one run, and plans the next run of the
same kind; a real run records it and the run planned from it stays within that plan."""

import json
import subprocess
import sys

import pytest

from specmemo.budget import calibration
from specmemo.budget.calibration import MARGIN_BYTES, Calibration, bucket
from specmemo.budget.plan import make_plan
from specmemo.models.resolve import plan_pair, resolve_pair

SPECMEMO = [sys.executable, "-m", "specmemo"]
KEY = calibration.run_key("smollm2-135m-instruct", "ngram", "q4", None, "cpu")
MiB = 2**20


def test_run_sizes_are_quarter_octaves_that_hold_the_run():
    sizes = [bucket(t) for t in range(1, 9000)]
    assert all(b >= max(t, 64) for t, b in zip(range(1, 9000), sizes))
    assert sorted(set(sizes))[:6] == [64, 77, 91, 108, 128, 153] and bucket(4096) == 4096
    assert all(b2 / b1 < 1.21 for b1, b2 in zip(sorted(set(sizes)), sorted(set(sizes))[1:]))


def test_a_record_keeps_the_largest_of_each_figure_and_survives_damage(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECMEMO_CALIBRATION", str(tmp_path / "c.json"))
    assert calibration.read(KEY) is None
    calibration.record(KEY, Calibration(400 * MiB, 50 * MiB, {512: 3 * MiB}))
    calibration.record(KEY, Calibration(390 * MiB, 55 * MiB, {512: 2 * MiB, 4096: 1 * MiB}))
    assert calibration.read(KEY) == Calibration(400 * MiB, 55 * MiB, {512: 3 * MiB, 4096: 1 * MiB})
    assert calibration.read(calibration.run_key("smollm2-135m-instruct", "none", "q4", None, "cpu")) is None
    # another host (or torch) does not read this one's record
    monkeypatch.setattr(calibration, "host_key", lambda: "another host")
    assert calibration.read(KEY) is None
    monkeypatch.undo()
    monkeypatch.setenv("SPECMEMO_CALIBRATION", str(tmp_path / "c.json"))
    (tmp_path / "c.json").write_text("{not json")
    assert calibration.read(KEY) is None           # measured again, not a traceback
    calibration.record(KEY, Calibration(1, 2, {64: 3}))
    assert calibration.read(KEY) == Calibration(1, 2, {64: 3})
    (tmp_path / "c.json").write_text(json.dumps({calibration.host_key(): ["not", "records"]}))
    assert calibration.read(KEY) is None
    calibration.record(KEY, Calibration(1, 2, {64: 3}))
    assert calibration.read(KEY) == Calibration(1, 2, {64: 3})
    monkeypatch.setenv("SPECMEMO_CALIBRATION", "off")
    calibration.record(KEY, Calibration(9, 9, {64: 9}))
    assert calibration.read(KEY) is None


def test_scratch_is_planned_from_runs_of_about_this_size_with_a_margin():
    c = Calibration(0, 0, {64: 8 * MiB, 431: 1 * MiB, 512: 5 * MiB, 4096: 4 * MiB})
    assert c.scratch_bytes(461) == 5 * MiB + MARGIN_BYTES          # the octave 256..512: 431 and 512
    assert c.scratch_bytes(3990) == 4 * MiB + MARGIN_BYTES
    assert c.scratch_bytes(1500) == 5 * MiB + MARGIN_BYTES         # nothing near: the largest run below
    assert c.scratch_bytes(40) == 8 * MiB + MARGIN_BYTES
    assert Calibration(0, 0, {512: MiB}).scratch_bytes(100) is None   # every run was larger


def plan_at(context, measured):
    refs = resolve_pair("smollm2-135m-instruct", "ngram")
    return plan_pair(refs, context=context, budget=1 << 40, sampling=False).plan.request.with_(
        context=context, measured_scratch=tuple(measured.scratch.items()))


def test_a_context_below_every_measured_run_plans_no_less_than_the_smallest_run_needed():
    measured = Calibration(0, 0, {512: 3 * MiB})
    small, run = make_plan(plan_at(100, measured)), make_plan(plan_at(512, measured))
    assert small.generation_bytes == run.generation_bytes
    # and the plan grows with the context where runs were measured
    sizes = [make_plan(plan_at(n, Calibration(0, 0, {64: 8 * MiB, 512: 3 * MiB}))).total_bytes
             for n in (64, 128, 256, 512, 1024)]
    assert sizes == sorted(sizes)


@pytest.mark.slow
def test_a_run_records_what_it_measured_and_the_next_run_plans_with_it_and_stays_inside(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECMEMO_CALIBRATION", str(tmp_path / "c.json"))
    prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 30)

    def generate():
        r = subprocess.run([*SPECMEMO, "generate", "--draft", "ngram", "-p", prompt, "-m", "48", "--ignore-eos",
                            "--json"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def plan():
        return json.loads(subprocess.run([*SPECMEMO, "plan", "--draft", "ngram", "--context", "512", "--json"],
                                         capture_output=True, text=True, check=True).stdout)

    before = plan()
    first = generate()
    assert not before["calibrated"] and not first["calibrated"]
    record = calibration.read(KEY)
    assert record and record.baseline_bytes > 0 and record.overhead_bytes > 0 and record.scratch
    after = plan()
    assert after["calibrated"]
    assert after["components"]["process_baseline"] == record.baseline_bytes
    assert after["components"]["runtime_overhead"] == record.overhead_bytes + MARGIN_BYTES
    assert after["total_bytes"] < before["total_bytes"]   # the profile's fixed reserves are the larger
    second = generate()
    assert second["calibrated"]
    # Never short: the run planned from the calibration stays within that plan.
    assert second["generation_peak_bytes"] <= second["predicted_generation_bytes"]
    assert second["process_peak_bytes"] <= second["plan_total_bytes"]
    assert second["plan_total_bytes"] < first["plan_total_bytes"]
