"""Several processes on gloo (2 CPU ranks): DDP and FSDP2 equal one process, one verdict for all ranks,
sharded checkpoints that load at another world size, a dead rank restarts the group, bad layouts refused."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_user_error, keel, tiny_train_args

from keel.inference import load_run
from keel.runs.registry import Registry
from keel.supervisor.logbook import read_logbook
from keel.train import checkpoint as ckpt

# constant lr: a run stopped at step 16 and resumed follows the schedule of the uninterrupted one
STEPS = ["train.grad_accum=2", "train.compile=false", "optim.schedule=constant", "train.max_steps=20"]
# FSDP2 shards the matrices Muon (the pretraining default) needs whole, so FSDP2 runs train with AdamW
ADAMW = "optim.optimizer=adamw"


def train(data, run_dir, *sets, nproc=1, env=None):
    result = keel(*tiny_train_args(data, run_dir, *STEPS, *sets), "--nproc", str(nproc), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("finished at step") == 1, result.stderr[-3000:]  # one summary, not one per rank
    return run_dir


def losses(run_dir, registry_file=None) -> list[float]:
    with Registry(registry_file) as registry:
        return [value for _, value in registry.metrics(run_dir.name, "loss")["loss"]]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return dict(load_run(run_dir).model.state_dict())


def entries(run_dir, kind=None) -> list[dict]:
    return [e for e in read_logbook(run_dir / "logbook.jsonl") if kind is None or e["kind"] == kind]


@pytest.fixture(scope="module")
def two_ranks(tiny_data, tmp_path_factory):
    """Two DDP ranks, one micro-batch each (with a registry of its own)."""
    folder = tmp_path_factory.mktemp("two")
    run_dir = train(tiny_data, folder / "two", nproc=2, env={"KEEL_HOME": str(folder / "home")})
    return run_dir, losses(run_dir, folder / "home" / "registry.sqlite")


@pytest.fixture(scope="module")
def one_rank(tiny_data, tmp_path_factory):
    """The reference: one process, two micro-batches a step (with a registry of its own)."""
    folder = tmp_path_factory.mktemp("one")
    run_dir = train(tiny_data, folder / "one", env={"KEEL_HOME": str(folder / "home")})
    return run_dir, losses(run_dir, folder / "home" / "registry.sqlite")


@pytest.fixture(scope="module")
def one_rank_adamw(tiny_data, tmp_path_factory):
    """The reference for FSDP2: one process, two micro-batches a step, AdamW."""
    folder = tmp_path_factory.mktemp("one_adamw")
    run_dir = train(tiny_data, folder / "one", ADAMW, env={"KEEL_HOME": str(folder / "home")})
    return run_dir, losses(run_dir, folder / "home" / "registry.sqlite")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_equal_one_rank_with_two_micro_batches(
    parallel, one_rank, one_rank_adamw, two_ranks, tiny_data, tmp_path
):
    if parallel == "ddp":  # with Muon
        (one_rank, reference), (two, two_losses) = one_rank, two_ranks
    else:
        one_rank, reference = one_rank_adamw
        two = train(tiny_data, tmp_path / "two", f"train.parallel={parallel}", nproc=2)
        two_losses = losses(two)
    assert len(two_losses) == len(reference) == 20
    # equal per step within float32 reduction order; a gloo AVG that summed would double every gradient
    assert two_losses == pytest.approx(reference, rel=1e-5)
    final, expected = weights(two), weights(one_rank)
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], atol=2e-5, rtol=1e-4)
    sharded = ckpt.is_sharded(ckpt.list_checkpoints(two)[-1])
    assert sharded == (parallel == "fsdp")  # DDP's replicated state is written once, the ordinary way
    assert [e["name"] for e in entries(two, "fault")] == []


def test_a_nan_on_one_rank_is_skipped_by_every_rank_under_torchrun(tiny_data, tmp_path):
    """Started as on a cluster: keel writes the run directory, torchrun starts keel's worker per rank."""
    run_dir = tmp_path / "nan"
    written = keel(*tiny_train_args(tiny_data, run_dir, *STEPS), "--write-only")
    assert written.returncode == 0 and not ckpt.list_checkpoints(run_dir), written.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "KEEL_FAULTS": "nan@12:1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*torchrun, "-m", "keel.train.worker", str(run_dir)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    actions = [e for e in entries(run_dir, "action") if e["name"] == "skip_update"]
    assert [e["step"] for e in actions] == [12], actions
    # every checkpoint compared the ranks' weights: a rank that had applied the update would have crashed it
    assert not entries(run_dir, "fault") and not entries(run_dir, "restart")
    with Registry() as registry:
        assert registry.get_run(run_dir.name)["step"] == 20


