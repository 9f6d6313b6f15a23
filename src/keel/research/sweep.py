"""`keel sweep`: a hyperparameter search with Optuna whose trials are ordinary keel runs.

The study lives in `$KEEL_HOME/sweeps.sqlite` (Optuna's RDB storage, so `optuna.load_study`,
`study.enqueue_trial` and optuna-dashboard work on it as they are). Trial N of sweep NAME is the run
NAME-NNN in OUT/NAME-NNN, launched as `keel train` launches a run: its run directory, logbook, registry
row, supervisor and watchdog. The objective is the run's final val loss, minimised; TPE proposes the
parameters by default.

The search space is one `KEY=KIND:...` per parameter, against a base config (a file and --set overrides):

    log:LOW:HIGH     a float, log-uniform (learning rates)
    float:LOW:HIGH   a float, uniform
    int:LOW:HIGH     a whole number, uniform, both ends included
    choice:A,B,...   one of the values (numbers, true/false or words)

Pruning, without Optuna in the loop. While a trial trains, a thread of the sweep reads the run's val_loss
from the registry as each evaluation lands there (with the checkpoint that follows it) and reports it to
Optuna at its step. When the pruner says stop (MedianPruner: the trial's best val loss so far is above
the median of the finished trials at that step), the sweep writes why into the run's logbook and sends
the trainer SIGTERM, which finishes its step, checkpoints and exits: the run is stopped, not lost.

Outcomes, with the reason in the trial's user attr `reason` and printed as each trial ends:
- COMPLETE: the run finished; its value is the val loss of its last evaluation;
- PRUNED: the pruner stopped it, the supervisor stopped the run (its diagnosis), or the final val loss is
  not finite (diverged);
- FAIL: the trial's config cannot train (the sentence that refused it), or the watchdog gave up.

Resuming. Running the same command again continues the study until --n-trials trials have ended. A trial
left RUNNING by a sweep that died (SIGKILL, a power cut), or stopped by Ctrl-C, is marked FAIL and retried:
a new trial with the same parameters (user attr `retry_of`) that resumes the same run directory from its
newest checkpoint; it does not count towards --n-trials. One sweep process per study at a time
(OUT/sweep.lock).
"""

from __future__ import annotations

import base64
import fcntl
import html
import io
import json
import math
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from keel import config as config_lib
from keel.config import RunConfig
from keel.errors import UserError
from keel.runs.registry import Registry, registry_path
from keel.runs.rundir import LOGBOOK_FILE, open_task_data
from keel.supervisor.logbook import Logbook, read_logbook
from keel.supervisor.watchdog import EXIT_USER_ERROR, HEARTBEAT_FILE

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

STORAGE_FILE = "sweeps.sqlite"  # in $KEEL_HOME, beside the registry
LOCK_FILE = "sweep.lock"  # in OUT
PAGE_FILE = "sweep.html"  # in OUT
SPEC_ATTR = "keel_sweep"  # study user attr: what the sweep was started with, to continue it only with the same
KINDS = ("log", "float", "int", "choice")
SYNTAX = "KEY=log:LOW:HIGH, float:LOW:HIGH, int:LOW:HIGH or choice:A,B,..."
# The registry gets an evaluation with the checkpoint that follows it; a poll every quarter second stops a
# pruned trial a few steps later on a small model, and costs one small SQLite read.
POLL_S = 0.25
TABLE_ROWS = 15  # trials in the printed table; the page has them all


# ---------------------------------------------------------------------------------------------
# the search space


