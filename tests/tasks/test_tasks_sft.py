"""SFT: packing that keeps examples apart, the end token inside the loss, step-wide normalisation, resume."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, assert_user_error, keel, kill_at_checkpoint, run, tiny_train_args

from keel import config as config_lib
from keel.runs.registry import Registry
from keel.runs.rundir import init_run_dir
from keel.tasks.lm import IGNORE_INDEX, linear_log_probs, lm_hidden
from keel.train.loop import Trainer


def sft_sets(sft_data, base_run, *extra):
    return [f"data.path={sft_data}", "task.kind=sft", f"init.from={base_run}", *extra]


def trainer(run_dir, *sets) -> Trainer:
    config = init_run_dir(config_lib.load(None, [*TINY_TRAIN, "train.compile=false", *sets]), run_dir)
    return Trainer(config, run_dir, registry=None, progress=False)


def per_position_log_probs(model, tensors) -> torch.Tensor:
    with torch.no_grad():
        out = lm_hidden(model, tensors["inputs"], tensors.get("positions"), tensors.get("segments"))
        return linear_log_probs(out.hidden, model.lm_head.weight, tensors["targets"])  # (B, T)


def test_a_packed_row_gives_each_example_the_loss_it_has_alone(sft_data, base_run, tmp_path):
    t = trainer(tmp_path / "run", *sft_sets(sft_data, base_run))
    batch = t.task.batch(0)
    segments = batch.tensors["segments"][0]
    assert segments.max() >= 2, "the row should hold several examples"
    packed = per_position_log_probs(t.model, batch.tensors)[0]
    row = t.task._row(0)
    for segment, example in enumerate(row):
        alone = t.task._pack(t.task.train, [np.array([example])]).tensors
        expected = per_position_log_probs(
            t.model, {k: v[:, : int((segments == segment).sum())] for k, v in alone.items()}
        )[0]
        torch.testing.assert_close(packed[segments == segment], expected, atol=2e-5, rtol=1e-5)
        # positions restart at 0 for every example
        assert batch.tensors["positions"][0][segments == segment][0] == 0


def test_every_example_ends_with_its_end_token_inside_the_loss(sft_data, base_run, tmp_path):
    t = trainer(tmp_path / "run", *sft_sets(sft_data, base_run))
    tensors = t.task.batch(3).tensors
    ends = {t.task.data.eot_id, t.task.data.end_id}
    for r in range(tensors["inputs"].shape[0]):
        segments, targets = tensors["segments"][r], tensors["targets"][r]
        for segment in segments[segments >= 0].unique():
            last_target = targets[segments == segment][-1].item()
            assert last_target in ends
        # the prompt carries no loss: the first target of every example is masked
        assert targets[0] == IGNORE_INDEX


def test_loss_is_normalised_over_the_whole_step_not_per_micro_batch(sft_data, base_run, tmp_path):
    """batch_size 4 x grad_accum 2 sees the same rows as batch_size 8 in one micro-batch, so the two
    gradients are equal; a mean of the two micro-batches' means would weight short examples up."""
    one = trainer(tmp_path / "one", *sft_sets(sft_data, base_run, "train.batch_size=8"))
    two = trainer(tmp_path / "two", *sft_sets(sft_data, base_run, "train.batch_size=4", "train.grad_accum=2"))
    counts = [two.task.batch(i).units for i in (0, 1)]
    assert counts[0] != counts[1], "the test needs micro-batches with different numbers of loss tokens"
    for t in (one, two):
        t.launched = t.launch(0)
    torch.testing.assert_close(two.launched.loss, one.launched.loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(one.model.named_parameters(), two.model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # what per-micro-batch means would have given instead
    losses = [two.task.loss(two.model, two.task.batch(i).tensors).loss.item() for i in (0, 1)]
    assert abs(sum(losses) / 2 - one.launched.loss.item()) > 1e-4


def test_loss_on_all_tokens_counts_the_prompts_too(sft_data, base_run, tmp_path):
    completion = trainer(tmp_path / "c", *sft_sets(sft_data, base_run)).task.batch(0)
    everything = trainer(tmp_path / "a", *sft_sets(sft_data, base_run, "sft.loss_on=all")).task.batch(0)
    assert everything.units == everything.tokens > completion.units


def test_sft_lowers_the_held_out_completion_loss(sft_data, base_run, tmp_path):
    start = trainer(tmp_path / "start", *sft_sets(sft_data, base_run))
    before = start.task.evaluate(start.model)["val_loss"]
    result = run(tmp_path / "run", *sft_sets(sft_data, base_run, "train.max_steps=40"))
    assert result.val_loss < before - 0.3, (before, result.val_loss)


def _final_weights(run_dir, step):
    return (run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_exact_resume_after_sigkill(kind, sft_data, pref_data, base_run, tmp_path):
    """Kill the whole process tree mid-run and run the same command again: same losses, same weights."""
    data = sft_data if kind == "sft" else pref_data
    sets = [f"task.kind={kind}", f"init.from={base_run}", "train.max_steps=20", "train.compile=false"]
    env = {**os.environ, "KEEL_HOME": str(tmp_path / "home")}
    reference = subprocess.run(
        [sys.executable, "-m", "keel.cli", *tiny_train_args(data, tmp_path / "ref", *sets)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert reference.returncode == 0, reference.stderr
    args = [sys.executable, "-m", "keel.cli", *tiny_train_args(data, tmp_path / "killed", *sets)]
    kill_at_checkpoint(args, tmp_path / "killed", 10, env)
    assert not (tmp_path / "killed" / "checkpoints" / "step_00000020").exists()
    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _final_weights(tmp_path / "killed", 20) == _final_weights(tmp_path / "ref", 20)
    with Registry(tmp_path / "home" / "registry.sqlite") as registry:
        assert registry.metrics("killed", "loss") == registry.metrics("ref", "loss")
        assert len(registry.segments("killed")) == 2


def test_bad_fine_tuning_runs_are_refused_with_one_sentence(tiny_data, sft_data, pref_data, base_run, tmp_path):
    # DPO needs a reference run
    assert_user_error(keel(*tiny_train_args(pref_data, tmp_path / "r", "task.kind=dpo")), "init.from")
    # a data dir of the wrong kind for the task
    assert_user_error(
        keel(*tiny_train_args(sft_data, tmp_path / "r", "task.kind=dpo", f"init.from={base_run}")), "preference"
    )
    assert_user_error(keel(*tiny_train_args(tiny_data, tmp_path / "r", "task.kind=sft")), "text")
    # an init run that is not a run, and one whose shape is overridden
    assert_user_error(
        keel(*tiny_train_args(sft_data, tmp_path / "r", "task.kind=sft", f"init.from={tmp_path}")),
        "not a keel run directory",
    )
    assert_user_error(
        keel(*tiny_train_args(sft_data, tmp_path / "r", "task.kind=sft", f"init.from={base_run}", "model.d_model=128")),
        "model.d_model",
    )
    assert not (tmp_path / "r").exists()


def test_data_of_another_tokenizer_than_the_init_run_is_refused(corpus_dir, base_run, tmp_path):
    from keel.data import prepare

    prepare([str(corpus_dir)], tmp_path / "other", vocab_size=300, val_fraction=0.2, progress=False)
    lines = [json.dumps({"prompt": f"def f{i}():\n", "completion": f"    return {i}\n"}) for i in range(40)]
    (tmp_path / "sft.jsonl").write_text("\n".join(lines) + "\n")
    prepare([str(tmp_path / "sft.jsonl")], tmp_path / "sft", tokenizer=str(tmp_path / "other"), progress=False)
    result = keel(*tiny_train_args(tmp_path / "sft", tmp_path / "r", "task.kind=sft", f"init.from={base_run}"))
    assert_user_error(result, "another tokenizer", f"--tokenizer {base_run}")
    assert not (tmp_path / "r").exists()


def test_keel_eval_reports_what_fits_each_task(sft_data, pref_data, base_run, tmp_path):
    run(tmp_path / "sft", *sft_sets(sft_data, base_run, "train.max_steps=5"))
    result = keel("eval", str(tmp_path / "sft"))
    assert result.returncode == 0 and "completion loss" in result.stdout, result.stderr
    run(
        tmp_path / "dpo",
        f"data.path={pref_data}",
        "task.kind=dpo",
        f"init.from={tmp_path / 'sft'}",
        "train.max_steps=5",
    )
    result = keel("eval", str(tmp_path / "dpo"))
    assert result.returncode == 0, result.stderr
    for words in ("preference loss", "reward accuracy", "margin", "kl"):
        assert words in result.stdout
    assert_user_error(keel("eval", str(tmp_path / "dpo"), "--data", str(pref_data)), "--data")
