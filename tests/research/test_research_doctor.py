"""keel doctor and the toy tasks it trains on: builtin:copy and builtin:reverse."""

import dataclasses

import pytest
import torch
from conftest import TINY, keel

from keel import config as config_lib
from keel.errors import UserError
from keel.research.doctor import _gradient_check, format_report, run_doctor, verdict
from keel.tasks.lm import token_loss

CHECKS = ["initial loss", "gradients", "loss falls", "overfits one batch", "learns builtin:copy"]


def test_toy_sources_are_a_pure_function_of_the_seed():
    from keel.data.toy import symbol_strings, toy_pair

    copy = symbol_strings("copy", 50, seed=3)
    assert copy == symbol_strings("copy", 50, seed=3)
    assert copy != symbol_strings("copy", 50, seed=4) and copy != symbol_strings("reverse", 50, seed=3)
    assert all(len(s) == 8 and set(s) <= set("abcdefghijklmnop") for s in copy)
    assert toy_pair("copy", "abcdefgh") == ("abcdefgh>", "abcdefgh")
    assert toy_pair("reverse", "abcdefgh") == ("abcdefgh<", "hgfedcba")


def test_prepare_builtin_copy_and_reverse(tmp_path):
    """Both tasks in one data directory, each symbol one token, the prompt masked."""
    from keel.data import open_examples, prepare

    manifest = prepare(["builtin:copy", "builtin:reverse"], tmp_path / "a", progress=False)
    assert manifest["tokenizer"]["vocab_size"] == 261  # 256 bytes, <|endoftext|>, 4 chat markers
    data = open_examples(tmp_path / "a", kind="sft")
    train, val = data.sequences("train"), data.sequences("val")
    texts = {}
    for split, sequences in (("train", train), ("val", val)):
        for i in range(len(sequences)):
            ids, mask = sequences.get(i)
            assert len(ids) == 19 and mask.tolist() == [0] * 10 + [1] * 9  # <eot> 8 symbols, separator | 8, <eot>
            texts.setdefault(split, set()).add(data.tokenizer.decode(ids[1:9].tolist()))
    assert len(val) > 100 and not texts["train"] & texts["val"]  # held out from both tasks
    reverse = [data.tokenizer.decode(train.get(i)[0][1:-1].tolist()) for i in range(len(train))]
    reverse = [text for text in reverse if "<" in text]
    assert reverse and all(a == b[::-1] for a, b in (text.split("<") for text in reverse))


def test_doctor_passes_a_sane_config(tiny_data):
    config = config_lib.load(None, [f"data.path={tiny_data}", *TINY, "train.compile=false"])
    seen = []
    report = run_doctor(config, report=seen.append)
    assert [c.name for c in report.checks] == CHECKS
    assert report.passed, format_report(report)
    assert "\n".join(seen) + "\n" + verdict(report) == format_report(report)  # what the command prints
    assert f"batch 0 of {tiny_data}, 4 x 64 tokens" in report.checks[0].evidence
    assert "ln(512)" in report.checks[0].evidence
    assert "all checks passed" in format_report(report)


def test_keel_doctor_fails_a_broken_config(tmp_path):
    """A learning rate that cannot move the weights: the first checks pass, the learning ones fail, exit 1."""
    sets = [s for s in TINY if not s.startswith("optim.lr")] + ["optim.lr=1e-7", f"data.path={tmp_path / 'none'}"]
    args = ["doctor", "--overfit-steps", "10", "--copy-steps", "10"] + [a for s in sets for a in ("--set", s)]
    result = keel(*args)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    for name in ("initial loss", "gradients"):
        assert any(line.startswith(f"  PASS  {name}:") for line in lines), result.stdout
    for name in ("loss falls", "overfits one batch", "learns builtin:copy"):
        assert any(line.startswith(f"  FAIL  {name}:") for line in lines), result.stdout
    assert "no text or SFT data at data.path" in result.stdout
    assert lines[-1].startswith("3 of 5 checks failed")


def test_the_gradient_check_names_frozen_and_cut_off_weights(tiny_data):
    from keel.models.gpt import GPT

    config = config_lib.load(None, [f"data.path={tiny_data}", *TINY])
    model = GPT(dataclasses.replace(config.model, vocab_size=64))
    idx = torch.randint(0, 64, (2, 16))
    tensors = {"inputs": idx, "targets": torch.roll(idx, -1, 1)}
    token_loss(model, tensors).loss.backward()
    assert _gradient_check(model).passed
    model.zero_grad()
    model.blocks[0].mlp.requires_grad_(False)
    with torch.no_grad():
        model.blocks[1].attn.o_proj.weight.zero_()  # nothing flows back into block 1's q, k, v
    token_loss(model, tensors).loss.backward()
    check = _gradient_check(model)
    assert not check.passed
    assert "3 frozen (blocks.0.mlp.gate_proj.weight" in check.evidence
    # the attention's norm, q, k and v: with o_proj zero, nothing flows back through them
    assert "4 without gradient (blocks.1.attn_norm.weight, blocks.1.attn.q_proj.weight" in check.evidence


def test_doctor_refuses_what_it_cannot_check():
    with pytest.raises(UserError, match="keel doctor checks language models"):
        run_doctor(config_lib.load(None, ["task.kind=diffusion"]))
    with pytest.raises(UserError, match="--copy-steps must be at least 10"):
        run_doctor(config_lib.load(None, []), copy_steps=3)