@dataclass(frozen=True)
class Param:
    """One swept config key: `text` as the user wrote it (log:1e-4:1e-2), parsed into kind and range."""

    key: str
    text: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple = ()

    def distribution(self) -> BaseDistribution:
        if self.kind == "choice":
            return CategoricalDistribution(self.choices)
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high))
        return FloatDistribution(self.low, self.high, log=self.kind == "log")

    def extremes(self) -> list:
        """The values that bound what the sweep may try: the ends of a range, every choice."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]


def parse_param(text: str, base: RunConfig) -> Param:
    """`optim.lr=log:1e-4:1e-2` -> Param, checked against the config: the key exists, the kind fits its type,
    and the config accepts the ends of the range (every choice)."""
    key, sep, spec = text.partition("=")
    key, spec = key.strip(), spec.strip()
    if not sep or not key or not spec:
        raise UserError(f"--param {text} is not {SYNTAX}; write it like --param optim.lr=log:1e-4:1e-2.")
    nearest = config_lib.nearest_key(key)
    if nearest != key:
        hint = f"did you mean {nearest}?" if nearest else "run `keel config` to list the valid keys."
        raise UserError(f"--param {text} names no config key {key}; {hint}")
    if key == "name":
        raise UserError(f"--param {text}: each trial names its own run (NAME-NNN); sweep another key.")
    param = _parse_range(key, spec, text)
    default = _value_at(config_lib.from_dict({}), key)
    number = isinstance(default, (int, float)) and not isinstance(default, bool)
    if param.kind != "choice" and not number:
        raise UserError(f"--param {text}: {key} is not a number; sweep it with a list of choices, choice:A,B,C.")
    if isinstance(default, int) and param.kind in ("log", "float"):
        raise UserError(
            f"--param {text}: {key} is a whole number; sweep it with int:LOW:HIGH or a list of choices, choice:A,B,C."
        )
    for value in param.extremes():
        try:
            config_lib.apply_overrides(base, [f"{key}={_yaml_text(value)}"])
        except UserError as err:
            raise UserError(
                f"--param {text} includes {value!r}, which the config refuses ({str(err).rstrip('.')}); "
                "narrow the range."
            ) from None
    return param


def _parse_range(key: str, spec: str, text: str) -> Param:
    kind, _, rest = spec.partition(":")
    bad = UserError(f"--param {text} is not {SYNTAX}; write it like --param optim.lr=log:1e-4:1e-2.")
    if kind not in KINDS:
        raise bad
    if kind == "choice":
        values = [_scalar(part) for part in rest.split(",")]
        if any(v == "" for v in values):
            raise bad
        if len(values) < 2:
            raise UserError(f"--param {text} offers one value; give two or more, or fix the key with --set.")
        if len(set(map(repr, values))) < len(values):
            raise UserError(f"--param {text} lists a value twice; give each choice once.")
        return Param(key, spec, kind, choices=tuple(values))
    ends = rest.split(":")
    if len(ends) != 2:
        raise bad
    try:
        low, high = (int(end) for end in ends) if kind == "int" else (float(end) for end in ends)
    except ValueError:
        whole = " whole" if kind == "int" else ""
        raise UserError(f"--param {text}: LOW and HIGH must be{whole} numbers, as in {key}={kind}:1:4.") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise UserError(f"--param {text}: LOW must be below HIGH (both finite).")
    if kind == "log" and low <= 0:
        raise UserError(f"--param {text}: a log range needs LOW > 0; use float:LOW:HIGH to include {low:g}.")
    return Param(key, spec, kind, low=low, high=high)


def _scalar(text: str) -> Any:
    """A choice as the value it names: 3 and 1e-3 are numbers, true/false booleans, anything else a word."""
    text = text.strip()
    for parse in (int, float):
        try:
            value = parse(text)
        except ValueError:
            continue
        if math.isfinite(value):
            return value
    return {"true": True, "false": False}.get(text.lower(), text)


def _yaml_text(value: Any) -> str:
    """A value as --set would take it back: 1e-06 stays a float, true a boolean."""
    return json.dumps(value) if isinstance(value, bool) else str(value)


def _value_at(config: RunConfig, key: str) -> Any:
    node: Any = config.to_dict()
    for part in key.split("."):
        node = node[part]
    return node


def load_space(path: Path) -> list[str]:
    """A YAML file of `KEY: KIND:...` lines as --param texts."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--space {path} does not exist; pass a YAML file of `key: log:LOW:HIGH` lines.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise UserError(f"--space {path} is not valid YAML; write one `key: log:LOW:HIGH` line per parameter.")
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise UserError(
            f"--space {path} must map each config key to a range written as text, e.g. `optim.lr: log:1e-4:1e-2`."
        )
    return [f"{key}={value}" for key, value in raw.items()]


