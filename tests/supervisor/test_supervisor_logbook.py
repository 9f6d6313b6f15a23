"""The logbook: append-only JSONL that survives a torn line, and its chronicle with a summary."""

import json
import math

from keel.supervisor.logbook import Logbook, read_logbook, render_chronicle, summarize
from keel.supervisor.monitors import StepRecord
from keel.supervisor.policy import Supervisor, SupervisorConfig


def test_entries_are_appended_as_strict_json_lines_and_mirrored(tmp_path):
    mirrored = []
    path = tmp_path / "run" / "logbook.jsonl"
    book = Logbook(path, mirror=mirrored.append)
    book.write(12, "signal", "nonfinite", "non-finite loss", {"loss": math.nan, "grad_norm": math.inf, "step": 12})
    book.write(12, "action", "skip_update", "skipped the update")
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    strict = [json.loads(line, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name))) for line in lines]
    assert strict[0]["evidence"] == {"loss": "nan", "grad_norm": "inf", "step": 12}
    assert set(strict[0]) == {"time", "step", "kind", "name", "message", "evidence"}
    assert strict[0]["time"].endswith("+00:00")
    assert mirrored == read_logbook(path) == strict


def test_another_rank_writes_only_its_own_faults_marked_with_its_rank(tmp_path):
    path = tmp_path / "logbook.jsonl"
    rank1 = Logbook(path, rank=1)
    rank1.write(5, "action", "skip_update", "skipped")  # rank 0 writes the run's actions
    rank1.write(6, "fault", "checkpoint_failed", "no space", {"errno": 28})
    Logbook(path).write(6, "fault", "checkpoint_failed", "another rank could not write its part")
    entries = read_logbook(path)
    assert [(e["name"], e["evidence"].get("rank")) for e in entries] == [
        ("checkpoint_failed", 1),
        ("checkpoint_failed", None),
    ]


def test_a_line_torn_by_a_crash_is_skipped_and_later_entries_stay_whole(tmp_path):
    path = tmp_path / "logbook.jsonl"
    book = Logbook(path)
    for step in range(3):
        book.write(step, "info", "note", f"entry {step}")
    with open(path, "ab") as file:
        file.write(b'{"time": "2025-01-01T00:00:00+00:00", "step": 3, "kind": "sig')  # the crash
    assert [e["step"] for e in read_logbook(path)] == [0, 1, 2]
    book.write(4, "restart", "restart", "restarted the trainer", {"downtime_seconds": 2.5})
    assert [e["step"] for e in read_logbook(path)] == [0, 1, 2, 4]
    assert read_logbook(tmp_path / "missing.jsonl") == []


def entry(step, kind, name, message, time="2025-06-01T10:00:00+00:00", **evidence):
    return {"time": time, "step": step, "kind": kind, "name": name, "message": message, "evidence": evidence}


RUN = [
    entry(0, "info", "run_start", "trainer started at step 0"),
    entry(1234, "signal", "loss_spike", "loss spike: 5.91 vs mean 3.10 ± 0.05 (56.2σ)", loss=5.91),
    entry(1234, "action", "skip_update", "skipped the update"),
    entry(1800, "signal", "divergence", "loss diverging: its moving average 3.6 has been 16% above its best 3.1"),
    entry(1800, "outcome", "skip_update", "skipping the update did not hold", recovered=0),
    entry(
        1800,
        "action",
        "rollback",
        "rolled back from step 1800 to step 1600 and skipped 10 batches",
        from_step=1800,
        to_step=1600,
        steps_lost=200,
        tokens_lost=819200,
        skip_batches=10,
    ),
    entry(1800, "action", "scale_lr", "lowered the learning rate ×0.5 (now ×0.5 of the schedule)"),
    entry(1900, "outcome", "lower_lr", "the lower learning rate worked", recovered=1),
    entry(
        2050,
        "fault",
        "crash",
        "the trainer was killed by SIGKILL.",
        time="2025-06-02T03:00:00+00:00",
        lost_steps=50,
        downtime_seconds=30.0,
    ),
    entry(2000, "restart", "restart", "restarted the trainer from checkpoint step 2000", downtime_seconds=4.0),
    entry(2000, "info", "run_start", "trainer resumed at step 2000"),
    entry(3000, "info", "run_end", "reached train.max_steps=3000", status="finished"),
]


