"""The trainer's build-time choices: compilation and activation checkpointing."""

from pathlib import Path

import pytest
import torch

from keel import config as config_lib
from keel.runs.rundir import init_run_dir
from keel.train.loop import COMPILE_MIN_STEPS, Trainer, can_compile, should_compile, train
from keel.train.precision import autocast

from conftest import TINY


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
    assert not should_compile(train_config, 1, cpu)  # a resume near the end is not worth compiling for
    train_config.max_steps = 20
    assert not should_compile(train_config, 0, cpu)
    train_config.compile = True
    assert should_compile(train_config, 0, cpu)
    train_config.compile = False
    train_config.max_steps = 10 * COMPILE_MIN_STEPS
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
        config = config_lib.load(None, [f"data.path={tiny_data}", *TINY, "model.n_layer=4",
                                        f"train.activation_checkpointing={setting}"])
        trainer = Trainer(init_run_dir(config, tmp_path / setting), tmp_path / setting, registry=None, progress=False)
        x, y = trainer._batch(0)
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            trainer.forward(x, y)
        saved_bytes[setting] = total
    # what is kept for backward: everything in every block, or only each block's input (+ the head)
    assert saved_bytes["true"] < 0.5 * saved_bytes["false"]


@pytest.mark.skipif(not can_compile(torch.device("cpu")), reason="torch.compile needs a C++ compiler on a CPU")
def test_compiled_step_matches_eager_and_still_feeds_the_supervisor(tiny_data, tmp_path):
    records = {}
    for setting in ("false", "true"):
        config = config_lib.load(None, [f"data.path={tiny_data}", *TINY, f"train.compile={setting}"])
        trainer = Trainer(init_run_dir(config, tmp_path / setting), tmp_path / setting, registry=None, progress=False)
        assert (trainer.forward is trainer.model) == (setting == "false")
        records[setting] = trainer.step()
    eager, compiled = records["false"], records["true"]
    assert compiled.loss == pytest.approx(eager.loss, rel=1e-4)
    assert compiled.grad_norm == pytest.approx(eager.grad_norm, rel=1e-3)
    # the activation and logit monitors read forward hooks, which must survive compilation
    assert compiled.act_norm == pytest.approx(eager.act_norm, rel=1e-4) and eager.act_norm > 0
    assert compiled.logit_norm == pytest.approx(eager.logit_norm, rel=1e-4)
    # ... and the loss head, which never keeps the logits, reports their true size
    x, _ = trainer._batch(0)
    with torch.no_grad(), autocast(trainer.device, trainer.dtype):
        logits, _ = trainer.model(x)
    assert eager.logit_norm == pytest.approx(logits.float().square().mean().sqrt().item(), rel=1e-3)
