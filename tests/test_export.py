"""keel export: Hugging Face directories that transformers loads and runs as keel does, GGUF files that hold
what llama.cpp needs, re-export over an earlier export, and every bad input refused with one sentence."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY, keel, run

from keel import config as config_lib
from keel.cli import main
from keel.data.chat import render
from keel.data.tokenizer import EOT
from keel.errors import UserError
from keel.export import GGUF_FILE, MARKER, export_run
from keel.inference import load_run, sample
from keel.models.gpt import GPT
from keel.runs.rundir import init_run_dir
from keel.train.checkpoint import save_checkpoint

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

PROMPTS = ["def ", "import os\n", "class Parser:\n    def __init__(self"]


@pytest.fixture(scope="module")
def chat_run(sft_data, base_run, tmp_path_factory):
    """A chat-tuned run: a few SFT steps on examples that are partly chat turns."""
    run_dir = tmp_path_factory.mktemp("chat") / "run"
    assert run(run_dir, f"data.path={sft_data}", "task.kind=sft", f"init.from={base_run}", "train.max_steps=5").status
    return run_dir


@pytest.fixture(scope="module")
def base_export(base_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "hf"
    export_run(base_run, out)
    return out


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def test_hf_export_gives_keel_logits_and_greedy_text(base_run, base_export):
    keel_run = load_run(base_run, device="cpu")
    model, tokenizer = hf_model(base_export), transformers.AutoTokenizer.from_pretrained(base_export)
    eot = keel_run.tokenizer.token_to_id(EOT)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (EOT, EOT, EOT)
    assert tokenizer.model_max_length == keel_run.config.model.context_length
    assert (
        json.loads((base_export / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    )
    assert model.generation_config.eos_token_id == eot and model.config.bos_token_id == eot
    assert "chat_template" not in json.loads((base_export / "tokenizer_config.json").read_text())
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        # the exported tokenizer starts a text with <|endoftext|>, as keel sample does
        assert ids[0].tolist() == [eot] + keel_run.tokenizer.encode(prompt).ids
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, keel_run.model(ids), atol=1e-5, rtol=1e-5)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        text = tokenizer.decode(out[0], skip_special_tokens=True)
        assert text == sample(keel_run, prompt, max_new_tokens=24, temperature=0)


def test_chat_template_renders_keel_ids_and_replies_alike(chat_run, tmp_path):
    export_run(chat_run, tmp_path / "hf")
    keel_run = load_run(chat_run, device="cpu")
    model, tokenizer = hf_model(tmp_path / "hf"), transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    conversation = [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "def add(a, b):\n    "},
        {"role": "assistant", "content": "return a + b"},
        {"role": "user", "content": "and  tabs\tor émojis 🦙?"},
    ]
    for messages, prompt in ((conversation, True), (conversation[:3], False)):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, return_dict=True)["input_ids"]
        assert ids == render(keel_run.tokenizer, messages, add_generation_prompt=prompt)[0]
    end, eot = (keel_run.tokenizer.token_to_id(t) for t in ("<|end|>", EOT))
    assert tokenizer.eos_token == "<|end|>" and model.generation_config.eos_token_id == [end, eot]

    ids = torch.tensor([render(keel_run.tokenizer, conversation[:2], add_generation_prompt=True)[0]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, keel_run.model(ids), atol=1e-5, rtol=1e-5)
    ours = keel_run.model.generate(ids, 30, temperature=0, eot_id=end)[0, ids.shape[1] :].tolist()
    theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False)
    assert theirs[0, ids.shape[1] :].tolist() == ours[: len(theirs[0]) - ids.shape[1]]
    if end in ours:  # both stop at the end of the turn
        assert theirs[0, -1].item() == end and len(theirs[0]) - ids.shape[1] == ours.index(end) + 1


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_exports_hold_the_rounded_weights(base_run, tmp_path, dtype):
    export_run(base_run, tmp_path / "hf", dtype=dtype)
    model = hf_model(tmp_path / "hf")
    assert model.dtype == getattr(torch, dtype)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == dtype
    ours = load_run(base_run, device="cpu").model
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, ours.blocks[1].mlp.up_proj.weight.to(model.dtype))


def test_re_export_replaces_an_earlier_export_and_leaves_nothing_aside(base_run, tmp_path):
    out = tmp_path / "out"
    export_run(base_run, out)
    export_run(base_run, out, fmt="gguf")  # an earlier export may be replaced, even by another format
    marker = json.loads((out / MARKER).read_text())
    assert sorted(p.name for p in out.iterdir()) == [MARKER, GGUF_FILE]
    assert marker["format"] == "gguf" and marker["step"] == load_run(base_run, device="cpu").step
    assert len(marker["checkpoint_sha256"]) == 64 and marker["run"] == str(base_run.resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old copy left


# -- GGUF -------------------------------------------------------------------------------------------


def gguf_fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def gguf_weights(reader) -> dict[str, np.ndarray]:
    return {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        for t in reader.tensors
    }


def llama_cpp_forward(path, ids: list[int]) -> np.ndarray:
    """Logits (T, V) of the llama graph as llama.cpp computes it, read from the GGUF file alone: its metadata,
    its tensor names, and rotary over adjacent pairs of dims (ggml's "normal" rope mode, the llama arch's)."""
    reader = gguf.GGUFReader(path)
    meta, w = gguf_fields(reader), {k: v.astype(np.float64) for k, v in gguf_weights(reader).items()}
    n_head, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    eps, base = meta["llama.attention.layer_norm_rms_epsilon"], meta["llama.rope.freq_base"]
    head_dim = meta["llama.rope.dimension_count"]

    def norm(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight

    T = len(ids)
    angles = np.arange(T)[:, None] * base ** (-np.arange(0, head_dim, 2) / head_dim)  # (T, hs/2)
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]  # (T, 1, hs/2)

    def rope(x):  # (T, heads, hs): dims 2i and 2i + 1 rotate together
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
        return out

    x = w["token_embd.weight"][ids]  # (T, C)
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(meta["llama.block_count"]):
        h = norm(x, w[f"blk.{i}.attn_norm.weight"])
        q = rope((h @ w[f"blk.{i}.attn_q.weight"].T).reshape(T, n_head, head_dim))
        k = rope((h @ w[f"blk.{i}.attn_k.weight"].T).reshape(T, n_kv, head_dim))
        v = (h @ w[f"blk.{i}.attn_v.weight"].T).reshape(T, n_kv, head_dim)
        k, v = (np.repeat(t, n_head // n_kv, axis=1) for t in (k, v))
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(head_dim) + causal
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", weights, v).reshape(T, -1) @ w[f"blk.{i}.attn_output.weight"].T
        h = norm(x, w[f"blk.{i}.ffn_norm.weight"])
        gate, up = h @ w[f"blk.{i}.ffn_gate.weight"].T, h @ w[f"blk.{i}.ffn_up.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[f"blk.{i}.ffn_down.weight"].T
    return norm(x, w["output_norm.weight"]) @ w.get("output.weight", w["token_embd.weight"]).T


def test_gguf_holds_the_tokenizer_and_the_llama_cpp_graph_gives_keel_logits(chat_run, tmp_path):
    export_run(chat_run, tmp_path / "gguf", fmt="gguf")
    keel_run = load_run(chat_run, device="cpu")
    config, tokenizer = keel_run.config.model, keel_run.tokenizer
    reader = gguf.GGUFReader(tmp_path / "gguf" / GGUF_FILE)
    meta = gguf_fields(reader)
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert meta["llama.context_length"] == config.context_length and meta["llama.block_count"] == config.n_layer
    assert meta["llama.attention.head_count_kv"] == config.n_kv_head
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    types = meta["tokenizer.ggml.token_type"]
    assert [types[vocab[t]] for t in (EOT, "<|user|>", "<|end|>", "def")] == [3, 3, 3, 1]  # CONTROL, NORMAL
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"][:3] == [" ".join(m) for m in merges[:3]]
    assert meta["tokenizer.ggml.bos_token_id"] == vocab[EOT] and meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.eos_token_id"] == vocab["<|end|>"]
    assert "<|assistant|>" in meta["tokenizer.chat_template"]
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and f"blk.{config.n_layer - 1}.ffn_down.weight" in names  # tied

    ids = render(tokenizer, [{"role": "user", "content": "def add(a, b):"}], add_generation_prompt=True)[0]
    with torch.no_grad():
        ours = keel_run.model(torch.tensor([ids]))[0].double().numpy()
    np.testing.assert_allclose(llama_cpp_forward(tmp_path / "gguf" / GGUF_FILE, ids), ours, atol=1e-4, rtol=1e-4)


def test_gguf_int8_is_q8_0_and_close_and_half_types_are_recorded(base_run, tmp_path):
    export_run(base_run, tmp_path / "q8", fmt="gguf", int8=True)
    export_run(base_run, tmp_path / "bf16", fmt="gguf", dtype="bfloat16")
    path = tmp_path / "q8" / GGUF_FILE
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # 1-D tensors stay float32
    assert gguf_fields(reader)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    bf16 = gguf.GGUFReader(tmp_path / "bf16" / GGUF_FILE)
    assert {t.name: t.tensor_type for t in bf16.tensors}["blk.1.ffn_up.weight"] == gguf.GGMLQuantizationType.BF16

    keel_run = load_run(base_run, device="cpu")
    ids = [0] + keel_run.tokenizer.encode("import os\nimport sys\n").ids
    with torch.no_grad():
        ours = keel_run.model(torch.tensor([ids]))[0].double().numpy()
    theirs = llama_cpp_forward(path, ids)
    assert np.abs(theirs - ours).max() < 0.05 * np.abs(ours).max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.9
    assert path.stat().st_size < (tmp_path / "bf16" / GGUF_FILE).stat().st_size


# -- the command and its bad inputs ---------------------------------------------------------------


def test_keel_export_command_end_to_end(base_run, tmp_path):
    result = keel("export", str(base_run), "--out", str(tmp_path / "gguf"), "--format", "gguf", "--int8")
    assert result.returncode == 0, result.stderr
    assert "Q8_0" in result.stdout and (tmp_path / "gguf" / GGUF_FILE).is_file()


def refused(capsys, *args: str, words: tuple[str, ...] = ()) -> str:
    """Run `keel ARGS` in this process; it must exit 2 with one sentence (argparse's usage line may precede it)."""
    try:
        code = main(list(args))
    except SystemExit as exit:  # argparse
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert "error: " in message
    for word in words:
        assert word in message, (word, message)
    return message


def hand_made_run(run_dir, data_dir, *sets, checkpoint: bool = True):
    """A run directory with untrained weights (or none), written directly."""
    config = init_run_dir(config_lib.load(None, [f"data.path={data_dir}", *TINY, *sets]), run_dir)
    if checkpoint:
        save_checkpoint(run_dir, 0, GPT(config.model), {}, {"val_loss": None}, keep_last=1)
    return run_dir


def test_bad_exports_are_refused_with_one_sentence_and_write_nothing(
    tiny_data, base_run, base_export, tmp_path, capsys
):
    out = tmp_path / "out"
    empty = hand_made_run(tmp_path / "empty", tiny_data, checkpoint=False)
    refused(capsys, "export", str(empty), "--out", str(out), words=("no usable checkpoint", "keel train"))
    refused(capsys, "export", str(base_run), "--out", str(out), "--format", "onnx", words=("--format",))
    refused(capsys, "export", str(base_run), "--out", str(out), "--dtype", "int4", words=("--dtype",))
    refused(capsys, "export", str(base_run), "--out", str(base_run), words=("run directory itself",))
    refused(capsys, "export", str(base_run), "--out", str(tiny_data), words=("not an earlier keel export",))
    refused(capsys, "export", str(base_run), "--out", str(out), "--int8", words=("--format gguf",))
    qk = hand_made_run(tmp_path / "qk", tiny_data, "model.qk_norm=true")
    refused(capsys, "export", str(qk), "--out", str(out), "--format", "gguf", words=("qk_norm",))
    relu2 = hand_made_run(tmp_path / "relu2", tiny_data, "model.mlp=relu2")
    refused(capsys, "export", str(relu2), "--out", str(out), "--format", "gguf", words=("relu2", "--format hf"))
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "qk", "relu2"]  # nothing aside either
    assert (tiny_data / "manifest.json").is_file() and not (tiny_data / MARKER).exists()
    # a keel export that lost its marker is no longer recognisable as one
    copy = tmp_path / "copy"
    shutil.copytree(base_export, copy)
    (copy / MARKER).unlink()
    refused(capsys, "export", str(base_run), "--out", str(copy), words=("not an earlier keel export",))