# ---------------------------------------------------------------------------------------------
# the sweep


@dataclass
class SweepSpec:
    """What a sweep is: the study's name, where its runs go, the base config and the space over it."""

    name: str
    out: Path
    base: RunConfig
    space: list[Param]

    def identity(self) -> dict[str, Any]:
        """What must not change when the sweep is continued (stored with the study)."""
        return {
            "base": self.base.to_dict(),
            "space": {p.key: p.text for p in self.space},
            "out": str(self.out.resolve()),
        }


def build_spec(
    config_path: str | None,
    sets: list[str],
    params: list[str],
    space_file: str | None = None,
    name: str | None = None,
    out: str | None = None,
) -> SweepSpec:
    """The sweep the command line describes, checked: the base config loads, its data opens, the space is sound."""
    base = config_lib.load(config_path, sets)
    open_task_data(base)  # every trial trains on it: a missing or wrong data directory is one sentence now
    texts = (load_space(Path(space_file)) if space_file else []) + list(params)
    if not texts:
        raise UserError("give the search space: --param KEY=log:LOW:HIGH (and more), or --space FILE.yaml.")
    space: dict[str, Param] = {}
    given: set[str] = set()
    for number, text in enumerate(texts):
        param = parse_param(text, base)
        from_cli = number >= len(texts) - len(params)
        if from_cli and param.key in given:
            raise UserError(f"--param {param.key} is given twice; keep one range per key.")
        given |= {param.key} if from_cli else set()
        space[param.key] = param  # --param overrides the same key in --space
    name = name or (Path(config_path).stem if config_path else "sweep")
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise UserError(f"--name {name!r} must be letters, digits, '-', '_' or '.'; it names the study and its runs.")
    return SweepSpec(name, Path(out) if out else Path("runs") / name, base, list(space.values()))


@dataclass
class TrialEnd:
    """How a trial ended, judged from its run's logbook."""

    state: str  # complete | pruned | failed | interrupted
    value: float | None = None
    reason: str = ""
    signal: int | None = None  # interrupted: the signal the user sent


@dataclass
class SweepResult:
    study: optuna.Study
    page: Path
    table: str
    counts: dict[str, int] = field(default_factory=dict)


