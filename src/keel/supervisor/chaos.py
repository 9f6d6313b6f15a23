"""`keel chaos`: break training on purpose and check that keel repairs it.

Each scenario trains a small model on the prepared stdlib corpus through the real `keel train`
path (watchdog -> trainer process -> supervisor) and checks the outcome against a reference run:

- high_lr_10x, high_lr_20x: 10x and 20x a good learning rate. The supervised run must finish (not
  be stopped) within its margin (HIGH_LR) of the good run's validation loss; the run without the
  supervisor is trained too, to show what the repairs saved. At 10x it must also end outside the
  margin, so the scenario is known to break training; at 20x it breaks it more. These three runs
  train with AdamW (HIGH_LR_OPTIMIZER), which a too-high lr breaks.
- sigkill: the trainer process is SIGKILLed at random moments, several times; the watchdog
  restarts it and the final weights must be bit-identical to the uninterrupted run.
- corrupt_checkpoint: the newest checkpoint of a half-done run is damaged; the resume must detect
  it, fall back to the previous one, log it, and finish.
- nan: a NaN is injected into one step's loss (KEEL_FAULTS); the update must be skipped, no NaN
  may reach the weights, and the logbook must say so.
- hang: the trainer stops making progress (KEEL_FAULTS); the watchdog must notice the stale
  heartbeat, restart it, log it, and the run must finish.
- second_trainer: a second `keel train` on the same directory must be refused while the first
  trains on undisturbed (bit-identical to the reference).
- watchdog_sigkill: the watchdog alone is SIGKILLed; its trainer must stop by itself (no orphan),
  and the next `keel train` takes over and ends bit-identical to the reference.
- disk_full: checkpoint writes fail from a step on; training goes on, three failures in a row stop
  the run cleanly (no restart loop), earlier checkpoints stay intact, and the same command resumes.
- locked_registry: another process holds the registry's write lock for the first 45 s; the run
  must finish and the registry catch up.
- damaged_shard: one byte of train.bin is flipped; training must be refused with one sentence.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from safetensors.numpy import load_file

from keel import config as config_lib
from keel.config import RunConfig
from keel.runs.registry import Registry, registry_path
from keel.runs.rundir import LOGBOOK_FILE
from keel.supervisor.logbook import read_logbook
from keel.supervisor.watchdog import HEARTBEAT_FILE
from keel.train.checkpoint import checkpoint_step, list_checkpoints, verify_checkpoint
from keel.train.launch import launch


class HighLr(NamedTuple):
    factor: float  # times the good learning rate
    # The repaired run may end this much above the good run's validation loss (relative): the lr cuts
    # cost some steps of progress, but a run that recovered lands close, while a diverged one does not.
    # The ladder lands at the highest rate that trains without trouble, which from 20x can be further
    # from the good rate than from 10x, hence the wider margin there.
    margin: float
    bare_must_fail: bool  # the run without the supervisor must end outside the margin (the scenario breaks training)


HIGH_LR = {"high_lr_10x": HighLr(10.0, 0.10, True), "high_lr_20x": HighLr(20.0, 0.15, False)}
# Muon, the pretraining default, normalises its updates: with --quick, 10x and 20x its lr ended 3.4% and
# 2.2% *below* the good lr's val loss without the supervisor, so there is nothing to repair. AdamW breaks.
HIGH_LR_OPTIMIZER = "optim.optimizer=adamw"

QUICK = [
    "model.n_layer=2",
    "model.d_model=128",
    "model.n_head=4",
    "model.n_kv_head=2",
    "model.context_length=128",
    "train.batch_size=8",
    "train.max_steps=200",
    "train.eval_every=50",
    "train.checkpoint_every=25",
    "train.log_every=10",
    "optim.warmup_steps=20",
    "optim.lr=2e-3",
]
FULL = [
    "model.n_layer=4",
    "model.d_model=256",
    "model.n_head=4",
    "model.n_kv_head=2",
    "model.context_length=256",
    "train.batch_size=8",
    "train.max_steps=600",
    "train.eval_every=100",
    "train.checkpoint_every=50",
    "train.log_every=10",
    "optim.warmup_steps=50",
    "optim.lr=2e-3",
]


@dataclass
class ScenarioResult:
    name: str
    passed: bool
    evidence: str


def run_chaos(
    data_dir: Path,
    out_dir: Path,
    quick: bool,
    only: list[str] | None = None,
    report: Callable[[ScenarioResult], None] = print,
) -> list[ScenarioResult]:
    """Run the scenarios (all, or those named in `only`) and return their results."""
    base = config_lib.load(None, [f"data.path={data_dir}", *(QUICK if quick else FULL)])
    chaos = Chaos(base, Path(out_dir))
    scenarios = {
        **{name: (lambda name=name: chaos.high_lr(name)) for name in HIGH_LR},
        "sigkill": chaos.sigkill,
        "corrupt_checkpoint": chaos.corrupt_checkpoint,
        "nan": chaos.nan,
        "hang": chaos.hang,
        "second_trainer": chaos.second_trainer,
        "watchdog_sigkill": chaos.watchdog_sigkill,
        "disk_full": chaos.disk_full,
        "locked_registry": chaos.locked_registry,
        "damaged_shard": chaos.damaged_shard,
    }
    results = []
    for name in only or list(scenarios):
        result = scenarios[name]()
        report(result)
        results.append(result)
    return results


def format_scorecard(results: list[ScenarioResult]) -> str:
    width = max(len(r.name) for r in results)
    lines = [f"{r.name:{width}}  {'PASS' if r.passed else 'FAIL'}  {r.evidence}" for r in results]
    lines.append(f"{sum(r.passed for r in results)}/{len(results)} scenarios passed")
    return "\n".join(lines)


class Chaos:
    def __init__(self, base: RunConfig, out_dir: Path):
        self.base, self.out_dir = base, out_dir
        self._reference: tuple[Path, float] | None = None
        self._high_lr_good: float | None = None  # val loss of the good lr with HIGH_LR_OPTIMIZER

    # -- running ----------------------------------------------------------------------------

    def _train(
        self,
        name: str,
        *overrides: str,
        env: dict[str, str] | None = None,
        during: Callable[[Path], None] | None = None,
        fresh: bool = True,
    ) -> Path:
        run_dir = self.out_dir / name
        if fresh and run_dir.exists():
            shutil.rmtree(run_dir)
        config = config_lib.apply_overrides(self.base, [f"name=chaos-{name}", *overrides])
        saved = {key: os.environ.get(key) for key in (env or {})}
        os.environ.update(env or {})
        thread = threading.Thread(target=during, args=(run_dir,), daemon=True) if during else None
        try:
            if thread:
                thread.start()
            launch(config, run_dir)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            if thread:
                thread.join(timeout=5)
        return run_dir

    def reference(self) -> tuple[Path, float]:
        """The good run every scenario compares with (trained once)."""
        if self._reference is None:
            run_dir = self._train("reference")
            self._reference = (run_dir, _final_val_loss(run_dir))
        return self._reference

    # -- scenarios --------------------------------------------------------------------------

    def high_lr(self, name: str = "high_lr_10x") -> ScenarioResult:
        factor, margin, bare_must_fail = HIGH_LR[name]
        if self._high_lr_good is None:  # the good lr with the same optimizer, trained once
            self._high_lr_good = _final_val_loss(self._train("high_lr_good", HIGH_LR_OPTIMIZER))
        good = self._high_lr_good
        lr = f"optim.lr={self.base.optim.lr * factor}"
        bare = _final_val_loss(self._train(f"{name}_bare", HIGH_LR_OPTIMIZER, lr, "supervisor.enabled=false"))
        run_dir = self._train(f"{name}_supervised", HIGH_LR_OPTIMIZER, lr)
        supervised = _final_val_loss(run_dir)
        status = _status(run_dir)
        finished = status == "finished" and not _entries_named(run_dir, "action", "stop")
        close = supervised <= good * (1 + margin)
        broken = bare > good * (1 + margin) or not bare_must_fail
        cuts = [e["evidence"]["lr_multiplier"] for e in _entries_named(run_dir, "action", "scale_lr")]
        return ScenarioResult(
            name,
            finished and close and broken,
            f"val loss good lr {good:.3f}, {factor:g}x lr bare {bare:.3f}, {factor:g}x lr supervised "
            f"{supervised:.3f} ({supervised / good - 1:+.1%}, margin {margin:.0%}), "
            f"{'finished' if finished else 'STOPPED'}; repairs: {_count(_entries(run_dir, 'action'))}"
            + (f" (lr ×{cuts[-1]:g})" if cuts else ""),
        )

    def sigkill(self, kills: int = 3) -> ScenarioResult:
        reference_dir, _ = self.reference()
        max_steps = self.base.train.max_steps
        rng = random.Random(0)
        targets = sorted(rng.sample(range(max_steps // 10, max_steps - max_steps // 10), kills))
        killed: list[int] = []

        def killer(run_dir: Path) -> None:
            for target in targets:
                while True:
                    beat = _heartbeat(run_dir)
                    if beat and (beat["step"] or -1) >= target and beat["pid"] not in killed:
                        os.kill(beat["pid"], signal.SIGKILL)
                        killed.append(beat["pid"])
                        break
                    time.sleep(0.05)

        run_dir = self._train("sigkill", "watchdog.backoff_s=0.5", during=killer)
        same = _weights(run_dir) == _weights(reference_dir)
        restarts = len(_entries(run_dir, "restart"))
        return ScenarioResult(
            "sigkill",
            same and restarts == kills,
            f"{len(killed)} SIGKILLs near steps {targets}, {restarts} restarts, final weights "
            f"{'bit-identical to' if same else 'DIFFERENT from'} the uninterrupted run",
        )

    def corrupt_checkpoint(self) -> ScenarioResult:
        half = self.base.train.max_steps // 2
        run_dir = self._train("corrupt_checkpoint", f"train.max_steps={half}")
        newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
        weights = newest / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
        self._train("corrupt_checkpoint", fresh=False)
        faults = [e for e in _entries(run_dir, "fault") if e["name"] == "corrupt_checkpoint"]
        finished = _status(run_dir) == "finished"
        return ScenarioResult(
            "corrupt_checkpoint",
            bool(faults) and finished,
            f"damaged {newest.name}; "
            + (faults[0]["message"] if faults else "NOT detected")
            + f"; run {'finished' if finished else 'did not finish'}",
        )

    def nan(self) -> ScenarioResult:
        step = self.base.train.max_steps // 3
        run_dir = self._train("nan", env={"KEEL_FAULTS": f"nan@{step}"})
        skipped = [e for e in _entries(run_dir, "action") if e["name"] == "skip_update"]
        finite = all(
            math.isfinite(float(v))
            for t in load_file(str(_final(run_dir) / "model.safetensors")).values()
            for v in (t.min(), t.max())
        )
        finished = _status(run_dir) == "finished"
        return ScenarioResult(
            "nan",
            bool(skipped) and finite and finished,
            f"NaN injected at step {step}: {len(skipped)} update(s) skipped, weights "
            f"{'all finite' if finite else 'CONTAIN NaN/inf'}, run "
            f"{'finished' if finished else 'did not finish'}",
        )

    def hang(self, timeout_s: float = 10.0) -> ScenarioResult:
        step = self.base.train.max_steps // 3
        run_dir = self._train(
            "hang",
            f"watchdog.hang_timeout_s={timeout_s}",
            "watchdog.backoff_s=0.5",
            env={"KEEL_FAULTS": f"hang@{step}"},
        )
        hangs = [e for e in _entries(run_dir, "fault") if e["name"] == "hang"]
        finished = _status(run_dir) == "finished"
        return ScenarioResult(
            "hang",
            bool(hangs) and finished,
            f"trainer hung after step {step}: "
            + (hangs[0]["message"] if hangs else "NOT detected")
            + f"; run {'finished' if finished else 'did not finish'}",
        )

    # -- faults around the run: ownership, the disk, the registry, the data --------------------

    def _cli(self, name: str, *overrides: str, env: dict[str, str] | None = None) -> tuple[list[str], Path]:
        """The `keel train` command line of a scenario run in its own processes (watchdog + trainer)."""
        run_dir = self.out_dir / name
        config = config_lib.apply_overrides(self.base, [f"name=chaos-{name}", *overrides])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        config_file = self.out_dir / f"{name}.yaml"
        config_lib.save(config, config_file)
        return [
            sys.executable,
            "-m",
            "keel.cli",
            "train",
            "--config",
            str(config_file),
            "--run-dir",
            str(run_dir),
        ], run_dir

    def second_trainer(self) -> ScenarioResult:
        """A second `keel train` on a directory in use is refused; the owner trains on undisturbed."""
        reference_dir, _ = self.reference()
        argv, run_dir = self._cli("second_trainer")
        shutil.rmtree(run_dir, ignore_errors=True)
        owner = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for_step(run_dir, self.base.train.max_steps // 4, owner)
            # The owner's trainer is paused while the second command runs, so a short run cannot finish
            # (and free the directory) first; a pause changes none of its numbers.
            trainer = _heartbeat(run_dir)["pid"]
            os.kill(trainer, signal.SIGSTOP)
            try:
                second = subprocess.run(argv, capture_output=True, text=True, timeout=600)
            finally:
                os.kill(trainer, signal.SIGCONT)
            code = owner.wait(timeout=1800)
        finally:
            _stop(owner)
        message = (second.stderr.strip().splitlines() or ["(nothing)"])[-1].replace(str(run_dir), "RUN_DIR")
        same = code == 0 and _weights(run_dir) == _weights(reference_dir)
        starts = len([e for e in read_logbook(run_dir / LOGBOOK_FILE) if e["name"] == "run_start"])
        return ScenarioResult(
            "second_trainer",
            second.returncode == 2 and "in use" in message and same and starts == 1,
            f"second keel train exited {second.returncode}: {message} The owner "
            f"{'finished bit-identical to' if same else 'did NOT end as'} the undisturbed run ({starts} start(s))",
        )

    def watchdog_sigkill(self) -> ScenarioResult:
        """SIGKILL of the watchdog alone: the trainer checkpoints and exits instead of training on as an
        orphan, and the next `keel train` takes the directory over and ends as the undisturbed run."""
        reference_dir, _ = self.reference()
        argv, run_dir = self._cli("watchdog_sigkill")
        shutil.rmtree(run_dir, ignore_errors=True)
        watchdog = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for_step(run_dir, self.base.train.max_steps // 3, watchdog)
            trainer = _heartbeat(run_dir)["pid"]
            watchdog.kill()
            watchdog.wait()
            deadline = time.monotonic() + 120
            while _alive(trainer) and time.monotonic() < deadline:
                time.sleep(0.1)
            orphan = _alive(trainer)
        finally:
            _stop(watchdog)
        stopped_at = _last_checkpoint_step(run_dir)
        resumed = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
        took_over = [e for e in read_logbook(run_dir / LOGBOOK_FILE) if e["name"] == "took_over"]
        same = resumed.returncode == 0 and _weights(run_dir) == _weights(reference_dir)
        return ScenarioResult(
            "watchdog_sigkill",
            not orphan and bool(took_over) and same,
            f"watchdog SIGKILLed; its trainer {'kept training as an ORPHAN' if orphan else 'stopped by itself'} "
            f"(checkpoint at step {stopped_at}); the next keel train "
            f"{'took over' if took_over else 'did NOT log a takeover'} and "
            f"{'ended bit-identical to' if same else 'did NOT end as'} the undisturbed run",
        )

    def disk_full(self) -> ScenarioResult:
        """Checkpoints fail (KEEL_FAULTS diskfull: the kernel refuses writes past 64 KiB): training goes on,
        three failures in a row stop the run cleanly, the earlier checkpoints stay intact, and the same
        command resumes once there is room again."""
        reference_dir, _ = self.reference()
        step = self.base.train.max_steps // 3
        argv, run_dir = self._cli("disk_full")
        shutil.rmtree(run_dir, ignore_errors=True)
        full = subprocess.run(
            argv, capture_output=True, text=True, env={**os.environ, "KEEL_FAULTS": f"diskfull@{step}"}
        )
        failed = [e for e in read_logbook(run_dir / LOGBOOK_FILE) if e["name"] == "checkpoint_failed"]
        intact = all(verify_checkpoint(p) is None for p in list_checkpoints(run_dir))
        restarts = len(_entries(run_dir, "restart"))
        again = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
        same = again.returncode == 0 and _weights(run_dir) == _weights(reference_dir)
        return ScenarioResult(
            "disk_full",
            full.returncode == 3 and len(failed) == 3 and intact and restarts == 0 and same,
            f"disk full from step {step}: {len(failed)} checkpoint failures logged, exit {full.returncode} "
            f"after {restarts} restarts, earlier checkpoints {'intact' if intact else 'DAMAGED'}; with room again "
            f"the run {'resumed and ended bit-identical to' if same else 'did NOT end as'} the undisturbed run",
        )

    def locked_registry(self, hold_s: float = 45.0) -> ScenarioResult:
        """Another process holds the registry's write lock for hold_s from the start: training goes on,
        and the registry has every step once the lock is gone."""
        with Registry() as registry:
            registry.runs()  # the file exists, so there is something to lock
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLD_LOCK, str(registry_path()), str(hold_s)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
            argv, run_dir = self._cli("locked_registry")
            shutil.rmtree(run_dir, ignore_errors=True)
            result = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
            holder.wait(timeout=hold_s + 60)
        finally:
            _stop(holder)
        name = "chaos-locked_registry"
        with Registry() as registry:
            run = registry.get_run(name)
            steps = len(registry.metrics(name, "loss").get("loss", []))
        if run is None or run["status"] != "finished" or steps < self.base.train.max_steps:
            subprocess.run([sys.executable, "-m", "keel.cli", "runs", "--import", str(run_dir)], capture_output=True)
            with Registry() as registry:
                run = registry.get_run(name)
                imported = len(registry.metrics(name, "loss").get("loss", []))
            how = f"caught up by keel runs --import ({imported} steps)"
        else:
            imported, how = steps, "caught up by itself"
        complete = run is not None and run["status"] == "finished" and imported >= self.base.train.max_steps
        return ScenarioResult(
            "locked_registry",
            result.returncode == 0 and "Traceback" not in result.stderr and complete,
            f"registry write-locked for {hold_s:g} s from the start: keel train exited {result.returncode}; "
            f"registry {how}, status {run['status'] if run else 'missing'}",
        )

    def damaged_shard(self) -> ScenarioResult:
        """A train.bin overwritten in place (same size, mtime put back) is refused before training, once."""
        data = self.out_dir / "damaged-data"
        shutil.rmtree(data, ignore_errors=True)
        shutil.copytree(Path(self.base.data.path), data)
        shard = data / "train.bin"
        stat = shard.stat()
        with open(shard, "r+b") as f:
            f.seek(stat.st_size // 2)
            byte = f.read(1)
            f.seek(stat.st_size // 2)
            f.write(bytes([byte[0] ^ 0xFF]))
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        argv, run_dir = self._cli("damaged_shard", f"data.path={data}")
        shutil.rmtree(run_dir, ignore_errors=True)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        message = (result.stderr.strip().splitlines() or ["(nothing)"])[-1].replace(str(data), "DATA")
        restarts = len(_entries(run_dir, "restart")) if run_dir.exists() else 0
        return ScenarioResult(
            "damaged_shard",
            result.returncode == 2 and "train.bin" in message and "Traceback" not in result.stderr and restarts == 0,
            f"one byte of train.bin flipped: exit {result.returncode}, {restarts} restarts: {message}",
        )


_HOLD_LOCK = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
"""


