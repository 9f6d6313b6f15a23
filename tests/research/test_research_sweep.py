"""keel sweep: trials are real supervised runs, pruning stops a run cleanly, a killed sweep resumes, bad input is
one sentence."""

import math
import re

import optuna
import pytest
from conftest import TINY, assert_user_error, keel, run
from optuna.trial import TrialState

from keel.cli import main
from keel.errors import UserError
from keel.research.sweep import build_spec, judge_trial, run_sweep
from keel.runs.registry import Registry
from keel.supervisor.logbook import read_logbook
from keel.train import checkpoint as ckpt

MODEL = [s for s in TINY if s.startswith("model.")]
PARAMS = ["optim.lr=log:1e-6:1e-2"]


def base_sets(data) -> list[str]:
    return [f"data.path={data}", *TINY, "train.compile=false", "train.max_steps=40"]


def cli_args(data, out) -> list[str]:
    sets = [arg for s in base_sets(data) for arg in ("--set", s)]
    params = [arg for p in PARAMS for arg in ("--param", p)]
    return ["sweep", *sets, *params, "--name", "lr", "--out", str(out), "--startup-trials", "1"]


@pytest.fixture(scope="module")
def swept(tiny_data, tmp_path_factory):
    """A 3-trial sweep: a good learning rate first, then one so small that its first evaluation is worse than
    the first trial's (pruned there), then one TPE picks."""
    home, out = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("sweeps") / "lr"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KEEL_HOME", str(home))
        study = optuna.create_study(storage=f"sqlite:///{home}/sweeps.sqlite", study_name="lr", direction="minimize")
        study.enqueue_trial({"optim.lr": 3e-3})  # optuna's own way to try chosen settings first
        study.enqueue_trial({"optim.lr": 1e-6})
        lines = []
        spec = build_spec(None, base_sets(tiny_data), PARAMS, name="lr", out=str(out))
        result = run_sweep(spec, n_trials=3, startup_trials=1, say=lines.append)
    return home, out, result, lines


def test_each_trial_is_a_supervised_run_and_the_best_are_tabled(swept, monkeypatch):
    home, out, result, lines = swept
    monkeypatch.setenv("KEEL_HOME", str(home))
    trials = result.study.trials
    assert len(trials) == 3 and sum(result.counts.values()) == 3
    first = trials[0]
    assert first.state == TrialState.COMPLETE and first.params == {"optim.lr": 3e-3}
    run_dir = out / "lr-000"
    assert first.user_attrs["run_dir"] == str(run_dir)
    with Registry() as registry:
        row = registry.get_run("lr-000")
        val = registry.metrics("lr-000", "val_loss")["val_loss"]
    assert row["status"] == "finished" and row["step"] == 40 and row["run_dir"] == str(run_dir)
    assert first.value == val[-1][1]  # the objective: the final val loss
    assert first.intermediate_values == dict(val)  # every evaluation was reported to Optuna at its step
    ends = [e for e in read_logbook(run_dir / "logbook.jsonl") if e["name"] == "run_end"]
    assert ends[-1]["evidence"]["val_loss"] == first.value
    assert "optim.lr=0.003: val loss" in lines[0]

    table = result.table.splitlines()
    assert table[0].split()[:5] == ["trial", "state", "val", "loss", "step"]
    assert table[1].split()[:2] == [str(result.study.best_trial.number), "complete"]
    page = result.page.read_text()
    assert result.page == out / "sweep.html" and page.count("src='data:image/png;base64,") >= 2
    assert "Parameter importances" in page


def test_a_pruned_trial_is_stopped_checkpointed_and_says_why(swept, monkeypatch):
    home, out, result, lines = swept
    monkeypatch.setenv("KEEL_HOME", str(home))
    pruned = result.study.trials[1]
    assert pruned.state == TrialState.PRUNED
    # The first eval the sweep's poll sees after the first finished trial's: step 10, or 20 on a busy machine.
    reason = re.match(r"pruned at step (\d+): val loss", pruned.user_attrs["reason"])
    assert reason, pruned.user_attrs["reason"]
    step = int(reason.group(1))
    assert "the median" in pruned.user_attrs["reason"] and pruned.user_attrs["reason"] in lines[1]
    run_dir = out / "lr-001"
    with Registry() as registry:
        row = registry.get_run("lr-001")
        events = [e["message"] for e in registry.events("lr-001")]
    # The trainer stopped well before train.max_steps=40, and checkpointed where it stopped.
    assert row["status"] == "stopped" and step <= row["step"] < 40
    assert ckpt.checkpoint_step(ckpt.list_checkpoints(run_dir)[-1]) == row["step"]
    entries = [(e["name"], e["message"]) for e in read_logbook(run_dir / "logbook.jsonl")]
    names = [name for name, _ in entries]
    assert names.index("pruned") < names.index("run_end")
    assert entries[-1] == ("run_end", "stopped by SIGTERM")
    assert any(f"sweep trial 1 pruned at step {step}" in message for message in events)  # mirrored to the registry