def run_sweep(
    spec: SweepSpec,
    n_trials: int,
    sampler: str = "tpe",
    seed: int = 0,
    pruner: str = "median",
    startup_trials: int = 5,
    say: Callable[[str], None] = lambda line: print(line, flush=True),
) -> SweepResult:
    """Run (or continue) the sweep until n_trials trials have ended; write OUT/sweep.html."""
    from keel.train.launch import launch

    if n_trials < 1:
        raise UserError(f"--n-trials must be at least 1, got {n_trials}.")
    if startup_trials < 0:
        raise UserError(f"--startup-trials must be >= 0, got {startup_trials}.")
    if sampler not in ("tpe", "random") or pruner not in ("median", "none"):
        raise UserError("--sampler must be tpe or random, --pruner median or none.")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # keel says what happened, once per trial
    storage = optuna.storages.RDBStorage(f"sqlite:///{_storage_path()}")
    study = _existing_study(spec, storage)
    if study is None:
        _check_new(spec)
    lock = _claim(spec)
    try:
        history = 0 if study is None else len(study.trials)
        # The seed moves on with the study, so a continued sweep does not propose its first points again.
        chosen_sampler = (
            optuna.samplers.TPESampler(seed=seed + history)
            if sampler == "tpe"
            else optuna.samplers.RandomSampler(seed=seed + history)
        )
        chosen_pruner = (
            optuna.pruners.MedianPruner(n_startup_trials=startup_trials)
            if pruner == "median"
            else optuna.pruners.NopPruner()
        )
        study = optuna.create_study(
            storage=storage,
            study_name=spec.name,
            sampler=chosen_sampler,
            pruner=chosen_pruner,
            direction="minimize",
            load_if_exists=True,
        )
        if SPEC_ATTR not in study.user_attrs:
            study.set_user_attr(SPEC_ATTR, spec.identity())
        for line in retry_abandoned(study):
            say(line)
        distributions = {p.key: p.distribution() for p in spec.space}
        while (ended := len(ended_trials(study))) < n_trials:
            trial = study.ask(distributions)
            end = _run_trial(spec, study, trial, launch, pruner == "median")
            say(_trial_line(study.trials[trial.number], end, ended + 1, n_trials))
            if end.state == "interrupted":
                signal.raise_signal(end.signal or signal.SIGINT)  # stop the sweep as the signal would have
                raise KeyboardInterrupt  # a handler that let the signal pass: stop anyway
        page = write_page(spec, study)
        trials = ended_trials(study)
        counts = {state: sum(t.state.name.lower() == state for t in trials) for state in ("complete", "pruned", "fail")}
        return SweepResult(study, page, format_table(spec, study), counts)
    finally:
        os.close(lock)


def _storage_path() -> Path:
    path = registry_path().parent / STORAGE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _existing_study(spec: SweepSpec, storage: optuna.storages.BaseStorage) -> optuna.Study | None:
    """The study of this name, if one exists; refused when it was started with other settings."""
    try:
        study = optuna.load_study(study_name=spec.name, storage=storage)
    except KeyError:
        return None
    stored = study.user_attrs.get(SPEC_ATTR)
    if stored is not None and stored != json.loads(json.dumps(spec.identity())):
        changed = _changed_keys(stored, spec.identity())
        raise UserError(
            f"sweep {spec.name} in {_storage_path()} was started with other settings "
            f"({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}); continue it with the arguments "
            "it started with, or start another with --name."
        )
    return study


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [k for key in keys for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    new = json.loads(json.dumps(new))
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _check_new(spec: SweepSpec) -> None:
    """A new study starts in a new or empty OUT, with run names nobody has taken."""
    out = spec.out
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory for the sweep's runs.")
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):  # a lock alone: a start that failed
        raise UserError(
            f"--out {out} is not empty, and sweep {spec.name} is new; pass a new or empty directory "
            "(or the --name of the sweep that wrote it, to continue that one)."
        )
    with Registry() as registry:
        taken = registry.get_run(f"{spec.name}-000")
    if taken is not None:
        raise UserError(
            f"the registry already has a run {spec.name}-000 (from {taken['run_dir']}), from an earlier sweep "
            f"named {spec.name}; choose another --name."
        )