def _wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, seconds: float = 1800) -> None:
    deadline = time.monotonic() + seconds
    while ((_heartbeat(run_dir) or {}).get("step") or 0) < step:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the run in {run_dir} ended or stalled before step {step}")
        time.sleep(0.05)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _last_checkpoint_step(run_dir: Path) -> int | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoint_step(checkpoints[-1]) if checkpoints else None


# -- reading results ------------------------------------------------------------------------


def _entries(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in read_logbook(run_dir / LOGBOOK_FILE) if e["kind"] == kind]


def _entries_named(run_dir: Path, kind: str, name: str) -> list[dict]:
    return [e for e in _entries(run_dir, kind) if e["name"] == name]


def _count(entries: list[dict]) -> str:
    names = [e["name"] for e in entries]
    return ", ".join(f"{names.count(n)} {n}" for n in dict.fromkeys(names)) or "none"


def _final(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("step_*"))[-1]


def _weights(run_dir: Path) -> bytes:
    return (_final(run_dir) / "model.safetensors").read_bytes()


def _status(run_dir: Path) -> str:
    config = config_lib.load(run_dir / "config.yaml")
    with Registry() as registry:
        run = registry.get_run(config.name)
    return run["status"] if run else "missing"


def _final_val_loss(run_dir: Path) -> float:
    config = config_lib.load(run_dir / "config.yaml")
    with Registry() as registry:
        values = [v for _, v in registry.metrics(config.name, "val_loss").get("val_loss", [])]
    return values[-1] if values and math.isfinite(values[-1]) else float("inf")


def _heartbeat(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / HEARTBEAT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