def test_the_worker_refuses_a_directory_keel_train_did_not_write(tmp_path):
    """What torchrun starts on every rank: a mistyped RUN_DIR is one sentence and exit 2, and nothing
    is written into it."""
    (tmp_path / "empty").mkdir()
    for run_dir in (tmp_path / "missing", tmp_path / "empty"):
        worker = [sys.executable, "-m", "keel.train.worker", str(run_dir)]
        assert_user_error(subprocess.run(worker, capture_output=True, text=True), str(run_dir), "keel train")
    assert not (tmp_path / "missing").exists() and not any((tmp_path / "empty").iterdir())


def test_spikes_on_one_rank_roll_back_once_everywhere(tiny_data, tmp_path):
    sets = ["model.d_model=128", "train.max_steps=100", "train.eval_every=100", "train.checkpoint_every=20"]
    run_dir = train(
        tiny_data, tmp_path / "spikes", *sets, nproc=2, env={"KEEL_FAULTS": "spike@60:1,spike@61:1,spike@62:1"}
    )
    kinds = [e["name"] for e in entries(run_dir, "action")]
    assert kinds.count("rollback") == 1 and kinds.count("skip_update") >= 2, kinds
    assert not entries(run_dir, "fault")  # the ranks' weights agreed at every checkpoint after it
    with Registry() as registry:
        assert registry.get_run(run_dir.name)["step"] == 100


def test_sharded_checkpoints_load_at_another_world_size(one_rank_adamw, tiny_data, tmp_path):
    one_rank, _ = one_rank_adamw
    run_dir = tmp_path / "chain"
    train(tiny_data, run_dir, "train.max_steps=6", ADAMW)  # one process
    train(tiny_data, run_dir, "train.max_steps=13", "train.parallel=fsdp", nproc=2)  # 1 -> 2: sharded on load
    assert ckpt.is_sharded(ckpt.list_checkpoints(run_dir)[-1])
    # the one-process commands read the shards: eval, sample, export
    evaluated = keel("eval", str(run_dir))
    assert evaluated.returncode == 0 and "step 13" in evaluated.stdout, evaluated.stderr[-2000:]
    sampled = keel("sample", str(run_dir), "--prompt", "def ", "--max-new-tokens", "8")
    assert sampled.returncode == 0 and sampled.stdout.startswith("def "), sampled.stderr[-2000:]
    exported = keel("export", str(run_dir), "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0 and (tmp_path / "hf" / "model.safetensors").is_file(), exported.stderr[-2000:]
    marker = json.loads((tmp_path / "hf" / "keel_export.json").read_text())
    assert marker["step"] == 13 and len(marker["checkpoint_sha256"]) == 64  # the shards' digest
    # ... and a run that starts from it (init.from takes its best checkpoint, the sharded one)
    assert ckpt.is_sharded(ckpt.find_best(run_dir))
    started = weights(train(tiny_data, tmp_path / "from", f"init.from={run_dir}", "train.max_steps=1", ADAMW))
    shards = ckpt.read_weights(ckpt.find_best(run_dir))
    assert set(started) == set(shards)
    for name in shards:  # one warm-up step (lr 6e-4) away from the shards' weights
        torch.testing.assert_close(started[name], shards[name], atol=2e-3, rtol=0)
    train(tiny_data, run_dir, "train.parallel=fsdp")  # 2 -> 1: DCP reshards the shards for one process
    final, expected = weights(run_dir), weights(one_rank)  # keel's one-process loading reads shards too
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], atol=2e-5, rtol=1e-4)
    # a sharded checkpoint resumed into another model shape: one sentence
    train(tiny_data, tmp_path / "shaped", "train.max_steps=4", "train.parallel=fsdp", nproc=2)
    args = tiny_train_args(tiny_data, tmp_path / "shaped", *STEPS, "train.parallel=fsdp", "model.d_model=96")
    result = keel(*args, "--nproc", "2")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "model" in result.stderr.strip().splitlines()[-1]