def _claim(spec: SweepSpec) -> int:
    """Hold OUT/sweep.lock while the sweep runs: a second sweep on the same study is refused."""
    spec.out.mkdir(parents=True, exist_ok=True)
    fd = os.open(spec.out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(
            f"sweep {spec.name} is running in another process (PID {owner}); wait for it, or stop it first."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def ended_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Trials that count towards --n-trials: ended, and not retried (a retried trial's retry counts instead)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    return [t for t in trials if t.state.is_finished() and t.number not in retried]


def retry_abandoned(study: optuna.Study) -> list[str]:
    """Mark FAIL every trial still RUNNING (its sweep died: this process holds the study's lock) and queue a
    retry of each, which resumes its run directory. Returns a line per trial for the user."""
    lines = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        run_dir = trial.user_attrs.get("run_dir")
        attrs = {"retry_of": trial.number, **({"run_dir": run_dir} if run_dir else {})}
        study.enqueue_trial(trial.params, user_attrs=attrs)
        study.tell(trial.number, state=TrialState.FAIL)
        where = f"resumes {run_dir} from its newest checkpoint" if run_dir else "starts its run afresh"
        lines.append(
            f"trial {trial.number} was left running by a sweep that ended without finishing it: marked failed, "
            f"and retried with the same parameters (the retry {where})."
        )
    return lines


def _run_trial(spec: SweepSpec, study: optuna.Study, trial: optuna.Trial, launch, prune: bool) -> TrialEnd:
    retry_dir = trial.user_attrs.get("run_dir")
    run_dir = Path(retry_dir) if retry_dir else spec.out / f"{spec.name}-{trial.number:03d}"
    trial.set_user_attr("run_dir", str(run_dir))
    overrides = [f"{key}={_yaml_text(value)}" for key, value in trial.params.items()] + [f"name={run_dir.name}"]
    try:
        config = config_lib.apply_overrides(spec.base, overrides)
    except UserError as err:  # a combination the config refuses (model.n_head not dividing d_model, ...)
        return _tell(study, trial, TrialEnd("failed", reason=str(err)))
    logbook = run_dir / LOGBOOK_FILE
    entries_before = len(read_logbook(logbook))
    watcher = _Watcher(study, trial, run_dir, prune, config.train.max_steps)
    watcher.start()
    try:
        code = launch(config, run_dir)
    except UserError as err:  # refused before anything was written (launch checks first)
        return _tell(study, trial, TrialEnd("failed", reason=str(err)))
    finally:
        watcher.finish()
    with Registry() as registry:
        watcher.report(registry)  # the last evaluation, logged as the run ended
        last_val = _last_val_loss(registry, run_dir.name)
    end = judge_trial(read_logbook(logbook)[entries_before:], code, watcher.pruned, last_val)
    return _tell(study, trial, end)


def _last_val_loss(registry: Registry, name: str) -> float | None:
    try:
        points = registry.metrics(name, "val_loss").get("val_loss", [])
    except UserError:
        return None
    return points[-1][1] if points else None


def judge_trial(entries: list[dict], code: int, pruned: str | None, last_val_loss: float | None = None) -> TrialEnd:
    """How a trial ended, from the logbook entries its run wrote meanwhile and the launch's exit code.

    pruned: why the sweep pruned it (None if it did not); last_val_loss: the run's last evaluation in the
    registry, for a run whose end record carries none (it resumed with nothing left to train).
    """
    ends = [e for e in entries if (e["kind"], e["name"]) == ("info", "run_end")]
    finished = code == 0 and ends and ends[-1]["evidence"].get("status") == "finished"
    if pruned and not finished:  # a run that ended before the stop request came is worth its value
        return TrialEnd("pruned", reason=pruned)
    for entry in entries:
        if (entry["kind"], entry["name"]) == ("info", "user_stop"):
            name = str(entry["evidence"].get("signal", "SIGINT"))
            signum = getattr(signal, name, signal.SIGINT)
            return TrialEnd("interrupted", reason=f"interrupted by {name}", signal=signum)
    stops = [e for e in entries if (e["kind"], e["name"]) == ("action", "stop")]
    if stops:
        return TrialEnd(
            "pruned",
            reason=f"the supervisor stopped the run at step {stops[-1]['step']}: "
            f"{stops[-1]['message'].removeprefix('stopped the run: ')}",
        )
    if finished:
        value = ends[-1]["evidence"].get("val_loss")
        value = last_val_loss if value is None else float(value)  # "nan" in the logbook is a string
        if value is None:
            return TrialEnd("failed", reason="the run ended without an evaluation")
        if not math.isfinite(value):
            return TrialEnd("pruned", reason=f"diverged: the final val loss is {value}")
        return TrialEnd("complete", value=value)
    if code == EXIT_USER_ERROR:
        return TrialEnd("failed", reason="the trainer refused the run (its error is above)")
    gave_up = [e for e in entries if (e["kind"], e["name"]) == ("info", "gave_up")]
    if gave_up:
        return TrialEnd("failed", reason=f"the watchdog {gave_up[-1]['message']}")
    return TrialEnd("failed", reason=f"the trainer ended with exit code {code}")


def _tell(study: optuna.Study, trial: optuna.Trial, end: TrialEnd) -> TrialEnd:
    if end.reason:
        trial.set_user_attr("reason", end.reason)
    if end.state == "complete":
        study.tell(trial, end.value)
    elif end.state == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
    else:  # failed, or interrupted: the latter is retried on the next start
        study.tell(trial, state=TrialState.FAIL)
    if end.state == "interrupted":
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, **_run_dir_attr(trial)})
    return end


def _run_dir_attr(trial: optuna.Trial) -> dict[str, str]:
    run_dir = trial.user_attrs.get("run_dir")
    return {"run_dir": run_dir} if run_dir else {}


class _Watcher(threading.Thread):
    """Reports the run's evaluations to Optuna while it trains and stops the trainer when the pruner says so."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, run_dir: Path, prune: bool, max_steps: int):
        super().__init__(daemon=True, name=f"sweep-trial-{trial.number}")
        self.study, self.trial, self.run_dir, self.prune = study, trial, run_dir, prune
        self.last_step = max_steps or math.inf  # the evaluation there ends the run: nothing left to save
        self.started = time.time()
        self.reported: dict[int, float] = {}  # step -> val loss, as Optuna has it
        self.pruned: str | None = None  # why, once decided
        self.signalled = False
        self._done = threading.Event()
        self._lock = threading.Lock()  # report() runs here and, at the end, in the main thread

    def run(self) -> None:
        with Registry() as registry:  # a connection of this thread's own
            while not self._done.wait(POLL_S):
                new = self.report(registry)
                going = new and max(self.reported) < self.last_step
                if self.prune and going and self.pruned is None and self.trial.should_prune():
                    self._decide(registry, max(self.reported))
                if self.pruned is not None and not self.signalled:
                    self._stop_trainer()

    def finish(self) -> None:
        self._done.set()
        self.join()

    def report(self, registry: Registry) -> bool:
        """Send Optuna the evaluations it has not seen yet; whether there were any."""
        try:
            points = registry.metrics(self.run_dir.name, "val_loss").get("val_loss", [])
        except UserError:  # the registry is busy or unusable for now: the next poll tries again
            return False
        with self._lock:
            new = [(step, value) for step, value in points if step not in self.reported and math.isfinite(value)]
            for step, value in new:
                self.trial.report(value, step)
                self.reported[step] = value
        return bool(new)

    def _decide(self, registry: Registry, step: int) -> None:
        value = self.reported[step]
        median = _median_at(self.study, step)
        than = f"the median {median:.4f} of the finished trials there" if median is not None else "the pruner's bar"
        self.pruned = f"pruned at step {step}: val loss {value:.4f} is above {than}"
        name = self.run_dir.name
        Logbook(
            self.run_dir / LOGBOOK_FILE,
            mirror=lambda e: registry.log_event(name, e["step"], e["kind"], e["message"], e),
        ).write(
            step,
            "info",
            "pruned",
            f"sweep trial {self.trial.number} {self.pruned}; the trainer is asked to checkpoint and stop (SIGTERM).",
            {"trial": self.trial.number, "val_loss": value, "median": median},
        )

    def _stop_trainer(self) -> None:
        """SIGTERM to this trial's trainer, once it has a heartbeat of its own (newer than the trial)."""
        try:
            beat = json.loads((self.run_dir / HEARTBEAT_FILE).read_text())
        except (OSError, ValueError):
            return
        if not isinstance(beat, dict) or beat.get("time", 0) < self.started or not beat.get("pid"):
            return  # an earlier process's heartbeat: wait for this one's
        try:
            os.kill(int(beat["pid"]), signal.SIGTERM)
        except ProcessLookupError:
            pass  # it ended meanwhile
        self.signalled = True


def _median_at(study: optuna.Study, step: int) -> float | None:
    values = [
        t.intermediate_values[step]
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if step in t.intermediate_values
    ]
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------------------------------
# what the user sees


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _trial_line(trial: FrozenTrial, end: TrialEnd, ended: int, n_trials: int) -> str:
    params = ", ".join(f"{k}={_format_value(v)}" for k, v in trial.params.items())
    retry = f" (retry of trial {trial.user_attrs['retry_of']})" if "retry_of" in trial.user_attrs else ""
    head = f"trial {trial.number}{retry} [{min(ended, n_trials)}/{n_trials}] {params}:"
    if end.state == "complete":
        return f"{head} val loss {end.value:.4f} ({trial.user_attrs['run_dir']})"
    if end.state == "interrupted":
        return f"{head} {end.reason}; running the same command again retries it from its newest checkpoint"
    return f"{head} {end.state}: {end.reason}"


def _sorted(study: optuna.Study) -> list[FrozenTrial]:
    order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.FAIL: 2}
    return sorted(ended_trials(study), key=lambda t: (order.get(t.state, 3), t.value or 0.0, t.number))


