"""keel inspect: the batch as the model sees it, statistics from hooks, attention maps, findings, bad inputs."""

import json
import math
import re

import pytest
import torch
from conftest import TINY, keel, run

from keel import config as config_lib
from keel.cli import main
from keel.errors import UserError
from keel.inference import load_run
from keel.research.inspect import (
    UNSCORED_CLOSE,
    UNSCORED_OPEN,
    attention_weights,
    diagnose,
    format_batch,
    inspect_run,
    inspect_text,
    last_cursor,
    load_lm_run,
    row_pieces,
    text_ids,
)
from keel.tasks.lm import IGNORE_INDEX

MODEL = [s for s in TINY if s.startswith("model.")]
STEPS = 150  # the tiny model copies the held-out strings by then (docs/inspect.md)


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory):
    from keel.data import prepare

    out = tmp_path_factory.mktemp("copy") / "data"
    prepare(["builtin:copy"], out, progress=False)
    return out


@pytest.fixture(scope="module")
def copy_run(copy_data, tmp_path_factory):
    """An SFT run that has learnt builtin:copy: sharp attention, confident answers, masked prompts."""
    run_dir = tmp_path_factory.mktemp("copy-run") / "run"
    sets = [f"train.max_steps={STEPS}", f"train.eval_every={STEPS}", f"train.checkpoint_every={STEPS}"]
    result = run(run_dir, "task.kind=sft", f"data.path={copy_data}", *MODEL, *sets)
    assert result.status == "finished" and result.val_loss < 0.1, result
    return run_dir


EXAMPLE = re.compile(
    re.escape(f"{UNSCORED_OPEN}<|endoftext|>")
    + r"([a-p]{8})>"
    + re.escape(UNSCORED_CLOSE)
    + r"([a-p]{8})<\|endoftext\|>"
)


def test_an_sft_batch_shows_masked_prompts_scored_answers_and_padding(copy_run, copy_data):
    from keel.data.examples import open_examples

    loaded = load_lm_run(copy_run)
    text = format_batch(loaded, 7, max_rows=4)
    examples = EXAMPLE.findall(text)
    # Every packed example shows its prompt (and the separator) as context, its answer and end token as scored.
    assert len(examples) == text.count("-- example at position"), text
    assert examples and all(prompt == answer for prompt, answer in examples)
    assert "padding, positions" in text and "attention stays inside each example" in text
    # They are examples of the train split, never of the held-out one.
    data = open_examples(copy_data)
    val = data.sequences("val")
    held_out = {data.tokenizer.decode(val.get(i)[0].tolist()[1:9]) for i in range(len(val))}
    assert not {prompt for prompt, _ in examples} & held_out
    # The batch is a pure function of the cursor: the same twice, another at another cursor.
    assert format_batch(loaded, 7, max_rows=4) == text
    assert EXAMPLE.findall(format_batch(loaded, 8, max_rows=4)) != examples


def test_rows_are_cut_into_documents_sequences_and_padding():
    eot = 0
    # Pretraining: a window whose second document starts at an end-of-text token; only the first token is context.
    window = {"inputs": torch.tensor([[5, 6, 0, 7, 8]]), "targets": torch.tensor([[6, 0, 7, 8, 9]])}
    first, second = row_pieces(window, 0, eot, packed_documents=True)
    assert (first.label, first.start, first.ids, first.scored) == ("document", 0, [5, 6], [False, True])
    assert (second.start, second.ids, second.scored) == (2, [0, 7, 8, 9], [True, True, True, True])
    # A right-padded sequence (DPO): the prompt carries no loss, the padding after the response is cut off.
    ignore = IGNORE_INDEX
    padded = {
        "inputs": torch.tensor([[0, 5, 6, 7, 0, 0]]),
        "targets": torch.tensor([[ignore, ignore, 7, 0, ignore, ignore]]),
    }
    sequence, padding = row_pieces(padded, 0, eot, packed_documents=False)
    assert (sequence.ids, sequence.scored) == ([0, 5, 6, 7, 0], [False, False, False, True, True])
    assert (padding.label, padding.start, padding.ids) == ("padding", 4, [0, 0])


def test_recomputed_attention_weights_give_the_layers_output(copy_run):
    """The hook's weights, applied to the layer's values, reproduce what the layer computed: causal rows and
    packed rows (the block-diagonal mask) alike."""
    model = load_lm_run(copy_run).model
    checked = []

    def check(module, args, output):
        x, cos, sin, _, mask = args
        weights = attention_weights(module, x, cos, sin, mask)  # (B, nh, T, T)
        B, T, _ = x.shape
        v = module.v_proj(x).view(B, T, module.n_kv_head, module.head_dim).transpose(1, 2)
        v = v.repeat_interleave(module.n_head // module.n_kv_head, dim=1)
        y = (weights @ v).transpose(1, 2).reshape(B, T, -1)
        torch.testing.assert_close(module.o_proj(y), output, atol=1e-5, rtol=1e-4)
        assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)
        checked.append(mask is not None)

    handles = [block.attn.register_forward_hook(check) for block in model.blocks]
    idx = torch.randint(0, 16, (2, 20)) + 97  # the letters' byte ids
    with torch.no_grad():
        model(idx)
        segments = torch.tensor([[0] * 9 + [1] * 11, [0] * 20])
        positions = torch.cat([torch.arange(9), torch.arange(11)]).expand(2, -1)
        model.hidden_states(idx, positions, segments)
    for handle in handles:
        handle.remove()
    assert checked == [False, False, True, True]


