import json
import random
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from keel.errors import UserError
from keel.train.checkpoint import (
    capture_rng_state,
    checkpoint_step,
    find_latest_good,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)

VOCAB = 256  # byte-level: the "tokens" are the bytes of a stdlib source file


class TinyLM(nn.Module):
    """Embedding and output projection share one weight, like a GPT with tie_embeddings."""

    def __init__(self, d_model: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.mix = nn.Linear(d_model, d_model)
        self.lm_head = nn.Linear(d_model, VOCAB, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.mix(self.embed(idx))))  # (B, T, VOCAB)


@pytest.fixture(scope="module")
def corpus() -> torch.Tensor:
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_bytes()
    return torch.tensor(list(text), dtype=torch.long)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, corpus: torch.Tensor) -> None:
    # Batch offsets come from the global torch RNG, so a resume must restore it to match.
    starts = torch.randint(0, len(corpus) - 17, (4,))
    batch = torch.stack([corpus[s : s + 17] for s in starts])  # (B, T+1)
    logits = model(batch[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def save(run_dir: Path, step: int, val_loss: float | None = None, keep_last: int = 10) -> Path:
    torch.manual_seed(step)
    return save_checkpoint(run_dir, step, TinyLM(), {"cursor": step}, {"val_loss": val_loss}, keep_last)


def steps(paths: list[Path]) -> list[int]:
    return [checkpoint_step(p) for p in paths]


def test_round_trip_is_bit_exact_and_keeps_weights_tied(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    state = {
        "cursor": {"step": 7, "skipped": [3, 4]},
        "lr_scale": 0.5,
        "note": "x",
        "flag": None,
        "moments": (torch.ones(2), 3),
    }
    path = save_checkpoint(
        tmp_path, 7, model, state, {"val_loss": 2.5, "tokens": 700, "config": {"model": {"d_model": 16}}}, keep_last=3
    )
    assert path == tmp_path / "checkpoints" / "step_00000007"
    assert sorted(p.name for p in path.iterdir()) == ["MANIFEST.json", "meta.json", "model.safetensors", "state.pt"]
    assert verify_checkpoint(path) is None

    torch.manual_seed(1)
    fresh = TinyLM()
    train_state, meta = load_checkpoint(path, fresh, "cpu")
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    assert fresh.lm_head.weight is fresh.embed.weight  # still one tensor: training updates both
    assert train_state["cursor"] == {"step": 7, "skipped": [3, 4]} and train_state["lr_scale"] == 0.5
    assert (
        train_state["note"] == "x"
        and train_state["flag"] is None
        and torch.equal(train_state["moments"][0], torch.ones(2))
    )
    assert meta["step"] == 7 and meta["tokens"] == 700 and meta["val_loss"] == 2.5
    assert meta["config"] == {"model": {"d_model": 16}} and meta["keel_version"]
    # The state file itself must be loadable without executing code.
    assert torch.load(path / "state.pt", weights_only=True)["cursor"]["step"] == 7


def test_resumed_adamw_and_rng_take_the_same_next_step(tmp_path, corpus):
    torch.manual_seed(0)
    random.seed(0)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(3):
        train_step(model, optimizer, corpus)
    state = {"optimizer": optimizer.state_dict(), "rng": capture_rng_state()}
    path = save_checkpoint(tmp_path, 3, model, state, {"val_loss": None}, keep_last=2)
    python_draw = random.random()
    train_step(model, optimizer, corpus)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(123)  # a different process state that the checkpoint must overwrite
    random.seed(123)
    resumed = TinyLM()
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    train_state, _ = load_checkpoint(path, resumed, "cpu")
    resumed_optimizer.load_state_dict(train_state["optimizer"])
    restore_rng_state(train_state["rng"])
    assert random.random() == python_draw
    train_step(resumed, resumed_optimizer, corpus)
    for name, tensor in expected.items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_state_that_would_execute_code_on_load_is_refused_at_save(tmp_path):
    # A numpy integer pickles fine but torch.load(weights_only=True) refuses it; better to learn
    # that when the checkpoint is written than when a crashed run tries to resume.
    with pytest.raises(AssertionError, match="train_state must hold only tensors"):
        save_checkpoint(tmp_path, 1, TinyLM(), {"cursor": np.int64(3)}, {}, keep_last=2)
    assert list_checkpoints(tmp_path) == []
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_pruning_keeps_last_k_plus_best_val_loss(tmp_path):
    losses = {100: 3.0, 200: 2.0, 300: None, 400: 2.5, 500: float("nan"), 600: 2.6}
    for step, loss in losses.items():
        save(tmp_path, step, loss, keep_last=2)
    assert steps(list_checkpoints(tmp_path)) == [200, 500, 600]


def test_pruning_drops_checkpoints_of_an_abandoned_timeline(tmp_path):
    for step in (100, 200, 300):
        save(tmp_path, step, 1.0 / step)
    save(tmp_path, 150, 5.0)  # resumed from step 100 after a rollback
    assert steps(list_checkpoints(tmp_path)) == [100, 150]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 5, TinyLM(), {"cursor": "first"}, {"val_loss": 1.0}, keep_last=2)
    path = save_checkpoint(tmp_path, 5, TinyLM(), {"cursor": "second"}, {"val_loss": 1.0}, keep_last=2)
    assert list_checkpoints(tmp_path) == [path] and verify_checkpoint(path) is None
    assert load_checkpoint(path, TinyLM())[0] == {"cursor": "second"}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000005"]


def flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-10])


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: flip_byte(p / "model.safetensors"), "model.safetensors sha256 mismatch"),
        (lambda p: flip_byte(p / "state.pt"), "state.pt sha256 mismatch"),
        (lambda p: truncate(p / "model.safetensors"), "model.safetensors truncated"),
        (lambda p: (p / "meta.json").unlink(), "meta.json missing"),
        (lambda p: (p / "MANIFEST.json").unlink(), "MANIFEST.json missing"),
        (lambda p: (p / "MANIFEST.json").write_text("{not json"), "MANIFEST.json unreadable"),
    ],
    ids=[
        "flipped-weights",
        "flipped-state",
        "truncated-weights",
        "missing-meta",
        "missing-manifest",
        "garbled-manifest",
    ],
)
def test_damaged_latest_checkpoint_is_skipped_with_a_reason(tmp_path, damage, reason):
    for step in (10, 20, 30):
        save(tmp_path, step)
    latest = list_checkpoints(tmp_path)[-1]
    damage(latest)
    assert verify_checkpoint(latest).startswith(reason)
    good, skipped = find_latest_good(tmp_path)
    assert good == tmp_path / "checkpoints" / "step_00000020"
    assert [(p, r.startswith(reason)) for p, r in skipped] == [(latest, True)]
    with pytest.raises(UserError, match=f"checkpoint .*step_00000030 is corrupt \\({reason}"):
        load_checkpoint(latest, TinyLM())