def _last_report(trial: FrozenTrial) -> tuple[int, float] | None:
    if not trial.intermediate_values:
        return None
    step = max(trial.intermediate_values)
    return step, trial.intermediate_values[step]


def _rows(spec: SweepSpec, study: optuna.Study) -> tuple[list[str], list[list[str]]]:
    keys = [p.key for p in spec.space]
    header = ["trial", "state", "val loss", "step", *keys, "run", "note"]
    rows = []
    for t in _sorted(study):
        last = _last_report(t)
        value = f"{t.value:.4f}" if t.value is not None else (f"({last[1]:.4f})" if last else "-")
        note = t.user_attrs.get("reason", "") if t.state != TrialState.COMPLETE else ""
        if "retry_of" in t.user_attrs:
            note = f"retry of {t.user_attrs['retry_of']}" + (f"; {note}" if note else "")
        rows.append(
            [
                str(t.number),
                t.state.name.lower(),
                value,
                str(last[0]) if last else "-",
                *(_format_value(t.params[k]) if k in t.params else "-" for k in keys),
                Path(t.user_attrs.get("run_dir", "-")).name,
                note,
            ]
        )
    return header, rows


def format_table(spec: SweepSpec, study: optuna.Study) -> str:
    """The best trials first (complete by val loss, then pruned, then failed), TABLE_ROWS at most."""
    header, rows = _rows(spec, study)
    shown = rows[:TABLE_ROWS]
    widths = [max(len(r[i]) for r in (header, *shown)) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1] for r in (header, *shown)]
    if len(rows) > len(shown):
        lines.append(f"... and {len(rows) - len(shown)} more trials in the page")
    return "\n".join(line.rstrip() for line in lines)


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _importances(study: optuna.Study, spec: SweepSpec) -> tuple[dict[str, float] | None, str]:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return None, "Parameter importances need two finished trials or more."
    if len({t.value for t in complete}) < 2:
        return None, "Every finished trial reached the same val loss: no parameter explains a difference."
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    importances = optuna.importance.get_param_importances(
        study, evaluator=evaluator, params=[p.key for p in spec.space]
    )
    return importances, (
        f"fANOVA over the {len(complete)} finished trials: the share of the val loss's variance each parameter "
        "explains (pruned and failed trials are left out)."
    )


