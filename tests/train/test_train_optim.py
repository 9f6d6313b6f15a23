import sysconfig
from pathlib import Path

import pytest
import torch

from keel import config as config_lib
from keel.config import ModelConfig, resolve_optimizer
from keel.models.gpt import GPT
from keel.tasks.lm import token_loss
from keel.train import optim
from keel.train.optim import MUON_MOMENTUM, build_optimizer, lr_at, reset_moments, step_unless


def test_schedules_warm_up_then_end_at_the_floor():
    for schedule in ("cosine", "wsd"):
        c = config_lib.load(None, [f"optim.schedule={schedule}", "optim.warmup_steps=10", "optim.lr=1e-3"]).optim
        lrs = [lr_at(s, c, 100) for s in range(100)]
        assert lrs[0] == 1e-4 and lrs[9] == 1e-3  # linear warmup reaches the peak
        assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
        assert abs(lr_at(100, c, 100) - 1e-3 * c.min_lr_ratio) < 1e-12
    wsd = config_lib.load(None, ["optim.decay_fraction=0.2", "optim.warmup_steps=10"]).optim
    assert lr_at(79, wsd, 100) == wsd.lr  # stable phase holds the peak until the last 20%
    assert lr_at(90, wsd, 100) < wsd.lr


def test_no_weight_decay_on_norms_and_embeddings():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 4, bias=True))
    opt = build_optimizer(model, optim_config("adamw"))
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


# -- Muon -------------------------------------------------------------------------------------

BLOCK_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    fields = dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, context_length=32, vocab_size=256, qk_norm=True)
    return GPT(ModelConfig(**{**fields, **overrides}))


def optim_config(optimizer: str = "muon", lr: float = 3e-3) -> config_lib.OptimConfig:
    return config_lib.load(None, [f"optim.optimizer={optimizer}", f"optim.lr={lr}"]).optim


@pytest.fixture(scope="module")
def python_bytes() -> torch.Tensor:
    """(8, 33) windows of a stdlib source file's bytes: real text, byte-level vocabulary."""
    data = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_bytes()
    return torch.tensor([list(data[i * 33 : (i + 1) * 33]) for i in range(8)], dtype=torch.long)