def test_the_chronicle_groups_by_restart_and_answers_each_signal_with_its_actions():
    text = render_chronicle(RUN)
    segments = text.split("── segment ")
    assert len(segments) == 3 and segments[2].startswith("2: from 2025-06-01 10:00:00 at step 2000")
    lines = text.splitlines()
    spike = next(line for line in lines if "loss spike" in line)
    assert (
        spike == "2025-06-01 10:00:00  step    1234 — loss spike: 5.91 vs mean 3.10 ± 0.05 (56.2σ) → skipped the update"
    )
    divergence = next(line for line in lines if "diverging" in line)
    assert divergence.endswith(
        "→ rolled back from step 1800 to step 1600 and skipped 10 batches; "
        "lowered the learning rate ×0.5 (now ×0.5 of the schedule)"
    )
    assert any(line.endswith("outcome: skipping the update did not hold") for line in lines)
    assert any("fault: the trainer was killed by SIGKILL." in line and line.startswith("2025-06-02") for line in lines)


def test_the_summary_counts_interventions_and_losses():
    s = summarize(RUN)
    assert s["interventions"] == {"skip_update": 1, "rollback": 1, "scale_lr": 1}
    assert (s["repairs_worked"], s["repairs_failed"]) == (1, 1)
    assert (s["rollbacks"], s["steps_lost_to_rollbacks"], s["tokens_lost_to_rollbacks"]) == (1, 200, 819200)
    assert (s["faults"], s["restarts"], s["seconds_lost_to_faults"], s["steps_redone_after_faults"]) == (1, 1, 34.0, 50)
    assert s["status"] == "finished at step 3000: reached train.max_steps=3000"
    text = render_chronicle(RUN)
    assert "interventions: 1 skip_update, 1 rollback, 1 scale_lr" in text
    assert "rollbacks:     1, 200 steps and 819.2k tokens lost" in text
    assert "faults:        1, restarts: 1, 34 s of wall time lost, 50 steps redone" in text


def test_the_final_status_names_a_supervisor_stop_or_a_watchdog_giving_up():
    stopped = RUN[:4] + [entry(1800, "action", "stop", "stopped the run: every repair failed")]
    assert summarize(stopped)["status"].startswith("stopped by the supervisor at step 1800")
    gave_up = RUN[:9] + [entry(2050, "info", "gave_up", "gave up after 3 restarts without a new checkpoint")]
    assert (
        summarize(gave_up)["status"]
        == "failed at step 2050: the watchdog gave up after 3 restarts without a new checkpoint"
    )
    assert summarize([])["status"].startswith("no end recorded")


def test_a_supervised_nan_reads_as_a_chronicle_line(tmp_path):
    path = tmp_path / "logbook.jsonl"
    supervisor = Supervisor(SupervisorConfig(), Logbook(path), max_steps=100, grad_clip=1.0)
    for step in range(30):
        loss = math.nan if step == 20 else 5.0 - step / 100
        supervisor.observe(
            StepRecord(
                step=step,
                loss=loss,
                grad_norm=1.0,
                lr=1e-3,
                tokens=step * 64,
                step_seconds=0.1,
                act_norm=1.0,
                logit_norm=1.0,
            )
        )
    text = render_chronicle(read_logbook(path))
    assert "step      20 — non-finite loss: loss nan, grad norm 1 → skipped the update" in text
    assert "interventions: 1 skip_update" in text and "signals:       1 nonfinite" in text