def _plot_importances(importances: dict[str, float]) -> str:
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(names)), dpi=100)
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (share of the variance of the final val loss)")
    ax.set_xlim(0, 1)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _plot_slices(spec: SweepSpec, study: optuna.Study) -> str:
    """Final val loss against each parameter (finished trials); pruned ones at their last evaluation."""
    fig, axes = plt.subplots(1, len(spec.space), figsize=(4.2 * len(spec.space), 3.4), dpi=100, squeeze=False)
    trials = ended_trials(study)
    for ax, param in zip(axes[0], spec.space):
        for state, style in ((TrialState.COMPLETE, "o"), (TrialState.PRUNED, "x")):
            points = []
            for t in trials:
                if t.state != state or param.key not in t.params:
                    continue
                y = t.value if state == TrialState.COMPLETE else (_last_report(t) or (0, None))[1]
                if y is not None:
                    points.append((t.params[param.key], y))
            if points:
                xs, ys = zip(*points)
                if param.kind == "choice":
                    xs = [str(x) for x in xs]
                label = "finished" if state == TrialState.COMPLETE else "pruned (last evaluation)"
                ax.plot(xs, ys, style, ms=7, label=label, color="tab:blue" if style == "o" else "tab:gray")
        if param.kind == "log":
            ax.set_xscale("log")
        ax.set_xlabel(param.key)
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