def train_steps(model: GPT, optimizer, batch: torch.Tensor, num_steps: int) -> list[float]:
    losses = []
    for _ in range(num_steps):
        loss = token_loss(model, {"inputs": batch[:, :-1], "targets": batch[:, 1:]}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("tie", [True, False])
def test_muon_gets_exactly_the_block_matrices_and_adamw_the_rest(tie):
    model = tiny_gpt(tie_embeddings=tie)
    opt = build_optimizer(model, optim_config())
    names = {id(p): name for name, p in model.named_parameters()}  # a tied weight is named once
    (muon,), (decay, no_decay) = opt.muon.param_groups, opt.adamw.param_groups
    assert sorted(names[id(p)] for p in muon["params"]) == sorted(
        name for name in names.values() if name.startswith("blocks.") and name.split(".")[-2] in BLOCK_MATRICES
    )
    assert len(muon["params"]) == 2 * len(BLOCK_MATRICES)
    assert [names[id(p)] for p in decay["params"]] == ([] if tie else ["lm_head.weight"])
    assert {names[id(p)] for p in no_decay["params"]} == {n for n in names.values() if "norm" in n} | {"embed.weight"}
    assert muon["weight_decay"] == decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    every = [id(p) for group in opt.param_groups for p in group["params"]]
    assert sorted(every) == sorted(names)  # each parameter once, none missing
    assert muon["momentum"] == MUON_MOMENTUM and muon["adjust_lr_fn"] == "match_rms_adamw"


def test_adamw_is_one_plain_fused_adamw():
    opt = build_optimizer(tiny_gpt(), optim_config("adamw"))
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"]
    decay, no_decay = opt.param_groups
    assert len(decay["params"]) == 2 * len(BLOCK_MATRICES) and no_decay["weight_decay"] == 0.0


def test_muon_lowers_the_loss(python_bytes):
    model = tiny_gpt()
    losses = train_steps(model, build_optimizer(model, optim_config()), python_bytes, 15)
    assert losses[-1] < losses[0] - 1.0, losses


def test_param_groups_carry_the_lr_the_loop_sets_to_both_optimizers(python_bytes):
    model = tiny_gpt()
    opt = build_optimizer(model, optim_config())
    for group in opt.param_groups:
        group["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    train_steps(model, opt, python_bytes, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # lr 0 moved nothing


def test_state_dict_round_trip_continues_bit_identically(python_bytes, tmp_path):
    model = tiny_gpt()
    opt = build_optimizer(model, optim_config())
    train_steps(model, opt, python_bytes, 3)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "state.pt")

    resumed = tiny_gpt()
    resumed_opt = build_optimizer(resumed, optim_config())
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    train_steps(model, opt, python_bytes, 3)
    train_steps(resumed, resumed_opt, python_bytes, 3)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_reset_moments_zeroes_muons_momentum_with_exp_avg_only(python_bytes):
    model = tiny_gpt()
    opt = build_optimizer(model, optim_config())
    train_steps(model, opt, python_bytes, 2)
    muon_states, adamw_states = list(opt.muon.state.values()), list(opt.adamw.state.values())
    reset_moments(opt, ["exp_avg_sq"])
    assert all(s["momentum_buffer"].abs().sum() > 0 for s in muon_states)
    assert all(not s["exp_avg_sq"].any() and s["exp_avg"].abs().sum() > 0 for s in adamw_states)
    reset_moments(opt, ["exp_avg"])
    assert all(not s["momentum_buffer"].any() for s in muon_states)
    assert all(not s["exp_avg"].any() and s["step"] == 2 for s in adamw_states)  # AdamW keeps its step count
    train_steps(model, opt, python_bytes, 1)
    assert all(s["momentum_buffer"].abs().sum() > 0 for s in muon_states)  # and it builds up again


def test_reset_moments_on_plain_adamw(python_bytes):
    model = tiny_gpt()
    opt = build_optimizer(model, optim_config("adamw"))
    train_steps(model, opt, python_bytes, 1)
    reset_moments(opt, ["exp_avg", "exp_avg_sq"])
    assert all(not s["exp_avg"].any() and not s["exp_avg_sq"].any() for s in opt.state.values())


def optimizer_state(opt) -> list[torch.Tensor]:
    parts = getattr(opt, "optimizers", (opt,))
    return [t.clone() for part in parts for state in part.state.values() for t in state.values()]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_step_the_device_drops_leaves_weights_and_optimizer_untouched(python_bytes, optimizer):
    dropped, stepped = tiny_gpt(), tiny_gpt()
    opts = {id(m): build_optimizer(m, optim_config(optimizer)) for m in (dropped, stepped)}
    for model in (dropped, stepped):
        train_steps(model, opts[id(model)], python_bytes, 2)
    for model, skip in ((dropped, 1.0), (stepped, 0.0)):
        opt = opts[id(model)]
        weights, state = [p.detach().clone() for p in model.parameters()], optimizer_state(opt)
        loss = token_loss(model, {"inputs": python_bytes[:, :-1], "targets": python_bytes[:, 1:]}).loss
        loss.backward()
        step_unless(opt, torch.tensor(skip))
        opt.zero_grad(set_to_none=True)
        changed = [not torch.equal(a, b) for a, b in zip(weights, model.parameters())]
        changed_state = [not torch.equal(a, b) for a, b in zip(state, optimizer_state(opt))]
        if skip:  # weights, moments and AdamW's step counts as they were
            assert not any(changed) and not any(changed_state)
        else:
            assert all(changed) and all(changed_state)
    assert not hasattr(opts[id(dropped)], "found_inf")
    # ... and the next step after a dropped one is the same as if it had never been tried
    train_steps(dropped, opts[id(dropped)], python_bytes, 1)
    for a, b in zip(dropped.parameters(), stepped.parameters()):
        assert torch.equal(a, b)


@pytest.fixture(params=["cpu", "accelerator"])
def flag_path(request, monkeypatch):
    """keel's Muon reads a CPU flag on the host and selects on an accelerator's flag on the device;
    "accelerator" takes the device path on the CPU."""
    if request.param == "accelerator":
        monkeypatch.setattr(optim, "_free_to_read", lambda flag: False)
    return request.param


def test_keels_muon_steps_as_torchs_does_bit_for_bit(python_bytes, flag_path):
    """keel's Muon only adds the device-side drop: with nothing dropped (no flag, or a 0 flag), its
    weights and momentum equal torch.optim.Muon's exactly, tall and wide matrices alike."""
    ours, theirs = tiny_gpt(), tiny_gpt()
    ours_opt, theirs_opt = build_optimizer(ours, optim_config()), build_optimizer(theirs, optim_config())
    theirs_opt.muon = torch.optim.Muon(theirs_opt.muon.param_groups[0]["params"], **theirs_opt.muon.defaults)
    theirs_opt.optimizers = (theirs_opt.muon, theirs_opt.adamw)
    assert type(theirs_opt.muon) is torch.optim.Muon and type(ours_opt.muon) is not torch.optim.Muon
    train_steps(ours, ours_opt, python_bytes, 2)
    train_steps(theirs, theirs_opt, python_bytes, 2)
    for _ in range(2):  # with the flag
        token_loss(ours, {"inputs": python_bytes[:, :-1], "targets": python_bytes[:, 1:]}).loss.backward()
        step_unless(ours_opt, torch.tensor(0.0))
        ours_opt.zero_grad(set_to_none=True)
    train_steps(theirs, theirs_opt, python_bytes, 2)
    shapes = {tuple(p.shape) for p in ours_opt.muon.param_groups[0]["params"]}
    assert any(r > c for r, c in shapes) and any(r < c for r, c in shapes)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(optimizer_state(ours_opt), optimizer_state(theirs_opt)))