def test_the_same_command_resumes_after_a_kill_and_retries_the_running_trial(swept, tiny_data, monkeypatch, capsys):
    """A sweep killed mid-trial leaves that trial RUNNING in the storage and its run with a checkpoint."""
    home, out, _, _ = swept
    monkeypatch.setenv("KEEL_HOME", str(home))
    study = optuna.load_study(study_name="lr", storage=f"sqlite:///{home}/sweeps.sqlite")
    study.enqueue_trial({"optim.lr": 3e-3}, user_attrs={"run_dir": str(out / "lr-003")})
    killed = study.ask({"optim.lr": optuna.distributions.FloatDistribution(1e-6, 1e-2, log=True)})
    killed.set_user_attr("run_dir", str(out / "lr-003"))
    # Its run, trained as the trial's config says until the kill stopped it at step 20 (20 x 4 x 64 tokens).
    partial = run(out / "lr-003", *base_sets(tiny_data), "train.max_tokens=5120")
    assert (partial.status, partial.steps) == ("token_limit", 20)

    # --pruner none: whether the retry would be pruned is not what this test is about (nor part of the study).
    assert main([*cli_args(tiny_data, out), "--n-trials", "4", "--pruner", "none"]) == 0
    stdout = capsys.readouterr().out
    assert "trial 3 was left running by a sweep that ended without finishing it: marked failed" in stdout
    assert f"resumes {out / 'lr-003'} from its newest checkpoint" in stdout
    assert "trial 4 (retry of trial 3) [4/4] optim.lr=0.003: val loss" in stdout
    assert "4 trials ended" in stdout

    study = optuna.load_study(study_name="lr", storage=f"sqlite:///{home}/sweeps.sqlite")
    assert [t.state for t in study.trials][3:] == [TrialState.FAIL, TrialState.COMPLETE]
    retry = study.trials[4]
    assert retry.user_attrs["retry_of"] == 3 and retry.params == {"optim.lr": 3e-3}
    starts = [e["message"] for e in read_logbook(out / "lr-003" / "logbook.jsonl") if e["name"] == "run_start"]
    assert len(starts) == 2 and starts[1].startswith("trainer resumed at step 20")
    with Registry() as registry:
        assert registry.get_run("lr-003")["step"] == 40
        assert retry.value == registry.metrics("lr-003", "val_loss")["val_loss"][-1][1]


def test_continuing_with_other_settings_is_refused(swept, tiny_data, monkeypatch):
    home, out, _, _ = swept
    monkeypatch.setenv("KEEL_HOME", str(home))
    spec = build_spec(None, base_sets(tiny_data), ["optim.lr=log:1e-5:1e-2"], name="lr", out=str(out))
    with pytest.raises(UserError, match=r"sweep lr .* was started with other settings \(space.optim.lr: "):
        run_sweep(spec, n_trials=10)


@pytest.mark.parametrize(
    "param, words",
    [
        ("optim.lrr=log:1e-4:1e-2", ["names no config key optim.lrr", "did you mean optim.lr?"]),
        ("optim=log:1e-4:1e-2", ["names no config key optim"]),
        ("optim.lr=log:1e-4", ["is not KEY=log:LOW:HIGH", "--param optim.lr=log:1e-4:1e-2"]),
        ("optim.lr=logg:1e-4:1e-2", ["is not KEY=log:LOW:HIGH"]),
        ("optim.lr", ["is not KEY=log:LOW:HIGH"]),
        ("optim.lr=log:1e-2:1e-4", ["LOW must be below HIGH"]),
        ("optim.lr=log:0:1e-2", ["a log range needs LOW > 0"]),
        ("optim.lr=float:0:1e-2", ["includes 0.0, which the config refuses", "optim.lr must be positive"]),
        ("model.n_layer=float:2:6", ["model.n_layer is a whole number", "int:LOW:HIGH"]),
        ("model.n_layer=int:2:x", ["LOW and HIGH must be whole numbers"]),
        ("optim.schedule=int:1:3", ["optim.schedule is not a number", "choice:A,B"]),
        ("optim.schedule=choice:cosine", ["offers one value"]),
        ("optim.schedule=choice:cosine,wsd,cosine", ["lists a value twice"]),
        ("optim.schedule=choice:cosine,linear", ["includes 'linear'", "must be cosine, wsd or constant"]),
        ("name=choice:a,b", ["each trial names its own run"]),
    ],
)
def test_a_bad_search_space_is_one_sentence(tiny_data, param, words):
    with pytest.raises(UserError) as caught:
        build_spec(None, [f"data.path={tiny_data}"], [param])
    message = str(caught.value)
    assert message.startswith(f"--param {param}") and message.count(". ") == 0, message
    for word in words:
        assert word in message, (word, message)


