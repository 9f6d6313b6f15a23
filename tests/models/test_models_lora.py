"""LoRA: adapters on a frozen base, checkpoints of the adapters only, exact resume, merge, PEFT's format."""

import json
import shutil

import pytest
import safetensors.torch
import torch
from conftest import assert_user_error, keel, run, tiny_train_args

from keel.config import LoRAConfig, ModelConfig
from keel.errors import UserError
from keel.inference import load_run
from keel.models.gpt import GPT
from keel.models.lora import LoRALinear, apply_lora, merge_lora, write_peft_adapter
from keel.train import checkpoint as ckpt


def tiny_model(vocab_size: int = 97, tie: bool = True, mlp: str = "swiglu") -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        d_model=64,
        context_length=32,
        vocab_size=vocab_size,
        tie_embeddings=tie,
        mlp=mlp,
    )
    return GPT(config).eval()


def randomise_adapters(model: GPT) -> None:
    """Trained-looking adapters (B is zero at the start, which would hide a wrong merge)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def test_adapters_start_as_the_base_and_only_they_train():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(idx)
    apply_lora(model, LoRAConfig(rank=4, targets="q_proj,v_proj"), base_vocab=97)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), before, rtol=0, atol=0)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(
        f"blocks.{i}.attn.{proj}.lora_{ab}" for i in range(2) for proj in ("q_proj", "v_proj") for ab in "ab"
    )


@pytest.mark.parametrize("tie", [True, False])
def test_merged_model_gives_the_logits_of_the_adapted_one(tie):
    model = tiny_model(vocab_size=101, tie=tie)
    base_logits_input = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(3))
    apply_lora(model, LoRAConfig(rank=4, alpha=8), base_vocab=97)  # 4 tokens the base lacks: trainable rows
    randomise_adapters(model)
    with torch.no_grad():
        adapted = model(base_logits_input)
        assert not torch.allclose(tiny_model(vocab_size=101, tie=tie)(base_logits_input), adapted)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (model.lm_head.weight is model.embed.weight) == tie
    assert set(model.state_dict()) == set(tiny_model(vocab_size=101, tie=tie).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(base_logits_input), adapted, atol=1e-5, rtol=1e-5)


def test_a_target_that_matches_no_layer_is_refused():
    with pytest.raises(UserError, match="lora.targets names qkv_proj, which matches no linear layer"):
        apply_lora(tiny_model(), LoRAConfig(rank=4, targets="q_proj,qkv_proj"), base_vocab=97)
    with pytest.raises(UserError, match="blocks.7.attn.q_proj"):
        apply_lora(tiny_model(), LoRAConfig(rank=4, targets="blocks.7.attn.q_proj"), base_vocab=97)
    # a relu2 MLP has no gate_proj: "all" takes the layers there are, naming it is refused
    relu2 = tiny_model(mlp="relu2")
    apply_lora(relu2, LoRAConfig(rank=4), base_vocab=97)
    assert sum(isinstance(m, LoRALinear) for m in relu2.modules()) == 2 * 6
    with pytest.raises(UserError, match="gate_proj"):
        apply_lora(tiny_model(mlp="relu2"), LoRAConfig(rank=4, targets="gate_proj"), base_vocab=97)


# -- LoRA runs on the tiny base run -----------------------------------------------------------------


def lora_sets(data, base_run, *extra):
    return [f"data.path={data}", f"init.from={base_run}", "lora.rank=4", "lora.alpha=8", *extra]


def weights_of(run_dir, step=None):
    checkpoints = ckpt.list_checkpoints(run_dir)
    path = checkpoints[-1] if step is None else next(p for p in checkpoints if ckpt.checkpoint_step(p) == step)
    return safetensors.torch.load_file(path / ckpt.WEIGHTS)


def test_lora_sft_run_saves_adapters_only_and_leaves_the_base_alone(sft_data, base_run, tmp_path):
    base_before = weights_of(base_run)
    result = run(tmp_path / "lora", *lora_sets(sft_data, base_run, "task.kind=sft", "lora.targets=all"))
    assert result.status == "finished"
    saved = weights_of(tmp_path / "lora")
    # the adapters of 7 linear layers in 2 blocks, and the chat markers' rows the base lacks
    assert sorted(saved) == sorted(
        [f"blocks.{i}.{part}.lora_{ab}" for i in range(2) for part in _PARTS for ab in "ab"] + ["embed.added"]
    )
    assert saved["embed.added"].shape[0] == 4  # <|system|> <|user|> <|assistant|> <|end|>
    assert sum(t.numel() for t in saved.values()) < sum(t.numel() for t in base_before.values()) / 4
    meta = ckpt.read_meta(ckpt.list_checkpoints(tmp_path / "lora")[-1])
    assert (
        meta["lora_base"]["weights_sha256"]
        == json.loads((ckpt.find_best(base_run) / ckpt.MANIFEST).read_text())["files"][ckpt.WEIGHTS]["sha256"]
    )
    for name, tensor in weights_of(base_run).items():
        assert torch.equal(tensor, base_before[name]), name
    # the adapters learned something: the run is better than its base on its own val split
    assert result.val_loss is not None
    lora_run = load_run(tmp_path / "lora")
    assert not any(isinstance(m, LoRALinear) for m in lora_run.model.modules())  # folded in for use


_PARTS = [f"attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")
]


def test_lora_dpo_run_trains_the_adapters_against_its_base(pref_data, base_run, tmp_path):
    """The reference is the policy with its adapters off: no second copy."""
    result = run(tmp_path / "dpo", *lora_sets(pref_data, base_run, "task.kind=dpo", "train.max_steps=10"))
    assert result.status == "finished"
    assert all(".lora_" in name or name == "embed.added" for name in weights_of(tmp_path / "dpo"))


def test_lora_run_resumes_exactly(tiny_data, base_run, tmp_path):
    # a constant lr, so that the first half (max_steps=10) follows the schedule of the whole run
    sets = lora_sets(tiny_data, base_run, "lora.dropout=0.1", "optim.schedule=constant", "train.max_steps=20")
    run(tmp_path / "whole", *sets)
    run(tmp_path / "halves", *sets[:-1], "train.max_steps=10")
    run(tmp_path / "halves", *sets)  # resumes at step 10
    whole, halves = weights_of(tmp_path / "whole"), weights_of(tmp_path / "halves")
    assert whole.keys() == halves.keys()
    for name in whole:
        assert torch.equal(whole[name], halves[name]), name


def test_adapters_are_refused_on_another_base(tiny_data, base_run, tmp_path):
    other = tmp_path / "other-base"
    shutil.copytree(base_run, other)
    run(tmp_path / "lora", *lora_sets(tiny_data, other, "train.max_steps=10"))
    # the base changes under the run: its best checkpoint now holds other weights
    best = ckpt.find_best(other)
    state = safetensors.torch.load_file(best / ckpt.WEIGHTS)
    state["norm_f.weight"] = state["norm_f.weight"] * 1.5
    safetensors.torch.save_file(state, best / ckpt.WEIGHTS)
    manifest = json.loads((best / ckpt.MANIFEST).read_text())
    manifest["files"][ckpt.WEIGHTS] = {
        "sha256": ckpt.sha256_file(best / ckpt.WEIGHTS),
        "size": (best / ckpt.WEIGHTS).stat().st_size,
    }
    (best / ckpt.MANIFEST).write_text(json.dumps(manifest))

    resumed = keel(*tiny_train_args(tiny_data, tmp_path / "lora", *lora_sets(tiny_data, other, "train.max_steps=20")))
    assert_user_error(resumed, "were trained on", "point init.from at the original base")
    with pytest.raises(UserError, match="were trained on"):
        load_run(tmp_path / "lora")


def test_merge_writes_a_plain_run_that_evaluates_the_same(tiny_data, base_run, tmp_path):
    run(tmp_path / "lora", *lora_sets(tiny_data, base_run, "train.max_steps=10"))
    merged = keel("merge", str(tmp_path / "lora"), "--out", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr
    assert sorted(weights_of(tmp_path / "merged")) == sorted(weights_of(base_run))
    evals = [keel("eval", str(tmp_path / name)) for name in ("lora", "merged")]
    assert all(e.returncode == 0 for e in evals), [e.stderr for e in evals]
    assert evals[0].stdout == evals[1].stdout

    assert_user_error(keel("merge", str(base_run), "--out", str(tmp_path / "x")), "has no adapters")
    assert_user_error(
        keel("merge", str(tmp_path / "lora"), "--out", str(tmp_path / "merged")), "already exists and is not empty"
    )
    assert not (tmp_path / "x").exists()


def test_bad_lora_settings_are_refused_before_anything_is_written(tiny_data, base_run, tmp_path):
    cases = [
        (["lora.rank=4"], "set init.from=RUN_DIR"),
        (lora_sets(tiny_data, base_run, "lora.targets=qkv"), "matches no linear layer"),
        (lora_sets(tiny_data, base_run, "optim.optimizer=muon"), "optim.optimizer=adamw"),
    ]
    for i, (sets, words) in enumerate(cases):
        result = keel(*tiny_train_args(tiny_data, tmp_path / f"run{i}", *sets))
        assert_user_error(result, words)
        assert not (tmp_path / f"run{i}").exists()


def test_adapters_load_in_peft_on_the_exported_base(tiny_data, base_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from keel.models.hf import llama_config, to_llama_state_dict
    from keel.models.lora import lora_for_run
    from keel.runs.rundir import load_run_config
    from keel.tasks.lm import load_init_weights

    run(tmp_path / "lora", *lora_sets(tiny_data, base_run, "train.max_steps=10", "lora.targets=q_proj,down_proj"))
    config = load_run_config(tmp_path / "lora")
    model = GPT(config.model)
    load_init_weights(model, base_run)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config(config.model))).eval()
    llama.load_state_dict(to_llama_state_dict(model), strict=False)
    lora_for_run(model, config)
    ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "lora")[-1], model)
    randomise_adapters(model)  # ten steps leave B small; make a wrong mapping visible
    write_peft_adapter(model, config.lora, tmp_path / "adapter")
    adapted = peft.PeftModel.from_pretrained(llama, tmp_path / "adapter").eval()
    idx = torch.randint(0, config.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(adapted(idx).logits, model.eval()(idx), atol=1e-5, rtol=1e-5)


def test_keel_export_adapters_writes_the_base_and_a_peft_adapter(tiny_data, base_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    run(tmp_path / "lora", *lora_sets(tiny_data, base_run, "train.max_steps=10"))
    exported = keel("export", str(tmp_path / "lora"), "--out", str(tmp_path / "hf"), "--adapters")
    assert exported.returncode == 0, exported.stderr
    assert sorted(p.name for p in (tmp_path / "hf" / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base_logits = base(idx).logits
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "hf" / "adapter").eval()
        ours = load_run(tmp_path / "lora").model(idx)
        assert (ours - base_logits).abs().max() > 1e-3  # the adapters changed something...
        torch.testing.assert_close(adapted(idx).logits, ours, atol=1e-5, rtol=1e-5)  # ...and PEFT applies it

    assert_user_error(
        keel("export", str(base_run), "--out", str(tmp_path / "x"), "--adapters"), "has none; leave out --adapters"
    )
    assert_user_error(
        keel("export", str(tmp_path / "lora"), "--out", str(tmp_path / "y"), "--adapters", "--format", "gguf"),
        "--adapters goes with --format hf",
    )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_lora_distill_run_trains_the_adapters_from_a_teacher(tiny_data, base_run, tmp_path):
    """A student continued from a run (here a copy of the teacher) with adapters: only they learn."""
    teacher = tmp_path / "teacher"  # its cache goes into the teacher's directory: not into the shared base_run
    shutil.copytree(base_run, teacher)
    sets = lora_sets(tiny_data, base_run, "task.kind=distill", f"distill.teacher={teacher}", "train.max_steps=10")
    assert run(tmp_path / "student", *sets).status == "finished"
    assert all(".lora_" in name for name in weights_of(tmp_path / "student"))
