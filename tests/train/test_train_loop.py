"""The trainer: its build-time choices (compilation, activation checkpointing) and the order of a step."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY

from keel import config as config_lib
from keel.runs.rundir import init_run_dir
from keel.train.loop import COMPILE_MIN_MINUTES, COMPILE_MIN_STEPS, Trainer, can_compile, should_compile, train
from keel.train.precision import autocast


def run(data: Path, run_dir: Path, *extra: str):
    config = init_run_dir(config_lib.load(None, [f"data.path={data}", *TINY, *extra]), run_dir)
    return train(config, run_dir, registry=None, progress=False)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    latest = max(run_dir.glob("checkpoints/step_*"))
    return load_file(latest / "model.safetensors")


def test_compile_auto_waits_for_a_run_long_enough_to_repay_it():
    cpu = torch.device("cpu")
    train_config = config_lib.load(None).train
    assert train_config.compile == "auto"
    train_config.max_steps = COMPILE_MIN_STEPS
    assert should_compile(train_config, 0, cpu)
    assert not should_compile(train_config, 1, cpu)  # a fresh start near the end is not worth compiling for
    # ... but a resumed run keeps the kernels it started with, or it would not repeat itself
    assert should_compile(train_config, COMPILE_MIN_STEPS - 1, cpu, started_compiled=True)
    assert not should_compile(train_config, 0, cpu, started_compiled=False)
    train_config.max_steps = 20
    assert not should_compile(train_config, 0, cpu)
    train_config.max_steps, train_config.max_minutes = 0, COMPILE_MIN_MINUTES  # a time budget long enough
    assert should_compile(train_config, 0, cpu)
    train_config.max_minutes = COMPILE_MIN_MINUTES / 2
    assert not should_compile(train_config, 0, cpu)
    train_config.compile = True
    assert should_compile(train_config, 0, cpu)
    train_config.compile = False
    train_config.max_steps, train_config.max_minutes = 10 * COMPILE_MIN_STEPS, 0
    assert not should_compile(train_config, 0, cpu)


def test_compile_auto_stays_eager_on_a_cpu_without_a_cxx_compiler(monkeypatch):
    train_config = config_lib.load(None, [f"train.max_steps={2 * COMPILE_MIN_STEPS}"]).train
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", "")  # no g++, c++ or clang++ to be found
    assert not should_compile(train_config, 0, torch.device("cpu"))
    assert should_compile(train_config, 0, torch.device("cuda"))  # Triton, not a C++ compiler
    train_config.compile = True  # asked for explicitly: the user gets torch's own error
    assert should_compile(train_config, 0, torch.device("cpu"))


def test_activation_checkpointing_trains_the_same_model(tiny_data, tmp_path):
    plain = run(tiny_data, tmp_path / "plain", "train.max_steps=12")
    recomputed = run(tiny_data, tmp_path / "recomputed", "train.max_steps=12", "train.activation_checkpointing=true")
    assert recomputed.steps == plain.steps == 12
    assert recomputed.final_loss == plain.final_loss
    for name, weight in final_weights(tmp_path / "plain").items():
        torch.testing.assert_close(final_weights(tmp_path / "recomputed")[name], weight, atol=0, rtol=0, msg=name)


def test_activation_checkpointing_keeps_far_fewer_activations(tiny_data, tmp_path):
    saved_bytes = {}
    for setting in ("false", "true"):
        config = config_lib.load(
            None, [f"data.path={tiny_data}", *TINY, "model.n_layer=4", f"train.activation_checkpointing={setting}"]
        )
        trainer = Trainer(init_run_dir(config, tmp_path / setting), tmp_path / setting, registry=None, progress=False)
        tensors = trainer.task.batch(0).tensors
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            trainer.parallel.forward(tensors)
        saved_bytes[setting] = total
    # what is kept for backward: everything in every block, or only each block's input (+ the head)
    assert saved_bytes["true"] < 0.5 * saved_bytes["false"]


# Like a training step's activations, 4 blocks of 48 MiB are allocated and then freed, six times; it
# prints the pages the last time faulted in. With `trainer`, a CPU Trainer is built first.
REUSE_PROBE = """
import resource, sys, torch
from pathlib import Path
if sys.argv[1] == "trainer":
    from keel import config
    from keel.runs.rundir import init_run_dir
    from keel.train.loop import Trainer
    run_dir = Path(sys.argv[2])
    Trainer(init_run_dir(config.load(None, sys.argv[3:]), run_dir), run_dir, registry=None, progress=False)
for step in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(12 << 20) for _ in range(4)]
    del blocks
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_a_cpu_trainer_reuses_freed_memory_instead_of_faulting_it_in_again(tiny_data, tmp_path):
    def faults(*args: str) -> int:
        probe = subprocess.run([sys.executable, "-c", REUSE_PROBE, *args], capture_output=True, text=True)
        assert probe.returncode == 0, probe.stderr
        return int(probe.stdout.split()[-1])

    pages = 4 * (48 << 20) // 4096
    # glibc's default maps blocks above 32 MiB afresh and unmaps them on free: faulted in every time
    assert faults("plain") > pages // 2
    assert faults("trainer", str(tmp_path / "run"), f"data.path={tiny_data}", *TINY, "train.device=cpu") < pages // 20


