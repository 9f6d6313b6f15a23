"""keel scale: a tiny ladder's plumbing (runs, registry, resume), the fits on synthetic losses, bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_user_error, keel

from keel.errors import UserError
from keel.research import scale as scale_lib
from keel.research.scale import (
    LossLaw,
    fit_loss_law,
    fit_power_law,
    fit_runs,
    isoflop_optima,
    optimal_allocation,
    predict_loss,
)

# The tests' TINY model family: context 64, batch 4, float32; depth d is d layers of width 32d.
BASE = [
    "model.context_length=64",
    "train.batch_size=4",
    "train.eval_every=50",
    "train.eval_batches=2",
    "train.checkpoint_every=50",
    "train.log_every=5",
    "train.dtype=float32",
    "train.compile=false",
    "optim.lr=3e-3",
]
DEPTHS, BUDGETS, ASPECT = [1, 2, 3], [2e9, 4e9], 32


def train_here(config, run_dir: Path) -> int:
    """keel.train.launch's job without its two subprocesses (torch loads once): the same run directory,
    supervisor, checkpoints and registry rows."""
    from keel.runs.registry import Registry
    from keel.runs.rundir import init_run_dir
    from keel.train.loop import train

    config = init_run_dir(config, run_dir)
    with Registry() as registry:
        result = train(config, run_dir, registry, progress=False)
    return 0 if result.status == "finished" else 3


class Recorder:
    """A trainer that records which runs it was asked to train."""

    def __init__(self) -> None:
        self.trained: list[str] = []

    def __call__(self, config, run_dir: Path) -> int:
        self.trained.append(run_dir.name)
        return train_here(config, run_dir)


def build(ladder_dir: Path, data: Path, train=train_here, **kwargs) -> int:
    options = dict(depths=DEPTHS, budgets=BUDGETS, aspect=ASPECT, overrides=[f"data.path={data}", *BASE])
    return scale_lib.scale(ladder_dir, **{**options, **kwargs}, num_resamples=10, train=train, say=lambda line: None)


@pytest.fixture(scope="module")
def ladder(tiny_data, tmp_path_factory):
    """A 3-size x 2-budget ladder trained once, with its own registry."""
    root = tmp_path_factory.mktemp("ladder")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KEEL_HOME", str(root / "home"))
        assert build(root / "lad", tiny_data) == 0
    return root / "lad"


def test_ladder_runs_are_ordinary_runs_sized_by_their_budget(ladder, tiny_data):
    from keel.models.gpt import GPT
    from keel.runs.registry import Registry
    from keel.runs.rundir import load_run_config

    record = json.loads((ladder / "ladder.json").read_text())
    assert sorted(record["rungs"]) == sorted(f"d{d}-{b}" for d in DEPTHS for b in ("2e9", "4e9"))
    with Registry(ladder.parent / "home" / "registry.sqlite") as registry:
        runs = {run["name"]: run for run in registry.runs()}
    tokens_per_step = 4 * 64
    for name, rung in record["rungs"].items():
        assert rung["status"] == "finished" and rung["val_loss"] > 0
        assert runs[f"lad-{name}"]["status"] == "finished"  # `keel runs` lists it
        config = load_run_config(ladder / "runs" / name)
        d = rung["depth"]
        assert (config.model.n_layer, config.model.d_model, config.model.n_head) == (d, ASPECT * d, d)
        # The steps are those the budget buys, and the lr schedule ends with them.
        assert config.train.max_steps == rung["steps"] == runs[f"lad-{name}"]["step"]
        per_step = tokens_per_step * GPT(config.model).flops_per_token()
        assert rung["steps"] * per_step <= rung["budget"] < (rung["steps"] + 1) * per_step
        assert (ladder / "runs" / name / "logbook.jsonl").is_file()
    assert (ladder / "ladder.png").stat().st_size > 10_000
    fit = record["fits"]["non_embedding"]
    assert set(fit["law"]) == {"E", "A", "alpha", "B", "beta"} and len(fit["optimal"]) == len(BUDGETS)


def test_a_ladder_resumes_where_it_stopped(ladder, tiny_data, tmp_path, monkeypatch):
    from keel.supervisor.logbook import read_logbook

    copy = tmp_path / "lad"
    shutil.copytree(ladder, copy)
    again = Recorder()
    assert build(copy, tiny_data, train=again) == 0
    assert again.trained == []  # every run had finished: nothing trains again

    # A run that stopped before its last step (its final checkpoint gone) is resumed, and only it.
    run_dir = copy / "runs" / "d1-4e9"
    steps = json.loads((copy / "ladder.json").read_text())["rungs"]["d1-4e9"]["steps"]
    shutil.rmtree(run_dir / "checkpoints" / f"step_{steps:08d}")
    resumed = Recorder()
    assert scale_lib.scale(copy, num_resamples=10, train=resumed, say=lambda line: None) == 0  # the record suffices
    assert resumed.trained == ["d1-4e9"]
    starts = [e["message"] for e in read_logbook(run_dir / "logbook.jsonl") if e["name"] == "run_start"]
    assert f"resumed at step {steps // 50 * 50}" in starts[-1]
    assert json.loads((copy / "ladder.json").read_text())["rungs"]["d1-4e9"]["status"] == "finished"


def test_keel_scale_predicts_then_trains_and_records_the_check(ladder, tmp_path):
    """The real command end to end: the ladder is finished, the prediction run goes through keel train's launch."""
    copy = tmp_path / "lad"
    shutil.copytree(ladder, copy)
    result = keel("scale", str(copy), "--predict", "1.6e10", "--bootstrap", "10")
    assert result.returncode == 0, result.stderr
    assert "trained 0 runs now" in result.stdout
    assert "approach 3" in result.stdout and "approach 2" in result.stdout and "counting:" in result.stdout
    record = json.loads((copy / "ladder.json").read_text())
    (prediction,) = record["predictions"]
    assert prediction["budget"] == 1.6e10 and prediction["ratio"] == pytest.approx(4.0)
    predicted = prediction["predicted"]["non_embedding"]["loss"]
    measured = prediction["measured"]
    assert measured is not None and prediction["relative_error"]["non_embedding"] == pytest.approx(
        predicted / measured - 1
    )
    assert prediction["made_at"] < (copy / "runs" / prediction["run"] / "config.yaml").stat().st_mtime
    assert f"measured val loss {measured:.4f}" in result.stdout


