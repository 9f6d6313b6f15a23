"""Distillation: the loss against a naive full-logits reference, the teacher's cache (key, resume after an
interruption), the checks on the teacher, and a tiny run end to end through the CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, assert_user_error, keel

from keel import config as config_lib
from keel.runs.rundir import init_run_dir
from keel.tasks import distill, lm
from keel.tasks.distill import DistillLoss, DistillTask, linear_distill_loss, linear_top_k
from keel.tasks.lm import IGNORE_INDEX, linear_cross_entropy

KINDS = ["forward", "reverse", "jsd"]


def naive_loss(hidden, weight, targets, teacher_logits, k, settings: DistillLoss):
    """Full logits of both models, the buckets made by masking, log(1 − Σp) for the other bucket."""
    T, r = settings.temperature, settings.ratio
    z = hidden.flatten(0, -2) @ weight.t()  # (N, V)
    targets = targets.flatten()
    counted = targets != IGNORE_INDEX
    ce = F.cross_entropy(z, targets, ignore_index=IGNORE_INDEX, reduction="none")
    teacher = torch.log_softmax(teacher_logits.flatten(0, -2) / T, -1)
    student = torch.log_softmax(z / T, -1)
    top = teacher.topk(k, dim=-1).indices

    def buckets(log_probs):
        picked = log_probs.gather(1, top)
        if k == log_probs.shape[1]:
            return picked
        return torch.cat((picked, torch.log1p(-picked.exp().sum(-1, keepdim=True))), 1)

    q, p = buckets(teacher), buckets(student)
    if settings.kind == "forward":
        kd = (q.exp() * (q - p)).sum(-1)
    elif settings.kind == "reverse":
        kd = (p.exp() * (p - q)).sum(-1)
    else:
        b = settings.beta
        m = torch.log(b * q.exp() + (1 - b) * p.exp())
        kd = b * (q.exp() * (q - m)).sum(-1) + (1 - b) * (p.exp() * (p - m)).sum(-1)
    n = counted.sum()
    ce_mean = torch.where(counted, ce, 0.0).sum() / n
    kd_mean = torch.where(counted, kd, 0.0).sum() / n
    return (1 - r) * ce_mean + r * T * T * kd_mean, ce_mean, kd_mean


def problem(vocab_size=50, seed=0):
    torch.manual_seed(seed)
    hidden = torch.randn(3, 11, 16, dtype=torch.float64).requires_grad_()
    weight = (0.5 * torch.randn(vocab_size, 16, dtype=torch.float64)).requires_grad_()
    teacher_logits = 2 * torch.randn(3, 11, vocab_size, dtype=torch.float64)
    targets = torch.randint(0, vocab_size, (3, 11))
    targets[1, :3] = IGNORE_INDEX
    return hidden, weight, targets, teacher_logits


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [5, 50])  # with the other bucket; k = V, exact
@pytest.mark.parametrize("rows", [None, 7])  # one chunk; 7-row chunks, the last one short
@pytest.mark.parametrize("temperature", [1.0, 2.0])  # T = 1 shares softmax(z) between the two terms
def test_the_loss_equals_a_full_logits_reference_in_value_and_gradients(monkeypatch, kind, k, rows, temperature):
    if rows:
        monkeypatch.setattr(distill, "loss_chunk_rows", lambda vocab_size, d_model: rows)
    hidden, weight, targets, teacher_logits = problem()
    settings = DistillLoss(kind, temperature=temperature, ratio=0.7, beta=0.3)
    indices, log_probs = linear_top_k(teacher_logits.flatten(0, 1), torch.eye(50, dtype=torch.float64), k, temperature)
    shape = (3, 11, -1)
    got = linear_distill_loss(hidden, weight, targets, indices.view(shape), log_probs.view(shape), settings)
    expected = naive_loss(hidden, weight, targets, teacher_logits, k, settings)
    for a, b in zip(got[:3], expected):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)  # the head computes in float32
    got.loss.backward()
    grads = torch.autograd.grad(expected[0], (hidden, weight))
    torch.testing.assert_close(hidden.grad, grads[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad, grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_with_k_equal_to_the_vocabulary_the_divergence_is_exact(kind):
    hidden, weight, targets, teacher_logits = problem(vocab_size=30, seed=1)
    targets = torch.zeros_like(targets)
    indices, log_probs = linear_top_k(teacher_logits.flatten(0, 1), torch.eye(30, dtype=torch.float64), 30, 1.0)
    assert log_probs.shape[1] == 30  # no other bucket
    got = linear_distill_loss(
        hidden, weight, targets, indices.view(3, 11, -1), log_probs.view(3, 11, -1), DistillLoss(kind, 1.0, 1.0, 0.5)
    )
    p = torch.log_softmax(hidden @ weight.t(), -1)
    q = torch.log_softmax(teacher_logits, -1)
    if kind == "forward":
        exact = F.kl_div(p, q, log_target=True, reduction="none").sum(-1)
    elif kind == "reverse":
        exact = F.kl_div(q, p, log_target=True, reduction="none").sum(-1)
    else:
        m = torch.logaddexp(q + math.log(0.5), p + math.log(0.5))
        exact = 0.5 * F.kl_div(m, q, log_target=True, reduction="none").sum(-1) + 0.5 * F.kl_div(
            m, p, log_target=True, reduction="none"
        ).sum(-1)
    torch.testing.assert_close(got.kd.double(), exact.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss.double(), exact.mean(), rtol=1e-5, atol=1e-6)


def test_ratio_zero_is_plain_cross_entropy():
    hidden, weight, targets, teacher_logits = problem()
    hidden, weight = hidden.float().detach().requires_grad_(), weight.float().detach().requires_grad_()
    indices, log_probs = linear_top_k(teacher_logits.float().flatten(0, 1), torch.eye(50), 8, 1.0)
    got = linear_distill_loss(
        hidden,
        weight,
        targets,
        indices.view(3, 11, -1),
        log_probs.view(3, 11, -1),
        DistillLoss("forward", 1.5, 0.0, 0.5),
    )
    got.loss.backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    plain = linear_cross_entropy(h2, w2, targets)
    plain.loss.backward()
    assert torch.equal(got.loss, plain.loss)
    torch.testing.assert_close(hidden.grad, h2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)


# -- the task, the teacher's cache and the CLI ------------------------------------------------------

STUDENT = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.n_kv_head=2", "model.context_length=64"]
TRAIN = [s for s in TINY if not s.startswith("model.")]


def student_config(data, teacher, *sets):
    return config_lib.load(
        None,
        [
            f"data.path={data}",
            *TRAIN,
            *STUDENT,
            "task.kind=distill",
            f"distill.teacher={teacher}",
            "distill.top_k=8",
            "train.compile=false",
            *sets,
        ],
    )


def distill_task(run_dir, data, teacher, *sets) -> DistillTask:
    config = init_run_dir(student_config(data, teacher, *sets), run_dir)
    return DistillTask(config, torch.device("cpu"), torch.float32)


def cache_dirs(teacher):
    return sorted(p for p in (teacher / distill.CACHE_DIR).glob("distill-*"))


def test_batches_line_up_with_the_teacher_and_the_cache_is_reused(tiny_data, base_run, tmp_path):
    task = distill_task(tmp_path / "a", tiny_data, base_run, "distill.max_windows=40")
    [cache] = cache_dirs(base_run)
    manifest = json.loads((cache / distill.MANIFEST).read_text())
    assert manifest["k"] == 8 and manifest["context_length"] == 64
    batch = task.batch(3)
    assert torch.equal(task.batch(3).tensors["inputs"], batch.tensors["inputs"])  # a pure function of the cursor
    # the cached values are the teacher's top k on exactly the student's windows
    from keel.inference import load_run

    teacher = load_run(base_run).model
    hidden = lm.lm_hidden(teacher, batch.tensors["inputs"]).hidden
    indices, log_probs = linear_top_k(hidden.flatten(0, 1), teacher.lm_head.weight, 8, 1.0)
    assert torch.equal(batch.tensors["teacher_indices"].flatten(0, 1), indices)
    torch.testing.assert_close(batch.tensors["teacher_log_probs"].flatten(0, 1), log_probs, atol=2e-2, rtol=2e-3)
    # another student of the same teacher, data, k and T (other seed, shape) reads the same cache
    mtime = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    distill_task(tmp_path / "b", tiny_data, base_run, "distill.max_windows=40", "train.seed=7", "model.d_model=48")
    assert cache_dirs(base_run) == [cache] and {p: p.stat().st_mtime_ns for p in cache.iterdir()} == mtime


def test_the_cache_key_changes_with_teacher_data_k_and_temperature():
    base = dict(weights_hash="w", data_hash="d", k=8, temperature=1.0, context_length=64, dtype="torch.float32")
    keys = {distill.cache_key(**base)}
    for name, value in (("weights_hash", "w2"), ("data_hash", "d2"), ("k", 16), ("temperature", 2.0)):
        keys.add(distill.cache_key(**{**base, name: value}))
    assert len(keys) == 5


def test_an_interrupted_cache_build_resumes_and_equals_an_uninterrupted_one(tiny_data, base_run, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(distill, "CHUNK_BYTES", 12 * distill.record_dtype(64, 16, 512).itemsize)  # 12 windows/chunk
    sets = ("distill.max_windows=40", "distill.top_k=16", "distill.temperature=2.0")
    whole = distill_task(tmp_path / "whole", tiny_data, base_run, *sets)
    [cache] = [p for p in cache_dirs(base_run) if json.loads((p / distill.MANIFEST).read_text())["k"] == 16]
    reference = {p.name: p.read_bytes() for p in cache.glob("chunk-*.npy")}
    assert len(reference) == 4
    shutil.rmtree(cache)

    class Killed(BaseException):
        pass

    beats = []

    def heartbeat():  # dies inside the third chunk (a teacher batch is 4 windows), as a SIGKILL would: no cleanup
        beats.append(1)
        if len(beats) == 7:
            (cache / ".chunk-00002.npy.tmp").write_bytes(b"half a chunk")
            raise Killed

    config = init_run_dir(student_config(tiny_data, base_run, *sets), tmp_path / "killed")
    with pytest.raises(Killed):
        DistillTask(config, torch.device("cpu"), torch.float32, heartbeat)
    assert sorted(json.loads((cache / distill.MANIFEST).read_text())["chunks"]) == ["0", "1"]
    computed = []
    monkeypatch.setattr(distill, "linear_top_k", lambda *a: computed.append(1) or linear_top_k(*a))
    resumed = DistillTask(config, torch.device("cpu"), torch.float32)
    assert len(computed) == 6  # only the two missing chunks (whole chunks, 12 windows each), 4 windows a batch
    assert {p.name: p.read_bytes() for p in cache.glob("chunk-*.npy")} == reference
    for i in range(12):
        for name, tensor in whole.batch(i).tensors.items():
            assert torch.equal(tensor, resumed.batch(i).tensors[name]), name
    # a damaged chunk fails its checksum and is computed again, never read
    (cache / "chunk-00001.npy").write_bytes(b"garbage")
    computed.clear()
    DistillTask(config, torch.device("cpu"), torch.float32)
    assert len(computed) == 3 and (cache / "chunk-00001.npy").read_bytes() == reference["chunk-00001.npy"]


def test_a_teacher_with_another_tokenizer_or_no_checkpoint_is_refused(tiny_data, base_run, corpus_dir, tmp_path):
    from keel.data import prepare

    other = tmp_path / "other-data"
    prepare([str(corpus_dir)], other, vocab_size=400, val_fraction=0.1, progress=False)
    result = keel(*distill_args(other, base_run, tmp_path / "s1"))
    assert_user_error(result, "another tokenizer than the teacher", "--tokenizer")
    assert not (tmp_path / "s1").exists()
    empty = tmp_path / "empty-teacher"
    empty.mkdir()
    config_lib.save(config_lib.load(None, [f"data.path={tiny_data}"]), empty / "config.yaml")
    assert_user_error(keel(*distill_args(tiny_data, empty, tmp_path / "s2")), "no checkpoint", "train the teacher")


def distill_args(data, teacher, run_dir, *extra):
    sets = [f"data.path={data}", *TRAIN, *STUDENT, f"distill.teacher={teacher}", "distill.top_k=8", *extra]
    return ["distill", "--run-dir", str(run_dir), *[arg for s in sets for arg in ("--set", s)]]


def test_a_tiny_student_distils_through_the_cli(tiny_data, base_run, tmp_path):
    run_dir = tmp_path / "student"
    result = keel(*distill_args(tiny_data, base_run, run_dir, "train.max_steps=40", "distill.ratio=0.8"))
    assert result.returncode == 0, result.stderr
    from keel.runs.registry import Registry

    with Registry() as registry:
        metrics = registry.metrics("student")
    losses = [value for _, value in metrics["loss"]]
    assert losses[-1] < 0.8 * losses[0], losses
    assert {"kl", "ce", "act_norm", "logit_norm"} <= set(metrics)
    evaluated = keel("eval", str(run_dir))
    assert evaluated.returncode == 0 and "bits/byte" in evaluated.stdout, evaluated.stderr
