"""DPO: the losses and their soft targets, per-token log-probs through the chunked head, the reference
computed as pairs are first seen (LoRA: adapters off), calibration to rater shares, and the
likelihood-displacement monitor."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TRAIN, run

from keel import config as config_lib
from keel.inference import load_run
from keel.models.lora import FrozenRows, lora_for_run
from keel.runs.rundir import init_run_dir, load_run_config
from keel.supervisor.monitors import StepRecord
from keel.tasks import lm
from keel.tasks.dpo import DPOTask, LikelihoodDisplacementMonitor, preference_loss
from keel.tasks.lm import IGNORE_INDEX, linear_log_probs, sequence_log_probs


def test_hard_labels_give_exactly_the_standard_losses():
    torch.manual_seed(0)
    h, beta, one = torch.randn(64) * 3, 0.1, torch.ones(64)
    assert torch.equal(preference_loss(h, one, beta, "sigmoid"), -F.logsigmoid(beta * h))  # DPO
    assert torch.equal(preference_loss(h, one, beta, "ipo"), (h - 1 / (2 * beta)) ** 2)  # IPO
    assert torch.equal(preference_loss(h, one, beta, "hinge"), F.relu(1 - beta * h))  # SLiC hinge


def test_a_soft_target_is_the_optimum_and_a_50_50_pair_pulls_nowhere():
    h = torch.zeros(3, requires_grad=True)
    p = torch.tensor([0.5, 0.9, 1.0])
    preference_loss(h, p, 0.5, "sigmoid").sum().backward()
    assert h.grad[0] == 0 and h.grad[1] < 0 and h.grad[2] < h.grad[1]  # (descent raises h for p > 0.5)
    for p_true in (0.2, 0.5, 0.9):  # the minimum of the sigmoid loss is at sigma(beta h) = p
        grid = torch.linspace(-40, 40, 8001)
        best = grid[preference_loss(grid, torch.full_like(grid, p_true), 0.5, "sigmoid").argmin()]
        assert torch.sigmoid(0.5 * best).item() == pytest.approx(p_true, abs=2e-3)


@pytest.mark.parametrize("rows", [None, 7])  # one chunk; 7-row chunks, the last one short
def test_per_token_log_probs_equal_log_softmax_in_value_and_gradients(monkeypatch, rows):
    if rows:
        monkeypatch.setattr(lm, "loss_chunk_rows", lambda vocab_size, d_model: rows)
    torch.manual_seed(0)
    hidden = torch.randn(3, 17, 32, requires_grad=True)
    weight = (0.3 * torch.randn(100, 32)).requires_grad_()
    targets = torch.randint(0, 100, (3, 17))
    targets[1, :4] = IGNORE_INDEX
    got = linear_log_probs(hidden, weight, targets)
    full = torch.log_softmax(hidden @ weight.t(), dim=-1)
    expected = torch.where(targets != IGNORE_INDEX, full.gather(-1, targets.clamp(min=0)[..., None])[..., 0], 0.0)
    torch.testing.assert_close(got, expected)
    upstream = torch.randn(3, 17)  # an arbitrary function of the log-probs, as DPO's loss is
    (got * upstream).sum().backward()
    grads = torch.autograd.grad((expected * upstream).sum(), (hidden, weight))
    torch.testing.assert_close(hidden.grad, grads[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weight.grad, grads[1], atol=1e-5, rtol=1e-4)


def dpo_task(run_dir, *sets) -> DPOTask:
    config = init_run_dir(config_lib.load(None, [*TINY_TRAIN, "train.compile=false", *sets]), run_dir)
    return DPOTask(config, torch.device("cpu"), torch.float32)


def test_reference_log_probs_are_computed_when_first_seen_and_kept_in_the_task_state(pref_data, base_run, tmp_path):
    sets = [f"data.path={pref_data}", "task.kind=dpo", f"init.from={base_run}"]
    task = dpo_task(tmp_path / "run", *sets)
    assert all(np.isnan(values).all() for values in task.reference.values())  # nothing computed up front
    batch = task.batch(0)
    # the reference is the init run: at step 0 the policy's log-probs are the reference's
    log_probs, _ = sequence_log_probs(task.build_model(), batch.tensors["inputs"], batch.tensors["targets"])
    torch.testing.assert_close(log_probs.detach(), batch.tensors["reference"], atol=1e-4, rtol=1e-5)
    assert (~np.isnan(task.reference["train"])).sum() == len(batch.tensors["inputs"])  # just this batch's
    assert not (tmp_path / "run" / "cache").exists()
    # the values travel in the checkpoint: a resumed task reads them instead of computing (a poisoned
    # value shows it was read) and computes only what is still missing
    state = task.state_dict()
    first = int(np.flatnonzero(~np.isnan(task.reference["train"]))[0])
    state["reference"]["train"][first] = 123.0
    resumed = dpo_task(tmp_path / "run", *sets)
    resumed.load_state_dict(state)
    assert resumed.reference["train"][first] == 123.0
    assert torch.equal(resumed.batch(1).tensors["reference"], task.batch(1).tensors["reference"])


def test_a_lora_policy_with_its_adapters_off_is_its_base_bit_for_bit(pref_data, base_run, tmp_path):
    """So the LoRA DPO reference needs no second copy of the model."""
    sets = [f"data.path={pref_data}", "task.kind=dpo", f"init.from={base_run}", "lora.rank=4", "lora.alpha=8"]
    task = dpo_task(tmp_path / "run", *sets)
    policy = task.build_model()
    lora_for_run(policy, task.config)
    assert isinstance(policy.embed, FrozenRows)  # the chat markers the base lacks: trainable rows
    with torch.no_grad():  # a policy that has trained: adapters and added rows moved
        for name, param in policy.named_parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    ids = np.arange(8)
    expected = task._reference_log_probs("train", ids)  # no policy bound: the frozen copy of the base
    task.bind(policy)
    assert task.frozen is not None and task.policy is policy
    assert np.array_equal(task._reference_log_probs("train", ids), expected)
    assert policy.training  # the policy's mode is given back
    batch = task._rows("train", np.arange(4))
    moved, _ = sequence_log_probs(policy, batch.tensors["inputs"], batch.tensors["targets"])
    assert not torch.allclose(moved, batch.tensors["reference"])  # adapters on again afterwards


def test_likelihood_displacement_is_signalled_once_with_the_numbers():
    monitor = LikelihoodDisplacementMonitor(patience=30)
    signals = []
    for step in range(120):
        falling = step >= 40
        record = StepRecord(
            step,
            0.6,
            1.0,
            1e-3,
            0,
            0.1,
            1.0,
            1.0,
            metrics={"chosen_logp": -50.0 - (0.2 * (step - 40) if falling else 0.0), "margin": 0.01 * step},
        )
        if (signal := monitor.observe(record)) is not None:
            signals.append(signal)
    assert len(signals) == 1 and signals[0].name == "likelihood_displacement" and signals[0].trouble == "warning"
    assert signals[0].evidence["chosen_logp"] < signals[0].evidence["chosen_logp_before"] - 1
    assert "fell from" in signals[0].message
    # a steady chosen log-prob with a growing margin is the healthy case
    healthy = LikelihoodDisplacementMonitor(patience=30)
    assert not any(
        healthy.observe(
            StepRecord(s, 0.6, 1.0, 1e-3, 0, 0.1, 1.0, 1.0, metrics={"chosen_logp": -50.0, "margin": 0.01 * s})
        )
        for s in range(200)
    )


SHARES = (0.5, 0.7, 0.9)  # the true share of raters preferring "chosen", by the prompt's class


def calibration_data(base_run, folder, seed=0):
    """Prompts of three classes (a class word among random filler words); every pair offers the same two
    replies. Ten simulated raters vote per pair with the class's true share; held-out pairs have new fillers."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "lambda", "zeta"]
    lines = []
    for i in range(600):
        k = i % len(SHARES)
        filler = " ".join(rng.choice(words, 3))
        votes = int(rng.binomial(10, SHARES[k]))
        lines.append(
            json.dumps(
                {
                    "prompt": f"class{k} {filler}:",
                    "chosen": " yes",
                    "rejected": " no",
                    "votes": {"chosen": votes, "rejected": 10 - votes},
                }
            )
        )
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    from keel.data import prepare

    prepare([str(folder / "pairs.jsonl")], folder / "data", tokenizer=str(base_run), val_fraction=0.15, progress=False)
    return folder / "data"