def test_bad_counts_and_no_space_are_refused(tiny_data, tmp_path):
    spec = build_spec(None, [f"data.path={tiny_data}"], PARAMS, name="x", out=str(tmp_path / "x"))
    for n_trials, startup, words in ((0, 5, "--n-trials must be at least 1"), (3, -1, "--startup-trials")):
        with pytest.raises(UserError, match=words):
            run_sweep(spec, n_trials=n_trials, startup_trials=startup)
    with pytest.raises(UserError, match="give the search space"):
        build_spec(None, [f"data.path={tiny_data}"], [])
    with pytest.raises(UserError, match="--param optim.lr is given twice"):
        build_spec(None, [f"data.path={tiny_data}"], [*PARAMS, "optim.lr=float:1e-3:2e-3"])
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_the_cli_refuses_a_bad_sweep_with_exit_2_and_writes_nothing(tiny_data, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", "--set", f"data.path={tiny_data}", "--param", "optim.lrr=log:1e-4:1e-2", "--out", str(out)])
    assert code == 2 and not out.exists()
    assert capsys.readouterr().err.strip() == (
        "error: --param optim.lrr=log:1e-4:1e-2 names no config key optim.lrr; did you mean optim.lr?"
    )
    result = keel("sweep", "--set", f"data.path={tmp_path / 'nowhere'}", "--param", PARAMS[0], "--out", str(out))
    assert_user_error(result, "nowhere")
    assert not out.exists()


def test_a_space_file_and_param_flags_make_one_space(tiny_data, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: log:1e-4:1e-2\nmodel.n_layer: int:1:3\noptim.schedule: choice:cosine,wsd\n")
    spec = build_spec(None, [f"data.path={tiny_data}"], ["model.n_layer=int:2:4"], space_file=str(space))
    ranges = {p.key: (p.kind, p.low, p.high, p.choices) for p in spec.space}
    assert ranges == {
        "optim.lr": ("log", 1e-4, 1e-2, ()),
        "model.n_layer": ("int", 2, 4, ()),  # --param overrides the file
        "optim.schedule": ("choice", 0.0, 0.0, ("cosine", "wsd")),
    }
    assert spec.name == "sweep" and str(spec.out) == "runs/sweep"


def _stop_entries(run_dir):
    return read_logbook(run_dir / "logbook.jsonl")


def test_a_run_the_supervisor_stops_or_that_diverges_is_pruned_with_its_reason(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("KEEL_FAULTS", "nan@3")
    short = [f"data.path={tiny_data}", *MODEL, "train.max_steps=8", "train.eval_every=4"]
    stopped = run(tmp_path / "stopped", *short, "supervisor.repair_after_skips=1", "supervisor.max_repairs=0")
    assert stopped.status == "stopped_by_supervisor"
    end = judge_trial(_stop_entries(tmp_path / "stopped"), 3, pruned=None)
    assert end.state == "pruned" and end.reason.startswith("the supervisor stopped the run at step 3: ")
    assert "budget" in end.reason

    diverged = run(tmp_path / "diverged", *short, "supervisor.enabled=false")
    assert math.isnan(diverged.val_loss)
    end = judge_trial(_stop_entries(tmp_path / "diverged"), 0, pruned=None)
    assert (end.state, end.reason) == ("pruned", "diverged: the final val loss is nan")

    fine = run(tmp_path / "fine", f"data.path={tiny_data}", *MODEL, "train.max_steps=4", "train.eval_every=4")
    monkeypatch.delenv("KEEL_FAULTS")
    end = judge_trial(_stop_entries(tmp_path / "fine"), 0, pruned=None)
    assert (end.state, end.value) == ("complete", fine.val_loss)
    # A stop request that came after the run finished does not undo the finished run; before, it is the reason.
    assert judge_trial(_stop_entries(tmp_path / "fine"), 0, pruned="pruned at step 4: x").state == "complete"
    assert judge_trial(_stop_entries(tmp_path / "stopped"), 3, pruned="pruned at step 2: x").reason == (
        "pruned at step 2: x"
    )