def _plot_curves(study: optuna.Study) -> str:
    """Each trial's evaluations over its run: what the pruner compared."""
    fig, ax = plt.subplots(figsize=(10, 3.8), dpi=100)
    trials = [t for t in ended_trials(study) if t.intermediate_values]
    best = study.best_trial.number if any(t.state == TrialState.COMPLETE for t in trials) else None
    for t in trials:
        steps = sorted(t.intermediate_values)
        values = [t.intermediate_values[s] for s in steps]
        if t.number == best:
            ax.plot(steps, values, "o-", lw=2.2, color="tab:green", label=f"trial {t.number} (best)")
        elif t.state == TrialState.COMPLETE:
            ax.plot(steps, values, "o-", lw=1, ms=3, color="tab:blue", alpha=0.7)
        else:
            ax.plot(steps, values, "x--", lw=1, ms=5, color="tab:gray", alpha=0.8)
    ax.plot([], [], "o-", color="tab:blue", label="finished")
    ax.plot([], [], "x--", color="tab:gray", label="pruned / failed")
    ax.set_xlabel("step")
    ax.set_ylabel("val loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def write_page(spec: SweepSpec, study: optuna.Study) -> Path:
    """OUT/sweep.html: the trials, the parameter importances, val loss against each parameter and the curves;
    one self-contained file (images inline)."""
    header, rows = _rows(spec, study)
    esc = html.escape
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>keel sweep: {esc(spec.name)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "img{max-width:100%}table{border-collapse:collapse;font-size:13px}"
        "td,th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left}</style>",
        f"<h1>sweep {esc(spec.name)}</h1>",
        f"<p>{len(rows)} trials ended; runs in {esc(str(spec.out))}; objective: final val loss (lower is better). "
        "Search space: " + ", ".join(f"<code>{esc(p.key)}={esc(p.text)}</code>" for p in spec.space) + ".</p>",
        "<h2>Trials</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>",
        *("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows),
        "</table>",
    ]
    importances, note = _importances(study, spec)
    parts.append(f"<h2>Parameter importances</h2><p>{esc(note)}</p>")
    if importances:
        parts.append(f"<img alt='parameter importances' src='data:image/png;base64,{_plot_importances(importances)}'>")
    if rows:
        parts.append("<h2>Val loss against each parameter</h2>")
        parts.append(f"<img alt='slice plot' src='data:image/png;base64,{_plot_slices(spec, study)}'>")
        parts.append("<h2>Evaluations over each run</h2><p>What the pruner compared, step by step.</p>")
        parts.append(f"<img alt='val loss curves' src='data:image/png;base64,{_plot_curves(study)}'>")
    target = spec.out / PAGE_FILE
    tmp = spec.out / f".{PAGE_FILE}.tmp"
    tmp.write_text("\n".join(parts))
    os.replace(tmp, target)
    return target


def counts_line(result: SweepResult) -> str:
    c = result.counts
    return f"{sum(c.values())} trials ended: {c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed"