def test_hf_export_of_a_model_with_more_embedding_rows_than_tokens(tiny_data, tmp_path):
    """model.vocab_size may exceed the tokenizer's; the extra rows travel along (GGUF names them [PADi])."""
    run_dir = hand_made_run(tmp_path / "wide", tiny_data, "model.vocab_size=520")
    export_run(run_dir, tmp_path / "gguf", fmt="gguf")
    meta = gguf_fields(gguf.GGUFReader(tmp_path / "gguf" / GGUF_FILE))
    assert len(meta["tokenizer.ggml.tokens"]) == 520 and meta["tokenizer.ggml.tokens"][-1] == "[PAD519]"


def test_an_export_that_fails_midway_leaves_the_earlier_export_untouched(base_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    export_run(base_run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(model, tokenizer, path, **kwargs):
        path.write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("keel.models.llamacpp.write_gguf", disk_full)
    with pytest.raises(UserError, match="No space left on device"):
        export_run(base_run, out, fmt="gguf")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_lora_run_exports_with_its_adapters_folded_in(tiny_data, base_run, tmp_path):
    sets = [f"data.path={tiny_data}", f"init.from={base_run}", "lora.rank=4", "lora.alpha=8", "train.max_steps=5"]
    run(tmp_path / "lora", *sets)
    export_run(tmp_path / "lora", tmp_path / "hf")
    ours, theirs = load_run(tmp_path / "lora", device="cpu").model, hf_model(tmp_path / "hf")
    assert not torch.equal(
        ours.blocks[0].attn.q_proj.weight, load_run(base_run, device="cpu").model.blocks[0].attn.q_proj.weight
    )
    ids = torch.tensor([[0, 5, 17, 42, 99]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)


def test_hf_export_carries_rope_theta_and_norm_eps(tiny_data, tmp_path):
    """Settings the tiny runs leave at the defaults transformers would assume anyway."""
    run_dir = hand_made_run(tmp_path / "run", tiny_data, "model.rope_theta=500.0", "model.norm_eps=1e-3")
    with torch.no_grad():  # norms away from 1, so that eps matters
        model = GPT(load_run(run_dir, device="cpu").config.model)
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.5)
    save_checkpoint(run_dir, 1, model, {}, {"val_loss": None}, keep_last=1)
    export_run(run_dir, tmp_path / "hf")
    ids = torch.tensor([list(range(0, 64, 2))])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tmp_path / "hf")(ids).logits, model.eval()(ids), atol=1e-5, rtol=1e-5)