def implied_preference_by_class(run_dir) -> dict[int, float]:
    """sigma(beta h) of the trained run on its held-out pairs, averaged per class."""
    config = load_run_config(run_dir)
    task = DPOTask(config, torch.device("cpu"), torch.float32)
    model, val = load_run(run_dir).model, task.splits["val"]
    pairs = np.arange(len(val) // 2)
    batch = task._rows("val", pairs)
    with torch.no_grad():
        log_probs, _ = sequence_log_probs(model, batch.tensors["inputs"], batch.tensors["targets"])
    ratio = log_probs - batch.tensors["reference"]
    preference = torch.sigmoid(config.dpo.beta * (ratio[: len(pairs)] - ratio[len(pairs) :]))
    classes = [task.data.tokenizer.decode(val.get(2 * p)[0].tolist()).split()[0] for p in pairs]
    return {k: float(preference[[c == f"class{k}" for c in classes]].mean()) for k in range(len(SHARES))}


def task_sets(data, base_run):
    return [f"data.path={data}", "task.kind=dpo", f"init.from={base_run}"]


def test_soft_labels_calibrate_the_implied_preference_while_hard_labels_push_it_to_one(base_run, tmp_path):
    data = calibration_data(base_run, tmp_path)
    common = [
        *task_sets(data, base_run),
        "dpo.beta=0.5",
        "train.batch_size=16",
        "train.max_steps=150",
        "optim.lr=2e-3",
        "optim.warmup_steps=10",
        "optim.weight_decay=0",
        "train.eval_every=50",
        "train.checkpoint_every=150",
        "optim.schedule=constant",
        "supervisor.enabled=false",
    ]
    soft, hard = tmp_path / "soft", tmp_path / "hard"
    run(soft, *common)
    run(hard, *common, "dpo.soft_labels=false")
    soft_shares, hard_shares = implied_preference_by_class(soft), implied_preference_by_class(hard)
    for k, share in enumerate(SHARES):
        assert soft_shares[k] == pytest.approx(share, abs=0.05), (soft_shares, hard_shares)
        assert hard_shares[k] > max(share, 0.9), hard_shares