def test_a_trained_model_has_no_findings_and_broken_ones_are_named(copy_run):
    loaded = load_lm_run(copy_run)
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = text_ids(loaded, None)  # the first held-out example
    healthy = inspect_text(model, ids)
    assert diagnose(healthy, tokenizer) == []
    right = [p for p in healthy.predictions if p.position >= 10]  # the answer and its end token
    assert all(p.rank == 1 and p.probability > 0.5 for p in right)

    # A model whose last hidden state is always one token's embedding predicts that token everywhere.
    letter = tokenizer.token_to_id("a")
    hook = model.norm_f.register_forward_hook(lambda m, a, out: torch.zeros_like(out) + model.embed.weight[letter])
    findings = diagnose(inspect_text(model, ids), tokenizer)
    hook.remove()
    dominant = [f for f in findings if f.kind == "dominant_prediction"]
    assert dominant and "'a' is the top prediction at 18 of 18 positions" in dominant[0].evidence

    with torch.no_grad():
        # Block 1 adds nothing to the residual stream.
        model.blocks[1].attn.o_proj.weight.zero_()
        model.blocks[1].mlp.down_proj.weight.zero_()
        # Head 2 of block 0 has no query: its scores are all equal, so its attention is uniform.
        attn = model.blocks[0].attn
        attn.q_proj.weight[2 * attn.head_dim : 3 * attn.head_dim] = 0
        # Head 0 of block 0 looks only at position 0 (<|endoftext|>): a feature every token has (dimension 0 of
        # the embeddings) makes its query, a feature only <|endoftext|> has (dimension 1) its key, both in the
        # slowest rotary pair, which hardly turns over 19 positions.
        eot = tokenizer.token_to_id("<|endoftext|>")
        slow = attn.head_dim // 2 - 1
        model.embed.weight[:, 0] = 5.0
        model.embed.weight[eot, 1] = 50.0
        model.blocks[0].attn_norm.weight[:2] = 1.0
        attn.q_proj.weight[: attn.head_dim] = 0
        attn.q_proj.weight[slow, 0] = 2.0
        attn.k_proj.weight[slow] = 0
        attn.k_proj.weight[slow, 1] = 2.0
    broken = inspect_text(model, ids)
    found = {(f.kind, f.where) for f in diagnose(broken, tokenizer)}
    assert {
        ("dead_update", "layer 1 attention"),
        ("dead_update", "layer 1 mlp"),
        ("uniform_head", "layer 0 head 2"),
        ("collapsed_head", "layer 0 head 0"),
    } <= found, found
    assert broken.layers[0].head_focus_position[0] == 0  # the end-of-text token in front
    assert not any(kind == "dead_update" and where.startswith("layer 0") for kind, where in found)


def test_inspect_writes_one_attention_map_per_layer_and_the_numbers(copy_run, tmp_path):
    out = tmp_path / "maps"
    text, findings, paths = inspect_run(copy_run, cursor=3, prompt="abcdefgh>abcdefgh", out_dir=out, top_k=3)
    assert [p.name for p in paths] == ["attention_layer00.png", "attention_layer01.png", "inspect.json"]
    for png in paths[:2]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    record = json.loads((out / "inspect.json").read_text())
    assert len(record["layers"]) == 2 and len(record["layers"][0]["head_entropy"]) == 4
    assert record["findings"] == [] == findings
    # The prompt is read after <|endoftext|>, as documents are in training; the model copies it.
    assert record["ids"][0] == 0 and len(record["predictions"]) == 17
    table = text.split("predictions (")[1]
    assert re.search(r"\n +10  'a' +0\.9\d\d +1  'a' 0\.9\d\d ", table), table
    assert "batch at cursor 3" in text and "entropy per head" in text and math.isfinite(record["embedding_rms"])


def test_bad_inputs_are_one_sentence_and_write_nothing(copy_run, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(UserError, match="not a keel run directory"):
        inspect_run(tmp_path, out_dir=out)
    with pytest.raises(UserError, match="--cursor must be 0 or more"):
        inspect_run(copy_run, cursor=-1, out_dir=out)
    last = last_cursor(load_run(copy_run))
    assert last >= STEPS - 1  # one cursor per step, plus one per skipped batch
    with pytest.raises(UserError, match=f"past the end of .* cursors 0 to {last} "):
        inspect_run(copy_run, cursor=last + 1, out_dir=out)
    for prompt in ("", "  \n"):
        with pytest.raises(UserError, match="--prompt is empty"):
            inspect_run(copy_run, prompt=prompt, out_dir=out)
    with pytest.raises(UserError, match="more than the model's context of 64"):
        inspect_run(copy_run, prompt="abcd" * 20, out_dir=out)
    assert not out.exists()
    diffusion = tmp_path / "dit"
    diffusion.mkdir()
    config_lib.save(config_lib.load(None, ["task.kind=diffusion"]), diffusion / "config.yaml")
    with pytest.raises(UserError, match="diffusion run and keel inspect reads language models"):
        inspect_run(diffusion, out_dir=out)


def test_keel_inspect_end_to_end(copy_run, tmp_path, capsys):
    result = keel("inspect", str(copy_run), "--rows", "1", "--out", str(tmp_path / "out"), "--cursor", "12")
    assert result.returncode == 0, result.stderr
    assert "batch at cursor 12" in result.stdout and "findings: none" in result.stdout
    assert (tmp_path / "out" / "attention_layer01.png").is_file()
    # The CLI's error path, in this process (a second torch import in a subprocess costs seconds).
    assert main(["inspect", str(copy_run), "--cursor", "-3"]) == 2
    assert capsys.readouterr().err.strip() == "error: --cursor must be 0 or more (the index of a step's batch), got -3."
