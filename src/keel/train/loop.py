"""The training loop, the same for every task (keel.tasks: pretrain, sft, dpo, distill, diffusion).

The task supplies the model, the batches, the loss and its metrics, the evaluation and monitors of
its own; the loop knows no model family and no loss. One optimizer step = `grad_accum` micro-batches
-> clipping -> the update, which the device drops by itself when the supervisor would skip it
(`skip_update`) -> one StepRecord for the supervisor -> its actions applied. The host reads a step's
numbers only after it has queued the next step's forward/backward, so on a GPU the device always has
work queued and never waits for the host: there is no per-step synchronisation that drains the
queue. The supervisor still judges every step, one step behind the device; a rollback throws the
queued step's gradients away.

Everything a resume needs (weights, optimizer, LoopState, supervisor state, grad scaler) goes into
each checkpoint, and the batch at cursor c is a pure function of (data, seed, c), so a resumed run
repeats the uninterrupted one exactly, unless train.max_minutes plans the lr schedule by the clock.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from keel.config import RunConfig, TrainConfig, resolve_optimizer
from keel.errors import UserError
from keel.models.lora import lora_for_run, reset_adapters
from keel.models.memory import apply_activation_checkpointing
from keel.runs.registry import Registry
from keel.runs.rundir import LOGBOOK_FILE, data_identity
from keel.runs.tensorboard import TensorBoardWriter
from keel.supervisor.logbook import Logbook
from keel.supervisor.monitors import StepRecord
from keel.supervisor.policy import Action, Supervisor
from keel.supervisor.watchdog import heartbeat_file
from keel.tasks import build_task
from keel.tasks.base import ACT_NORM, LOGIT_NORM, step_weights
from keel.train import checkpoint as ckpt
from keel.train.faults import Faults
from keel.train.optim import build_optimizer, lr_at, reset_moments, step_unless
from keel.train.parallel import (
    Parallel,
    barrier,
    check_layout,
    destroy_process_group,
    init_process_group,
    my_micro_batches,
    world_from_env,
)
from keel.train.precision import (
    autocast,
    grad_scaler,
    keep_freed_memory,
    pick_device,
    pick_dtype,
    use_deterministic_kernels,
)


@dataclass
class LoopState:
    """The loop's own resumable state (weights and optimizer are saved beside it)."""

    step: int = 0  # optimizer steps applied
    cursor: int = 0  # index of the next batch; runs ahead of step when batches are skipped
    tokens: int = 0  # training tokens in the weights (every token through the model, prompts included)
    lr_scale: float = 1.0  # multiplier the supervisor applies on top of the schedule
    grad_clip: float = 0.0  # current clip value (the supervisor may tighten it)
    best_val_loss: float | None = None
    train_seconds: float = 0.0  # training time up to this state, summed over the process segments
    rate_checked: bool = False  # the supervisor's rate check is done (Trainer._check_rate)


@dataclass
class Launched:
    """A step whose forward/backward is queued: its gradients are (or will be) in the parameters."""

    loss: torch.Tensor  # the step's mean loss, on the device
    metrics: dict[str, torch.Tensor]  # the task's metrics as step means, on the device
    tokens: int  # tokens through the model in this step
    seconds: float  # host time spent queueing it


@dataclass
class Pending:
    """A step whose update is queued and whose numbers are on their way to the host."""

    step: int
    lr: float
    tokens: int
    names: list[str]  # what each entry of `values` is: loss, grad_norm, skipped, act_norm, logit_norm, ...
    values: torch.Tensor  # valid on the host once `ready` passed
    ready: torch.cuda.Event | None  # None: `values` is already on the host
    seconds: float  # host time spent queueing the step


@dataclass
class TrainResult:
    status: str  # finished | stopped | stopped_by_supervisor | time_limit | token_limit
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    final_loss: float
    val_loss: float | None
    timings: dict[str, float] = field(default_factory=dict)
    evaluation: dict[str, float] = field(default_factory=dict)  # the task's last evaluation
    diagnosis: str = ""