def test_a_killed_rank_restarts_the_group_from_the_checkpoint_bit_identically(two_ranks, tiny_data, tmp_path):
    whole, _ = two_ranks
    killed = train(tiny_data, tmp_path / "killed", nproc=2, env={"KEEL_FAULTS": "kill@12:1"})
    crash = [e for e in entries(killed, "fault") if e["name"] == "crash"]
    assert len(crash) == 1 and crash[0]["evidence"]["rank"] == 1 and crash[0]["evidence"]["signal"] == "SIGKILL"
    assert "rank 1" in crash[0]["message"]
    assert [e["name"] for e in entries(killed, "restart")] == ["restart"]
    final = ckpt.list_checkpoints(killed)[-1] / ckpt.WEIGHTS
    assert final.read_bytes() == (ckpt.list_checkpoints(whole)[-1] / ckpt.WEIGHTS).read_bytes()


def test_a_rank_hung_in_a_collective_is_killed_and_the_group_restarted(tiny_data, tmp_path):
    run_dir = train(
        tiny_data, tmp_path / "hung", "watchdog.hang_timeout_s=5", nproc=2, env={"KEEL_FAULTS": "hang@12:1"}
    )
    hang = [e for e in entries(run_dir, "fault") if e["name"] == "hang"]
    assert len(hang) == 1 and "rank" in hang[0]["evidence"], hang
    with Registry() as registry:
        assert registry.get_run(run_dir.name)["step"] == 20


def test_bad_layouts_are_refused_with_one_sentence(tiny_data, tmp_path):
    args = tiny_train_args(tiny_data, tmp_path / "bad", *STEPS)
    assert_user_error(keel(*args, "--nproc", "64"), "--nproc 64", "cores")
    assert_user_error(keel(*args, "--nproc", "0"), "--nproc")
    assert_user_error(keel(*args, "--set", "train.grad_accum=3", "--nproc", "2"), "train.grad_accum=3", "multiple of 2")
    muon = ["--set", "optim.optimizer=muon", "--set", "train.parallel=fsdp"]
    assert_user_error(keel(*args, *muon, "--nproc", "2"), "muon", "train.parallel=ddp")
    compiled = ["--set", "train.compile=true", "--set", "train.parallel=fsdp"]
    assert_user_error(keel(*args, *compiled, "--nproc", "2"), "train.compile=true", "train.parallel=fsdp")
    assert_user_error(keel(*args, "--set", "train.parallel=zero3"), "train.parallel")
    assert not (tmp_path / "bad").exists()  # refused before anything was written


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_fine_tuning_tasks_match_one_rank(kind, sft_data, pref_data, base_run, tmp_path):
    """SFT's micro-batches carry different numbers of loss tokens: each is weighted by its share of the
    whole step across both ranks, as one process weights its two. DPO's reference log-probs are
    computed on each rank for its own pairs."""
    data = sft_data if kind == "sft" else pref_data
    sets = [f"task.kind={kind}", f"init.from={base_run}", "train.max_steps=8", "train.checkpoint_every=8"]
    one = train(data, tmp_path / "one", *sets)
    two = train(data, tmp_path / "two", *sets, nproc=2)
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    final, expected = weights(two), weights(one)
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], atol=2e-5, rtol=1e-4)