# ---- the fits on losses from a known law ---------------------------------------------------------------------------

# Hoffmann et al.'s published fit, in nats.
TRUE = LossLaw(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)
SYNTHETIC_BUDGETS = [1e17, 3e17, 1e18, 3e18]


def synthetic_runs(noise: float, seed: int = 0):
    """Iso-FLOP runs at C = 6 N D, sizes spread symmetrically (in log N) around each budget's true optimum."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in SYNTHETIC_BUDGETS:
        n_opt = optimal_allocation(TRUE, c, [1e3, 1e13], [6e3, 6e13])[0]
        for factor in np.geomspace(1 / 8, 8, 7):
            n = n_opt * factor
            d = c / (6 * n)
            rows.append((c, n, d, TRUE.loss(n, d) * (1 + noise * rng.standard_normal())))
    return [np.array(column) for column in zip(*rows)]


def test_optimal_allocation_is_the_analytic_optimum():
    # With C = 6 N D, L is minimal at N = G (C / 6)^(beta / (alpha + beta)),
    # G = (alpha A / (beta B))^(1 / (alpha + beta)) (Hoffmann et al., appendix D.2).
    g = (TRUE.alpha * TRUE.A / (TRUE.beta * TRUE.B)) ** (1 / (TRUE.alpha + TRUE.beta))
    for c in SYNTHETIC_BUDGETS:
        n, d, loss = optimal_allocation(TRUE, c, [1e3, 1e13], [6e3, 6e13])
        assert n == pytest.approx(g * (c / 6) ** (TRUE.beta / (TRUE.alpha + TRUE.beta)), rel=0.01)
        assert n * d * 6 == pytest.approx(c, rel=1e-9) and loss == pytest.approx(TRUE.loss(n, d))


def test_approach_3_recovers_the_law_and_extrapolates():
    budget, n, d, loss = synthetic_runs(noise=0.002)
    law = fit_loss_law(n, d, loss)
    assert law.alpha == pytest.approx(TRUE.alpha, abs=0.02) and law.beta == pytest.approx(TRUE.beta, abs=0.02)
    assert law.E == pytest.approx(TRUE.E, rel=0.03)
    # 10x beyond the largest budget, at its true optimum, the fitted law is within 0.5% of the true loss ...
    c = 10 * SYNTHETIC_BUDGETS[-1]
    n_opt, d_opt, true_loss = optimal_allocation(TRUE, c, [1e3, 1e13], [6e3, 6e13])
    assert law.loss(n_opt, d_opt) == pytest.approx(true_loss, rel=0.005)
    # ... and the bootstrap interval of the prediction holds the true loss.
    fit = fit_runs(budget, n, d, loss, "non_embedding", num_resamples=40)
    predicted, (low, high) = predict_loss(fit, n_opt, d_opt)
    assert low < true_loss < high and low < predicted < high


def test_approach_3_is_not_fooled_by_a_wrong_law():
    # Losses with no data term at all: the fit must find B ~ 0 rather than invent a data exponent.
    budget, n, d, _ = synthetic_runs(noise=0.0)
    loss = 2.0 + 50.0 * n**-0.3
    law = fit_loss_law(n, d, loss)
    assert law.B * d.min() ** -law.beta < 1e-3 and law.alpha == pytest.approx(0.3, abs=0.01)


def test_approach_2_recovers_the_optimum_and_its_exponent():
    budget, n, d, loss = synthetic_runs(noise=0.0)
    optima = isoflop_optima(budget, n, loss)
    assert [o.budget for o in optima] == SYNTHETIC_BUDGETS and all(o.inside for o in optima)
    for o in optima:
        n_true = optimal_allocation(TRUE, o.budget, [1e3, 1e13], [6e3, 6e13])[0]
        assert o.n == pytest.approx(n_true, rel=0.1)  # a parabola in log N is only near the true curve
    a, _ = fit_power_law(optima)
    assert a == pytest.approx(TRUE.beta / (TRUE.alpha + TRUE.beta), abs=0.02)


def test_approach_2_refuses_a_budget_without_a_minimum():
    # Loss falling ever faster with N: the parabola opens downwards and has no minimum.
    budget, n, d, _ = synthetic_runs(noise=0.0)
    (o, *_) = isoflop_optima(budget, n, 5.0 - 0.01 * np.log(n) ** 2)
    assert not np.isfinite(o.n) and not o.inside


# ---- bad input: one sentence, nothing written ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, words",
    [
        (dict(depths=[2]), ["three model sizes", "--depths 2"]),
        (dict(budgets=[4e9]), ["two budgets"]),
        (dict(budgets=[1e6, 4e9]), ["budget 1e6", "no training step", "depth 1"]),
        (dict(budgets=[2e9, 1e13]), ["must not repeat data", "site-packages", "d1-1e13"]),
        (dict(overrides=["model.n_layer=4"]), ["model.n_layer", "--depths"]),
        (dict(aspect=33), ["--aspect"]),
    ],
)
def test_bad_ladders_are_refused_before_anything_is_written(tiny_data, tmp_path, options, words):
    options.setdefault("overrides", [])
    options["overrides"] = [f"data.path={tiny_data}", *BASE, *options["overrides"]]
    with pytest.raises(UserError) as err:
        build(tmp_path / "lad", tiny_data, train=Recorder(), **options)
    for word in words:
        assert word in str(err.value)
    assert not (tmp_path / "lad").exists()


def test_a_knob_in_the_config_file_is_refused_even_at_its_default(tiny_data, tmp_path):
    config = tmp_path / "base.yaml"
    config.write_text("model:\n  d_model: 192\n")  # the default width: still the ladder's knob, not the user's
    with pytest.raises(UserError, match="model.d_model"):
        build(tmp_path / "lad", tiny_data, train=Recorder(), config_path=str(config))
    assert not (tmp_path / "lad").exists()


def test_a_prediction_must_extrapolate(ladder, tmp_path):
    copy = tmp_path / "lad"
    shutil.copytree(ladder, copy)
    before = (copy / "ladder.json").read_text()
    with pytest.raises(UserError, match="at least 4x its largest budget"):
        scale_lib.scale(copy, predict=1.2e10, train=Recorder(), say=lambda line: None)
    assert (copy / "ladder.json").read_text() == before


def test_a_ladder_keeps_its_settings(ladder, tiny_data, tmp_path):
    copy = tmp_path / "lad"
    shutil.copytree(ladder, copy)
    with pytest.raises(UserError, match="optim.lr=0.003"):
        build(copy, tiny_data, train=Recorder(), overrides=[f"data.path={tiny_data}", *BASE, "optim.lr=1e-3"])


def test_keel_scale_on_an_unknown_ladder_is_one_sentence_and_exit_2(tmp_path):
    result = keel("scale", str(tmp_path / "nowhere"), "--predict", "1e12")
    assert_user_error(result, "no ladder", "--depths")
    assert not (tmp_path / "nowhere").exists()