class _Timer:
    """Wall-clock seconds per phase, for the bench's time split."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def write_heartbeat(run_dir: Path, step: int, rank: int = 0, started: bool = False, ended: bool = False) -> None:
    """`started`: this process has done a training step, so the watchdog's start-up grace is over.
    `ended`: every rank has finished (or cleanly stopped) the run and all it wrote is in place."""
    name = heartbeat_file(rank)
    tmp = run_dir / f".{name}.tmp"
    beat = {"step": step, "time": time.time(), "pid": os.getpid(), "rank": rank, "started": started}
    if ended:
        beat["ended"] = True
    tmp.write_text(json.dumps(beat))
    os.replace(tmp, run_dir / name)


class Trainer:
    """Holds what one training process needs; `run()` is the loop."""

    def __init__(self, config: RunConfig, run_dir: Path, registry: Registry | None, progress: bool):
        self.config, self.run_dir, self.registry, self.progress = config, Path(run_dir), registry, progress
        t = config.train
        self.world = world_from_env()
        self.device = pick_device(t.device)
        if self.device.type == "cuda" and self.world.distributed:  # one GPU per rank
            self.device = torch.device("cuda", self.world.local_rank)
            torch.cuda.set_device(self.device)
        check_layout(t.grad_accum, self.world, t.parallel, config)
        init_process_group(self.world, self.device)
        self.dtype = pick_dtype(t.dtype, self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        use_deterministic_kernels(t.deterministic)
        self.state = LoopState(grad_clip=config.optim.grad_clip)  # replaced by a checkpoint's when one loads
        self.started = False  # a training step is done: the heartbeat says so, ending the start-up grace
        self.task = build_task(
            config, self.device, self.dtype, heartbeat=lambda: self.beat(self.state.step), run_dir=self.run_dir
        )
        self.model = self.task.build_model()
        self.lora_base = lora_for_run(self.model, config)  # adapters on a frozen base, applied from outside
        if t.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        self.task.bind(self.model)
        # The task's loss is compiled as a whole (trunk, head and statistics in one graph); the
        # parameters and checkpoints are those of the plain module either way.
        latest = ckpt.list_checkpoints(self.run_dir)
        started = ckpt.read_meta(latest[-1]).get("compiled") if latest else None
        self.compiled = should_compile(t, ckpt.checkpoint_step(latest[-1]) if latest else 0, self.device, started)
        if self.compiled and self.world.distributed and t.parallel == "fsdp":
            self.compiled = False  # compile=auto: FSDP2 runs eager (compile=true is refused by check_layout)
        loss = torch.compile(self.task.loss) if self.compiled else self.task.loss
        # Several processes: DDP or FSDP2 around the model, from outside; one: the loss as it is.
        self.parallel = Parallel(self.model, loss, self.world, t.parallel, self.device)
        self.optim = resolve_optimizer(config)
        self.optimizer = build_optimizer(self.model, self.optim)  # after FSDP2 has sharded the parameters
        self.data_identity = data_identity(Path(config.data.path))
        self.scaler = grad_scaler(self.device, self.dtype)
        if not self.world.main:
            self.registry = None  # rank 0 speaks for the run: registry and logbook
        self.segment = self.registry.start_run(config.name, str(run_dir), config.to_dict()) if self.registry else 0
        self.tensorboard = TensorBoardWriter(self.run_dir) if t.tensorboard and self.world.main else None
        self.logbook = Logbook(self.run_dir / LOGBOOK_FILE, mirror=self._mirror_event, rank=self.world.rank)
        self.supervisor = (
            Supervisor(
                config.supervisor,
                self.logbook,
                t.max_steps,
                config.optim.grad_clip,
                self.task.monitors(),
                held_out=self._held_out_loss,
            )
            if config.supervisor.enabled
            else None
        )
        self.faults = Faults.from_env()
        self.timer = _Timer()
        self.pending_metrics: list[tuple[int, dict[str, float]]] = []
        self.stop_signal: str | None = None
        self.checkpoint_failures = 0  # in a row
        self.halt: str | None = None  # why the run must stop although nothing is wrong with the training
        self.steps_applied = 0  # optimizer steps applied by this process (rollbacks do not undo the work)
        self.tokens_applied = 0  # and the tokens they trained on
        self.start_time = time.perf_counter()
        self.clock_base = 0.0  # training seconds of the segments before this process, from its checkpoint
        self.agreed_seconds = 0.0  # several ranks: rank 0's training seconds at the last step
        self.agreed_stop: str | None = None

    # -- small pieces -----------------------------------------------------------------------

    def beat(self, step: int, ended: bool = False) -> None:
        write_heartbeat(self.run_dir, step, self.world.rank, self.started, ended)

    def _mirror_event(self, entry: dict) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_entry(entry)
        if self.registry is not None:
            self.registry.log_event(self.config.name, entry.get("step"), entry["kind"], entry["message"], entry)

    def train_seconds(self) -> float:
        """Training time so far, earlier process segments included (time a crash lost after the last
        checkpoint is not counted: those steps are trained again)."""
        if self.world.distributed:  # rank 0's, as of the last step: every rank must decide alike
            return self.agreed_seconds
        return self.clock_base + time.perf_counter() - self.start_time

    def stopping(self) -> str | None:
        """The stop request the run acts on (several ranks: one every rank has seen, at the same step)."""
        return self.agreed_stop if self.world.distributed else self.stop_signal

    def planned_steps(self) -> float:
        """The run's length in optimizer steps as planned now: train.max_steps, or the steps
        train.max_minutes buys at the average rate so far (start-up, compilation, evaluations and
        checkpoints included), whichever is fewer.

        Planned this way a wsd decay starts when (1 - decay_fraction) of the time budget is spent and
        reaches its floor as the budget ends, however fast the machine runs meanwhile.
        """
        t = self.config.train
        steps = t.max_steps or math.inf
        if t.max_minutes:
            step = self.state.step
            affordable = step * 60 * t.max_minutes / max(self.train_seconds(), 1e-9)
            steps = min(steps, max(affordable, step + 1))
        return steps

    def _set_lr(self) -> float:
        planned = self.planned_steps()
        if self.supervisor is not None:
            self.supervisor.max_steps = planned  # its post-rollback skip is a share of the run
        lr = lr_at(self.state.step, self.config.optim, planned) * self.state.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _evaluate(self) -> dict[str, float]:
        with self.parallel.full_weights():
            evaluation = self.task.evaluate(self.model)
        assert "val_loss" in evaluation, "a task's evaluation reports val_loss, which picks the best checkpoint"
        return evaluation

    def _held_out_loss(self) -> float:
        """The supervisor's question before it repairs a divergence: the held-out loss of the weights now."""
        with self.timer("eval"), self.parallel.full_weights():
            self.beat(self.state.step)
            return self.task.held_out_loss(self.model)

    # -- checkpoints ------------------------------------------------------------------------

    def save(self, val_loss: float | None = None) -> None:
        self.beat(self.state.step)
        self.flush_metrics()  # every step up to a checkpoint reaches the registry first (or its queue, in an outage)
        self.state.train_seconds = self.train_seconds()
        sharded = self.parallel.kind == "fsdp"  # the optimizer state goes into the shards
        train_state = {
            "loop": dataclasses.asdict(self.state),
            **({} if sharded else {"optimizer": self.optimizer.state_dict()}),
            "scaler": self.scaler.state_dict(),
            "supervisor": self.supervisor.state_dict() if self.supervisor else {},
            "task": self.task.state_dict(),
            "rng": ckpt.capture_rng_state(),
        }
        # A checkpoint written while the supervisor has trouble open is no place to roll back to.
        healthy = self.supervisor.checkpoint_is_good(self.state.step) if self.supervisor else True
        meta = {
            "step": self.state.step,
            "tokens": self.state.tokens,
            "val_loss": val_loss,
            "healthy": healthy,
            "data_identity": self.data_identity,  # a resume on other data is refused (runs.rundir)
            "compiled": self.compiled,  # a resume keeps it: a run that changed kernels midway would not repeat
            "lora_base": self.lora_base,  # the weights the adapters go on: loading them elsewhere is refused
            "world_size": self.world.size,
            "time": time.time(),
            "config": self.config.to_dict(),
        }
        if not self.parallel.replicas_agree():
            message = (
                f"the ranks' weights differ at step {self.state.step}: a rank went its own way; "
                "the group restarts from the newest checkpoint."
            )
            self.logbook.write(self.state.step, "fault", "replicas_diverged", message, {})
            raise RuntimeError(message)
        path, error = None, None
        try:
            if sharded:
                in_shards = ckpt.write_shards(
                    self.run_dir, self.state.step, self.model, self.optimizer, self.world.main
                )
                train_state["optimizer_in_shards"] = in_shards
            if self.world.main:
                path = ckpt.save_checkpoint(
                    self.run_dir,
                    self.state.step,
                    self.model,
                    train_state,
                    meta,
                    keep_last=self.config.train.keep_checkpoints,
                    sharded=sharded,
                )
        except OSError as err:
            error = err
        if self.world.distributed:  # every rank learns whether the checkpoint exists now
            failed = self.parallel.sum_host(torch.tensor([0.0 if error is None else 1.0])).item()
            if failed and error is None:  # that rank's logbook entry says why
                self._checkpoint_failed(OSError(errno.EIO, "another rank could not write its part"), own=False)
                return
        if error is not None:
            self._checkpoint_failed(error)
            return
        self.checkpoint_failures = 0
        if self.registry is not None and path is not None:
            self.registry.log_checkpoint(self.config.name, self.state.step, str(path), val_loss)

    def _checkpoint_failed(self, err: OSError, own: bool = True) -> None:
        """A checkpoint that cannot be written (disk full, no permission, quota) leaves the earlier
        ones intact (written elsewhere, renamed into place only when complete); training goes on
        and the next checkpoint tries again. CHECKPOINT_FAILURES_TO_STOP failures in a row stop the
        run cleanly: training on with nowhere to save would only make the loss on a crash larger."""
        self.checkpoint_failures += 1
        why = err.strerror or str(err)
        step, last = self.state.step, _latest_step(self.run_dir)
        stopping = self.checkpoint_failures >= CHECKPOINT_FAILURES_TO_STOP
        then = "the run stops" if stopping else "training goes on and the next checkpoint tries again"
        message = (
            f"checkpoint at step {step} could not be written ({why}); the checkpoints before it are intact "
            f"(newest: step {last}), {then}."
        )
        tqdm.write(f"trainer: {message}", file=sys.stderr)  # on a line of its own, not after the bar
        try:
            if own or self.world.main:  # each rank logs its own failure; rank 0 also the others'
                self.logbook.write(step, "fault", "checkpoint_failed", message, {"error": why, "errno": err.errno})
        except OSError:
            pass  # the logbook is on the same full disk; stderr has the message
        if stopping:
            self.halt = (
                f"{self.checkpoint_failures} checkpoints in a row could not be written ({why}); free space "
                f"(or fix permissions) under {self.run_dir} and run the same command to resume from step {last}"
            )

    def restore(self, before_step: int | None = None) -> bool:
        """Load the newest good checkpoint (older than before_step); say which ones were bad.

        A checkpoint counts as bad when its files do not match their manifest and equally when they
        match but do not load (state from another keel version, a file damaged before it was
        checksummed): the next older one is tried. Returns False when there is none to load; on the
        first start of a process that is an error if checkpoints exist, lest the run start over.
        """
        rollback, below, bad_ones = before_step is not None, before_step, 0
        while True:
            path, bad = ckpt.find_latest_good(self.run_dir, before_step=below, healthy_only=rollback)
            for bad_path, reason in bad:
                self._log_bad_checkpoint(bad_path, reason)
            bad_ones += len(bad)
            if path is None:
                break
            try:
                self._load(path)
                return True
            except Exception as err:  # noqa: BLE001 - whatever stops a checkpoint loading makes it bad
                first_line = (str(err).splitlines() or [""])[0][:200]
                self._log_bad_checkpoint(path, f"does not load: {type(err).__name__}: {first_line}")
                bad_ones += 1
                below = ckpt.checkpoint_step(path)  # and look further back
        if bad_ones and not rollback:  # starting over would silently throw the run away
            raise UserError(
                f"no checkpoint in {self.run_dir / 'checkpoints'} loads (the logbook says why); "
                "restore them from a backup, or start again in a new --run-dir."
            )
        return False

    def _load(self, path: Path) -> None:
        if self.parallel.kind == "fsdp" or ckpt.is_sharded(path):  # reshards to this world size
            train_state = ckpt.load_into_sharded(path, self.model, self.optimizer, self.device)
        else:
            train_state, _ = ckpt.load_checkpoint(path, self.model, self.device)
            self.optimizer.load_state_dict(train_state["optimizer"])
        self.scaler.load_state_dict(train_state["scaler"])
        state = LoopState(**train_state["loop"])
        if self.supervisor and train_state["supervisor"]:
            self.supervisor.load_state_dict(train_state["supervisor"])
        self.task.load_state_dict(train_state.get("task", {}))
        ckpt.restore_rng_state(train_state["rng"])
        self.state = state

    def _log_bad_checkpoint(self, path: Path, reason: str) -> None:
        self.logbook.write(
            self.state.step,
            "fault",
            "corrupt_checkpoint",
            f"checkpoint {path.name} is unusable ({reason}); falling back to an older one.",
            {"checkpoint": path.name, "reason": reason},
        )

    # -- supervisor actions -----------------------------------------------------------------

    def apply(self, action: Action) -> str | None:
        """Carry out one action; returns a stop diagnosis for `stop`."""
        if action.kind == "scale_lr":
            self.state.lr_scale *= action.params["factor"]
        elif action.kind == "set_clip":
            self.state.grad_clip = action.params["value"]
        elif action.kind == "reset_optimizer":
            reset_moments(self.optimizer, action.params["moments"])
        elif action.kind == "rollback":
            trouble_cursor, checked = self.state.cursor, self.state.rate_checked
            keep = (self.state.lr_scale, self.state.grad_clip)
            # The live supervisor and the repairs decided since the checkpoint stay in force.
            self._go_back(action.params["before_step"], self.supervisor.state_dict())
            self.state.lr_scale, self.state.grad_clip = keep
            self.state.rate_checked = checked
            self.state.cursor = trouble_cursor + action.params["skip_batches"]
            self.supervisor.after_rollback(self.state.step)
        elif action.kind == "stop":
            return action.params.get("diagnosis", action.reason)
        return None

    # -- the rate check -------------------------------------------------------------------

    def _rate_check_due(self) -> bool:
        c = self.config.supervisor
        if self.supervisor is None or not c.rate_check_steps or self.state.rate_checked:
            return False
        at = self.config.optim.warmup_steps + c.rate_check_steps
        return self.state.step == at and self.planned_steps() >= 4 * at

    def _check_rate(self) -> None:
        """Replay the run so far at half the rate and keep whichever reached the lower validation loss.

        A too-high AdamW rate can hurt with no per-step sign of trouble: the loss falls, just slower
        (docs/benchmarks.md), so no monitor catches it and only an experiment shows it. Here the
        first `at` steps are trained again from step 0, on the same batches, at half the rate; the
        half rate is kept when its validation loss is lower by rate_check_margin, and halved again
        while halving wins. The run goes on from the end of the kept branch (the run itself when
        the rate stays). Every rank runs the same branches, so they agree on the outcome.
        """
        at, margin, scale = self.state.step, self.config.supervisor.rate_check_margin, self.state.lr_scale
        supervisor_state = copy.deepcopy(self.supervisor.state_dict())
        best_scale, best_loss, best = scale, self._evaluate()["val_loss"], self._snapshot()
        tried = {f"{scale:g}": best_loss}
        while not self.stopping():
            trial = best_scale / 2
            loss = self._replay(at, trial, supervisor_state)
            if self.stopping():
                break
            tried[f"{trial:g}"] = loss
            if not loss < best_loss * (1 - margin):  # a NaN loss loses too
                break
            best_scale, best_loss, best = trial, loss, self._snapshot()
        self._restore(best)
        if self.stopping():  # the check starts again when the run resumes at this step
            return
        self.state.rate_checked = True
        losses = ", ".join(f"×{k} {v:.4f}" for k, v in tried.items())
        evidence = {"val_loss_by_lr_multiplier": tried, "lr_multiplier": best_scale, "steps": at}
        if best_scale == scale:
            message = f"rate check: the first {at} steps again at half the rate did not do better ({losses}); rate kept"
            self.logbook.write(at, "info", "rate_check", message, evidence)
            return
        self.supervisor.lr_multiplier *= best_scale / scale
        message = (
            f"rate check: the first {at} steps trained again from step 0 at lower rates reached val loss {losses}; "
            f"the run goes on at ×{best_scale:g} of the schedule"
        )
        self.logbook.write(at, "action", "rate_check", message, evidence)
        self.save(best_loss)  # the checkpoint of this step holds the kept branch

    def _replay(self, at: int, lr_scale: float, supervisor_state: dict) -> float:
        """Train from step 0 to step `at` at lr_scale × the schedule; the validation loss reached."""
        clip = self.state.grad_clip
        self._go_back(1, supervisor_state)
        self.state.lr_scale, self.state.grad_clip = lr_scale, clip
        for _ in range(2 * at + 10):  # updates dropped as non-finite do not count; a branch of them loses
            if self.state.step >= at or self.stopping():
                break
            record, dropped = self.read(self.finish(self.launch(self.state.cursor)))
            self.state.cursor += 1
            if not dropped:
                self.state.step, self.state.tokens = self.state.step + 1, record.tokens
            self.beat(self.state.step)
        return self._evaluate()["val_loss"] if self.state.step >= at else math.inf

    def _go_back(self, before_step: int, supervisor_state: dict) -> None:
        """Load the newest checkpoint before before_step, with supervisor_state in place of the checkpoint's."""
        if not self.restore(before_step=before_step):
            self._reinitialise()  # older checkpoints were pruned; step 0 is the seed's initial weights
        self.supervisor.load_state_dict(copy.deepcopy(supervisor_state))

    def _snapshot(self) -> dict:
        """Everything a step changes, copied where it lives (a copy of the weights and optimizer state)."""
        return {
            "weights": [p.detach().clone() for p in self.model.parameters()],
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scaler": copy.deepcopy(self.scaler.state_dict()),
            "supervisor": copy.deepcopy(self.supervisor.state_dict()),
            "task": copy.deepcopy(self.task.state_dict()),
            "loop": dataclasses.replace(self.state),
            "rng": ckpt.capture_rng_state(),
        }

    def _restore(self, snapshot: dict) -> None:
        with torch.no_grad():
            for p, saved in zip(self.model.parameters(), snapshot["weights"]):
                p.copy_(saved)
        self.optimizer.load_state_dict(copy.deepcopy(snapshot["optimizer"]))
        self.scaler.load_state_dict(snapshot["scaler"])
        self.supervisor.load_state_dict(copy.deepcopy(snapshot["supervisor"]))
        self.task.load_state_dict(copy.deepcopy(snapshot["task"]))
        self.state = dataclasses.replace(snapshot["loop"])
        ckpt.restore_rng_state(snapshot["rng"])

    def _reinitialise(self) -> None:
        if self.lora_base:
            reset_adapters(self.model, self.config.train.seed)  # the frozen base is as it was
        else:
            self.task.init_weights(self.model)
        self.optimizer = build_optimizer(self.model, self.optim)  # fresh state, as at step 0
        self.state = LoopState(grad_clip=self.config.optim.grad_clip)

    # -- the loop ---------------------------------------------------------------------------

    def launch(self, cursor: int) -> Launched:
        """Queue the forward/backward of the step that trains on batch `cursor`."""
        t = self.config.train
        start = time.perf_counter()
        with self.timer("data"):
            mine = my_micro_batches(t.grad_accum, self.world)  # all of them with one process
            batches = [self.task.batch(cursor * t.grad_accum + micro) for micro in mine]
            units = None
            if self.world.distributed:  # the step's units over every rank's micro-batches
                units = self.parallel.sum_host(
                    torch.tensor(float(sum(b.units for b in batches)), dtype=torch.float64)
                ).item()
        loss_sum = torch.zeros((), device=self.device)
        metrics: dict[str, torch.Tensor] = {}
        for i, (batch, divisor) in enumerate(zip(batches, step_weights(batches, units))):
            with self.timer("data"):
                tensors = batch.to(self.device).tensors
            with self.timer("forward_backward"), self.parallel.accumulating(last=i == len(batches) - 1):
                with autocast(self.device, self.dtype):
                    out = self.parallel.forward(tensors)
                loss = self.faults.corrupt_loss(out.loss, cursor)
                # Each micro-batch's mean weighted by its share of the step's units: the step's loss
                # is the mean over all of them, however they fall into micro-batches (and ranks).
                self.scaler.scale(loss / divisor).backward()
                loss_sum += loss.detach() / divisor
                for name, value in out.metrics.items():
                    metrics[name] = metrics.get(name, 0.0) + value / divisor
        return Launched(loss_sum, metrics, sum(b.tokens for b in batches), time.perf_counter() - start)

    def finish(self, launched: Launched) -> Pending:
        """Clip and queue the update, which the device drops when the supervisor would; send the numbers home.

        Call once every earlier step is read and judged: the lr, the clip value and the skip limits
        are the ones the supervisor's judgement left.
        """
        start = time.perf_counter()
        if self.world.distributed:
            launched = self._reduced(launched, time.perf_counter() - start)
        lr = self._set_lr()
        with self.timer("optimizer"):
            self.scaler.unscale_(self.optimizer)
            params = [p for p in self.model.parameters() if p.grad is not None]
            grad_norm = self.parallel.total_norm([p.grad for p in params])
            if self.state.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.state.grad_clip, grad_norm)
            skip = self._skip_flag(launched.loss, grad_norm)
            numbers = {
                "loss": launched.loss,
                "grad_norm": grad_norm,
                "skipped": skip if skip is not None else torch.zeros((), device=self.device),
            }
            for name, value in launched.metrics.items():  # mean squares become RMS for the monitors
                numbers[{ACT_NORM: "act_norm", LOGIT_NORM: "logit_norm"}.get(name, name)] = (
                    value.sqrt() if name in (ACT_NORM, LOGIT_NORM) else value
                )
            if self.scaler.is_enabled():  # the scale this step used, before update() moves it (no sync)
                numbers["loss_scale"] = self.scaler._get_scale_async().float().reshape(())
            values = torch.stack([v.float() for v in numbers.values()])
            step_unless(self.optimizer, skip)
            self.task.after_step(self.model, skip)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            ready = None
            if values.device.type == "cuda":  # pinned memory, so the copy is queued rather than waited for
                values = torch.empty(values.shape, pin_memory=True).copy_(values, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
            else:
                values = values.cpu()
        return Pending(
            self.state.step,
            lr,
            self.state.tokens + launched.tokens,
            list(numbers),
            values,
            ready,
            # Several ranks: rank 0's time up to the reduction, the same number on every rank (the
            # supervisor's throughput monitor must decide alike everywhere).
            launched.seconds + (0.0 if self.world.distributed else time.perf_counter() - start),
        )

    def _reduced(self, launched: Launched, seconds: float) -> Launched:
        """The step as one process would see it: each rank's share of the loss and metrics summed over
        the ranks (a NaN anywhere is a NaN everywhere), rank 0's time and everyone's tokens.

        Decisions that hang on the clock or on a signal are taken here on rank 0's clock and on any
        rank's stop request, so that every rank stops, plans its lr and ends its budget at one step.
        """
        names = list(launched.metrics)
        own = [launched.loss.float(), *(launched.metrics[n].float() for n in names)]
        main = self.world.main
        host = torch.tensor(
            [
                launched.seconds + seconds if main else 0.0,
                self.clock_base + time.perf_counter() - self.start_time if main else 0.0,
                1.0 if self.stop_signal else 0.0,
                float(launched.tokens),
            ],
            dtype=torch.float64,
        )
        values = self.parallel.sum(torch.stack(own))  # on the device: nothing waits for it
        step_seconds, self.agreed_seconds, stops, tokens = self.parallel.sum_host(host).tolist()
        if stops and not self.stop_signal:
            self.stop_signal = "a stop request to another rank"
        self.agreed_stop = self.stop_signal if stops else None
        return Launched(values[0], dict(zip(names, values[1:])), int(tokens), step_seconds)

    def _skip_flag(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor | None:
        if self.supervisor is not None:
            limits = torch.tensor(self.supervisor.skip_limits(), dtype=torch.float64)
            if self.device.type == "cuda":  # pinned, so the copy does not wait for the device either
                limits = limits.pin_memory()
            return skip_update(loss, grad_norm, limits.to(self.device, non_blocking=True))
        if self.scaler.is_enabled():  # fp16 without the supervisor: only the scaler's overflow skip
            return (~torch.isfinite(grad_norm)).float()
        return None  # a bare loop: every update is applied, NaN included

    def read(self, pending: Pending) -> tuple[StepRecord, bool]:
        """Wait for a step's numbers: its StepRecord, and whether the device dropped its update."""
        start = time.perf_counter()
        if pending.ready is not None:
            pending.ready.synchronize()
        v = dict(zip(pending.names, pending.values.tolist()))
        record = StepRecord(
            step=pending.step,
            loss=v.pop("loss"),
            grad_norm=v.pop("grad_norm"),
            lr=pending.lr,
            tokens=pending.tokens,
            step_seconds=pending.seconds + (0.0 if self.world.distributed else time.perf_counter() - start),
            act_norm=v.pop("act_norm", math.nan),
            logit_norm=v.pop("logit_norm", math.nan),
            loss_scale=v.pop("loss_scale", None),
        )
        skipped = v.pop("skipped") > 0
        record.metrics = v  # the task's own
        return record, skipped

    def run(self) -> TrainResult:
        t = self.config.train
        self.beat(self.state.step)
        resumed = self.restore()
        if not resumed:
            self.save()  # step 0: rollbacks always have somewhere to go
        self.logbook.write(
            self.state.step,
            "info",
            "run_start",
            f"trainer {'resumed' if resumed else 'started'} at step {self.state.step} "
            f"on {self.device.type} in {str(self.dtype).removeprefix('torch.')}"
            f"{', compiled' if self.compiled else ''}, task {self.task.kind}, {self.optim.optimizer} "
            f"(process segment {self.segment})",
            {"segment": self.segment, "tokens": self.state.tokens},
        )
        self.start_time, self.clock_base = time.perf_counter(), self.state.train_seconds
        self.agreed_seconds = self.clock_base
        step_limit = t.max_steps or math.inf
        # A resumed run whose time or token budget is already spent trains no further.
        status, diagnosis, record, val_loss = self._limit_reached() or "finished", "", None, None
        evaluation: dict[str, float] = {}
        bar = tqdm(
            total=t.max_steps or None,
            initial=self.state.step,
            disable=not self.progress,
            unit="step",
            dynamic_ncols=True,
        )
        last_beat = 0.0
        pending: Pending | None = None
        with _stop_on_signals(self):
            if self._rate_check_due():  # resumed where a check was cut short
                self._check_rate()
            while status == "finished":
                # Queue the next step's forward/backward before reading the pending step's numbers, so the
                # device has work while the host waits; not when the pending step may be the last one.
                launched = None
                if pending is None and self.state.step < step_limit:
                    launched = self.launch(self.state.cursor)
                elif pending is not None and self.state.step + 1 < step_limit:
                    launched = self.launch(self.state.cursor + 1)
                if pending is not None:
                    record, dropped = self.read(pending)
                    pending, self.started = None, True
                    actions = self.supervisor.observe(record) if self.supervisor else []
                    # The device dropped the update exactly when observe() asks for skip_update; a rollback
                    # restores weights and optimizer from a checkpoint, so the update it came after is gone too.
                    rolled_back = any(a.kind == "rollback" for a in actions)
                    skip = dropped or rolled_back
                    self.state.cursor += 1
                    if not skip:
                        self.state.step += 1
                        self.steps_applied += 1
                        self.tokens_applied += record.tokens - self.state.tokens
                        self.state.tokens = record.tokens
                    self.pending_metrics.append((record.step, _metrics(record, skip)))
                    stop_reason = next((d for a in actions if (d := self.apply(a))), None)
                    if rolled_back and launched is not None:  # taken on the weights the rollback replaced
                        self.optimizer.zero_grad(set_to_none=True)
                        launched = None
                    self.faults.maybe_hang(self.state.step)
                    self.faults.maybe_fill_disk(self.state.step)
                    if stop_reason:
                        status, diagnosis = "stopped_by_supervisor", stop_reason
                        break
                    step = self.state.step
                    limit = self._limit_reached()
                    last = step >= step_limit or limit is not None  # evaluated and saved, whatever the intervals
                    if not skip and (step % t.eval_every == 0 or last):
                        with self.timer("eval"):
                            self.beat(step)
                            evaluation = self._evaluate()
                            val_loss = evaluation["val_loss"]
                        self.pending_metrics.append((step, evaluation))
                        if self.supervisor:
                            self.supervisor.evaluated(step, val_loss)
                        if self.state.best_val_loss is None or val_loss < self.state.best_val_loss:
                            self.state.best_val_loss = val_loss
                    if not skip and (step % t.checkpoint_every == 0 or last):
                        with self.timer("checkpoint"):
                            self.save(val_loss if step % t.eval_every == 0 or last else None)
                        if self.halt:
                            status, diagnosis = "stopped_by_supervisor", self.halt
                            break
                    if self._rate_check_due():
                        if launched is not None:  # taken on the weights the check may replace
                            self.optimizer.zero_grad(set_to_none=True)
                            launched = None
                        self._check_rate()
                    with self.timer("logging"):
                        if len(self.pending_metrics) >= t.log_every:
                            self.flush_metrics()
                        if time.time() - last_beat > 0.25:
                            self.beat(step)
                            last_beat = time.time()
                        bar.update(step - bar.n)
                        if self.state.cursor % t.log_every == 0:
                            postfix = {
                                "loss": f"{record.loss:.3f}",
                                "lr": f"{record.lr:.2e}",
                                "tok_s": f"{self._tokens_per_s():.0f}",
                            }
                            if t.max_minutes:
                                postfix["left"] = f"{max(0.0, t.max_minutes - self.train_seconds() / 60):.1f}min"
                            bar.set_postfix(postfix, refresh=False)
                    status = limit or status
                    if self.stopping() or status != "finished":
                        status = "stopped" if self.stopping() else status
                        break
                if launched is not None:
                    pending = self.finish(launched)
                elif self.state.step >= step_limit:
                    break
        bar.close()
        if _latest_step(self.run_dir) != self.state.step and not self.halt:
            self.save()  # a stop between checkpoints loses nothing
        self.flush_metrics()
        seconds = time.perf_counter() - self.start_time
        end_reason = {
            "finished": f"reached train.max_steps={t.max_steps}",
            "time_limit": f"reached train.max_minutes={t.max_minutes}",
            "token_limit": f"reached train.max_tokens={t.max_tokens}",
            "stopped": f"stopped by {self.stop_signal}",
            "stopped_by_supervisor": f"stopped by the supervisor: {diagnosis}",
        }[status]
        self.logbook.write(
            self.state.step,
            "info",
            "run_end",
            end_reason,
            {
                "status": "stopped" if status.startswith("stopped") else "finished",
                "tokens": self.state.tokens,
                "val_loss": val_loss,
            },
        )
        return TrainResult(
            status=status,
            steps=self.state.step,
            tokens=self.state.tokens,
            seconds=seconds,
            tokens_per_s=self._tokens_per_s(),
            final_loss=record.loss if record else float("nan"),
            val_loss=val_loss,
            timings=dict(self.timer.seconds),
            diagnosis=diagnosis,
            evaluation=evaluation,
        )

    def _tokens_per_s(self) -> float:
        return self.tokens_applied / max(time.perf_counter() - self.start_time, 1e-9)

    def _limit_reached(self) -> str | None:
        t = self.config.train
        if t.max_tokens and self.state.tokens >= t.max_tokens:
            return "token_limit"
        if t.max_minutes and self.train_seconds() >= 60 * t.max_minutes:
            return "time_limit"
        return None

    def flush_metrics(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_metrics(self.pending_metrics)
        if self.registry is None or not self.pending_metrics:
            self.pending_metrics.clear()
            return
        self.registry.log_metrics_many(self.config.name, self.pending_metrics, segment=self.segment)
        self.registry.update_run(
            self.config.name,
            step=self.state.step,
            tokens=self.state.tokens,
            best_val_loss=self.state.best_val_loss,
            tokens_per_s=self._tokens_per_s(),
        )
        self.pending_metrics.clear()


CHECKPOINT_FAILURES_TO_STOP = 3

# Compiling the model takes ~40 s on a 2-core CPU (~4 s from the warm cache) and makes a step about a
# fifth faster (README), so it pays for itself after a few hundred steps, or a few minutes.
COMPILE_MIN_STEPS = 500
COMPILE_MIN_MINUTES = 4.0


def should_compile(
    train: TrainConfig, start_step: int, device: torch.device, started_compiled: bool | None = None
) -> bool:
    """train.compile, with auto deciding by the length of the run still to go and by what the machine has.

    A resumed run under auto keeps the decision its run started with (started_compiled, from the
    checkpoint): compiled and eager kernels round differently, so switching midway would end in
    other weights than the uninterrupted run.
    """
    if train.compile == "auto" and started_compiled is not None:
        return started_compiled and can_compile(device)
    if train.compile == "auto":
        steps_enough = not train.max_steps or train.max_steps - start_step >= COMPILE_MIN_STEPS
        time_enough = not train.max_minutes or train.max_minutes >= COMPILE_MIN_MINUTES
        return steps_enough and time_enough and can_compile(device)
    return bool(train.compile)


def can_compile(device: torch.device) -> bool:
    """torch.compile generates C++ for CPUs, so it needs a compiler there; CUDA builds bring Triton."""
    if device.type != "cpu":
        return True
    return any(shutil.which(name) for name in (os.environ.get("CXX"), "g++", "c++", "clang++") if name)


def skip_update(loss: torch.Tensor, grad_norm: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
    """1.0 when the supervisor will skip this update, else 0.0, decided on the device.

    limits is Supervisor.skip_limits() as a float64 tensor; the tests are SpikeMonitor.check's, in
    the same float64 arithmetic, so the device and the supervisor never disagree.
    """
    values = torch.stack((loss, grad_norm)).double()
    mean, std, ratio_limit = limits[:6].view(2, 3).unbind(1)
    sigma, skip_spikes = limits[6], limits[7]
    spike = ((std > 0) & ((values - mean) / std > sigma)) | (values > ratio_limit)
    return (~torch.isfinite(values).all() | (spike.any() & (skip_spikes > 0))).float()


def _metrics(record: StepRecord, skipped: bool) -> dict[str, float]:
    values = {
        "loss": record.loss,
        "grad_norm": record.grad_norm,
        "lr": record.lr,
        "tokens": record.tokens,
        "act_norm": record.act_norm,
        "logit_norm": record.logit_norm,
        "step_seconds": record.step_seconds,
    }
    if record.loss_scale is not None:
        values["loss_scale"] = record.loss_scale
    values.update(record.metrics)
    if skipped:
        values["skipped"] = 1.0
    return values


def _latest_step(run_dir: Path) -> int | None:
    checkpoints = ckpt.list_checkpoints(run_dir)
    return int(checkpoints[-1].name.split("_")[1]) if checkpoints else None


@contextmanager
def _stop_on_signals(trainer: Trainer):
    """SIGINT/SIGTERM finish the current step, write a checkpoint and return; a second one kills.

    A repeat within 2 s is the same request arriving twice (a scheduler signalling every process
    of the job reaches the trainer directly and through the watchdog), not impatience.
    """
    first_time = 0.0

    def handler(signum, frame):
        nonlocal first_time
        if trainer.stop_signal:
            if time.monotonic() - first_time > 2.0:
                raise KeyboardInterrupt
            return
        first_time = time.monotonic()
        trainer.stop_signal = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def train(config: RunConfig, run_dir: Path, registry: Registry | None = None, progress: bool = True) -> TrainResult:
    """Train (or resume) the run in run_dir, whose config.yaml was written by init_run_dir.

    A run that ends well ends with a heartbeat saying so, written once every rank has reached the end
    (a barrier): whatever happens to a process after it (gloo can abort a rank whose peer closed its
    connections first) the watchdog takes for teardown, not for a crash to restart from.
    """
    trainer = Trainer(config, run_dir, registry, progress)
    result = None
    try:
        result = trainer.run()
        if registry is not None:
            status = "stopped" if result.status.startswith("stopped") else "finished"
            registry.update_run(config.name, status=status)
    finally:
        if trainer.tensorboard is not None:
            trainer.tensorboard.close()
        if result is not None:  # a rank leaving on an error skips the meeting: the watchdog stops the rest
            barrier()
            trainer.beat(trainer.state.step, ended=True)
        destroy_process_group()
    return result