def test_a_dropped_step_leaves_no_trace_of_a_nan_gradient(python_bytes, flag_path):
    """... and on an accelerator the host never reads the flag, so it never waits for the verdict."""
    model = tiny_gpt()
    opt = build_optimizer(model, optim_config())
    train_steps(model, opt, python_bytes, 1)
    weights, state = [p.detach().clone() for p in model.parameters()], optimizer_state(opt)
    token_loss(model, {"inputs": python_bytes[:, :-1], "targets": python_bytes[:, 1:]}).loss.backward()
    for param in model.parameters():
        param.grad[0] = float("nan")

    def host_read(*args):
        raise AssertionError("the skip flag was read on the host")

    with pytest.MonkeyPatch.context() as patch:
        if flag_path == "accelerator":
            patch.setattr(torch.Tensor, "__bool__", host_read)
            patch.setattr(torch.Tensor, "item", host_read)
        step_unless(opt, torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(state, optimizer_state(opt)))


def test_grad_scaler_unscales_steps_and_skips_non_finite_updates(python_bytes):
    # GradScaler runs only for fp16 on CUDA in keel; its logic is the same on the CPU. As in keel's loop
    # without the supervisor, the skip is decided on the device from the gradient norm.
    def scaled_step(model, opt, scaler, corrupt=False):
        loss = token_loss(model, {"inputs": python_bytes[:, :-1], "targets": python_bytes[:, 1:]}).loss
        scaler.scale(loss).backward()
        if corrupt:
            model.blocks[0].mlp.up_proj.weight.grad[0, 0] = float("inf")
        scaler.unscale_(opt)
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        step_unless(opt, (~torch.isfinite(norm)).float())
        scaler.update()
        opt.zero_grad(set_to_none=True)

    plain, scaled = tiny_gpt(), tiny_gpt()
    train_steps(plain, build_optimizer(plain, optim_config()), python_bytes, 1)
    opt, scaler = build_optimizer(scaled, optim_config()), torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled_step(scaled, opt, scaler)
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(a, b)  # a power-of-two scale divides out exactly
    before = [p.detach().clone() for p in scaled.parameters()]
    scaled_step(scaled, opt, scaler, corrupt=True)
    assert all(torch.equal(a, b) for a, b in zip(before, scaled.parameters()))  # neither part stepped
    assert scaler.get_scale() == 2.0**9


def test_auto_takes_muon_for_pretraining_from_scratch_and_adamw_for_the_rest(tmp_path):
    def chosen(*sets: str) -> str:
        return resolve_optimizer(config_lib.load(None, list(sets))).optimizer

    assert config_lib.load(None).optim.optimizer == "auto"
    assert chosen() == "muon" and chosen("train.parallel=ddp") == "muon"
    init = f"init.from={tmp_path}"
    assert chosen(init) == "adamw"  # continued pretraining: weights another optimizer shaped
    assert chosen("task.kind=sft") == "adamw" and chosen("task.kind=diffusion") == "adamw"
    assert chosen("task.kind=distill", f"distill.teacher={tmp_path}") == "adamw"
    assert chosen("task.kind=dpo", init) == "adamw"
    assert chosen("lora.rank=4", init) == "adamw" and chosen("train.parallel=fsdp") == "adamw"
    assert chosen("optim.optimizer=adamw") == "adamw" and chosen("optim.optimizer=muon", init) == "muon"