@pytest.mark.skipif(not can_compile(torch.device("cpu")), reason="torch.compile needs a C++ compiler on a CPU")
def test_compiled_step_matches_eager_and_still_feeds_the_supervisor(tiny_data, tmp_path):
    records = {}
    for setting in ("false", "true"):  # one block, as the compiled resume test: one compile warms both
        config = config_lib.load(None, [f"data.path={tiny_data}", *TINY, "model.n_layer=1", f"train.compile={setting}"])
        trainer = Trainer(init_run_dir(config, tmp_path / setting), tmp_path / setting, registry=None, progress=False)
        assert trainer.compiled == (setting == "true")
        x = trainer.task.batch(0).tensors["inputs"]
        with torch.no_grad(), autocast(trainer.device, trainer.dtype):
            logits = trainer.model(x)  # before the step updates the weights
        records[setting], _ = trainer.read(trainer.finish(trainer.launch(0)))
    eager, compiled = records["false"], records["true"]
    assert compiled.loss == pytest.approx(eager.loss, rel=1e-4)
    assert compiled.grad_norm == pytest.approx(eager.grad_norm, rel=1e-3)
    # the activation and logit statistics are part of the compiled loss
    assert compiled.act_norm == pytest.approx(eager.act_norm, rel=1e-4) and eager.act_norm > 0
    assert compiled.logit_norm == pytest.approx(eager.logit_norm, rel=1e-4)
    # ... and the loss head, which never keeps the logits, reports their true size
    assert eager.logit_norm == pytest.approx(logits.float().square().mean().sqrt().item(), rel=1e-3)


def test_a_steps_numbers_are_read_only_after_the_next_step_is_queued(tiny_data, tmp_path, monkeypatch):
    """On a GPU, reading a step's loss before queueing more work would leave the device idle while the
    host judges it: the loop reads step k only after queueing step k + 1's forward/backward."""
    events = []
    real_launch, real_read = Trainer.launch, Trainer.read

    def launch(trainer, cursor):
        events.append(f"launch {cursor}")
        return real_launch(trainer, cursor)

    def read(trainer, pending):
        events.append(f"read {pending.step}")
        return real_read(trainer, pending)

    monkeypatch.setattr(Trainer, "launch", launch)
    monkeypatch.setattr(Trainer, "read", read)
    result = run(tiny_data, tmp_path / "run", "train.max_steps=4", "train.eval_every=2")
    assert result.status == "finished" and result.steps == 4
    # no forward/backward is queued past the last step
    assert events == ["launch 0", "launch 1", "read 0", "launch 2", "read 1", "launch 3", "read 2", "read 3"]


def test_evaluation_between_a_steps_forward_and_its_record_leaves_the_statistics_alone(tiny_data, tmp_path):
    config = config_lib.load(None, [f"data.path={tiny_data}", *TINY])
    trainer = Trainer(init_run_dir(config, tmp_path), tmp_path, registry=None, progress=False)
    launched = trainer.launch(0)
    act_sq = launched.metrics["act_mean_square"].clone()
    assert act_sq > 0 and launched.metrics["logit_mean_square"] > 0
    trainer._evaluate()  # the loop evaluates after queueing the next step, before its statistics are taken
    record, dropped = trainer.read(trainer.finish(launched))
    assert record.act_norm == pytest.approx(act_sq.sqrt().item()) and not dropped


def test_a_rollback_throws_away_the_step_queued_on_the_old_weights(tiny_data, tmp_path, monkeypatch):
    """The rollback is decided while the next step's forward/backward is already queued; that step's
    gradients belong to the replaced weights and must not reach the restored ones."""
    from keel.supervisor.policy import Action, Supervisor

    real_observe, real_read = Supervisor.observe, Trainer.read
    records = []

    def observe(supervisor, record):
        actions = real_observe(supervisor, record)
        if record.step == 5 and not supervisor.repairs_used:
            supervisor.repairs_used += 1
            # skip no batch: the queued step trained on the very batch the loop goes on with
            actions.append(Action("rollback", "test", {"before_step": 5, "skip_batches": 0}))
        return actions

    def read(trainer, pending):
        record, dropped = real_read(trainer, pending)
        records.append(record)
        return record, dropped

    monkeypatch.setattr(Supervisor, "observe", observe)
    monkeypatch.setattr(Trainer, "read", read)
    assert run(tiny_data, tmp_path / "run", "train.max_steps=8").status == "finished"
    after_rollback = [r for r in records if r.step == 0][1]  # back at step 0's weights, on batch 6
    fresh = Trainer(
        init_run_dir(config_lib.load(None, [f"data.path={tiny_data}", *TINY]), tmp_path / "fresh"),
        tmp_path / "fresh",
        registry=None,
        progress=False,
    )
    expected, _ = fresh.read(fresh.finish(fresh.launch(6)))
    assert after_rollback.grad_norm == expected.grad_norm and after_rollback.loss == expected.loss