def test_find_latest_good_before_a_step_and_with_nothing_good(tmp_path):
    assert find_latest_good(tmp_path) == (None, [])
    for step in (10, 20, 30):
        save(tmp_path, step)
    assert steps([find_latest_good(tmp_path, before_step=30)[0]]) == [20]
    assert steps([find_latest_good(tmp_path, before_step=21)[0]]) == [20]
    flip_byte(tmp_path / "checkpoints" / "step_00000010" / "model.safetensors")
    good, skipped = find_latest_good(tmp_path, before_step=20)
    assert good is None and steps([p for p, _ in skipped]) == [10]


def test_crash_mid_write_is_never_picked_and_is_cleaned(tmp_path):
    save(tmp_path, 10)
    # What a crash leaves behind: a newer step, half written, under its temporary name.
    half = tmp_path / "checkpoints" / ".tmp-step_00000020"
    shutil.copytree(tmp_path / "checkpoints" / "step_00000010", half)
    (half / "MANIFEST.json").unlink()
    assert steps(list_checkpoints(tmp_path)) == [10]
    assert steps([find_latest_good(tmp_path)[0]]) == [10]
    save(tmp_path, 20)
    assert not half.exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000010", "step_00000020"]


def test_model_of_another_shape_is_a_user_error(tmp_path):
    path = save_checkpoint(tmp_path, 1, TinyLM(d_model=16), {}, {}, keep_last=1)
    with pytest.raises(
        UserError, match="step_00000001 does not fit the model because the model's shape differs from the run's config"
    ):
        load_checkpoint(path, TinyLM(d_model=32))

    untied = TinyLM()
    untied.lm_head.weight = nn.Parameter(untied.embed.weight.detach().clone())
    with pytest.raises(UserError, match="(?s)does not fit the model.*lm_head.weight"):
        load_checkpoint(path, untied)


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "checkpoints" / "step_00000001", TinyLM())


def test_meta_json_is_plain_json(tmp_path):
    path = save_checkpoint(tmp_path, 42, TinyLM(), {}, {"tokens": 4200, "val_loss": 1.5}, keep_last=1)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 42 and meta["tokens"] == 4200 and meta["saved_at"] > 0
