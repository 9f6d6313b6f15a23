"""keel chat: replies through the chat template, stopping at <|end|>, fitting the history to the context."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_user_error, keel

from keel import config as config_lib
from keel.data import prepare
from keel.data.chat import render, template_of
from keel.data.tokenizer import load_tokenizer
from keel.errors import UserError
from keel.inference import chat_reply, fit_history, load_run
from keel.models.gpt import GPT
from keel.runs.rundir import CONFIG_FILE, TOKENIZER_FILE
from keel.train.checkpoint import save_checkpoint

CONTEXT_LENGTH = 64  # TINY's model.context_length


@pytest.fixture(scope="module")
def chat_data(tiny_data, tmp_path_factory) -> Path:
    """A chat SFT data dir on the tiny corpus's tokenizer, extended with the chat markers."""
    folder = tmp_path_factory.mktemp("chat")
    source = folder / "chats.jsonl"
    with open(source, "w") as out:
        for i in range(40):
            messages = [
                {"role": "user", "content": f"what is {i} plus one?"},
                {"role": "assistant", "content": f"{i} plus one is {i + 1}."},
            ]
            out.write(json.dumps({"messages": messages}) + "\n")
    prepare([str(source)], folder / "data", tokenizer=str(tiny_data), context_length=CONTEXT_LENGTH, progress=False)
    return folder / "data"


def make_run(run_dir: Path, data_dir: Path, end_always: bool = False) -> Path:
    """A run directory written by hand (untrained weights), with the tokenizer of data_dir.

    end_always sets the weights so that <|end|> is the most likely next token after any input: the blocks add
    nothing to the residual stream, every token embeds to the same direction, and <|end|>'s row of the output
    projection is twice as long as the others.
    """
    tokenizer = load_tokenizer(data_dir)
    # Untied: an untrained tied model repeats its last input token, here <|assistant|>, so its replies are empty.
    config = config_lib.load(None, [f"data.path={data_dir}", *TINY, "model.tie_embeddings=false"])
    config = dataclasses.replace(
        config, name=run_dir.name, model=dataclasses.replace(config.model, vocab_size=tokenizer.get_vocab_size())
    )
    run_dir.mkdir(parents=True)
    config_lib.save(config, run_dir / CONFIG_FILE)
    shutil.copyfile(data_dir / TOKENIZER_FILE, run_dir / TOKENIZER_FILE)
    torch.manual_seed(0)
    model = GPT(config.model)
    if end_always:
        end_id = template_of(tokenizer).end_id
        with torch.no_grad():
            for block in model.blocks:
                block.attn.o_proj.weight.zero_()
                block.mlp.down_proj.weight.zero_()
            model.embed.weight.fill_(1.0)
            model.embed.weight[end_id] = 2.0
            model.lm_head.weight.copy_(model.embed.weight)
    save_checkpoint(run_dir, 0, model, {}, {"val_loss": None}, keep_last=1)
    return run_dir


def keel_with_stdin(*args: str, stdin: str) -> subprocess.CompletedProcess:
    """conftest.keel with text on stdin (a pipe, not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "keel.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=300,
    )


def test_chat_prompt_replies(chat_data, tmp_path):
    run_dir = make_run(tmp_path / "sft", chat_data)
    args = ["chat", str(run_dir), "--prompt", "hi", "--temperature", "0", "--max-new-tokens", "8"]
    result = keel(*args)
    assert result.returncode == 0, result.stderr
    expected = chat_reply(load_run(run_dir), [{"role": "user", "content": "hi"}], 8, temperature=0)
    assert expected.strip() and "<|" not in expected  # some text, no markers
    assert result.stdout == expected + "\n"
    with_system = keel(*args, "--system", "be brief")
    assert with_system.returncode == 0, with_system.stderr


def test_chat_reads_turns_from_stdin(chat_data, tmp_path):
    run_dir = make_run(tmp_path / "sft", chat_data)
    args = ["chat", str(run_dir), "--system", "be brief", "--temperature", "0", "--max-new-tokens", "4"]
    result = keel_with_stdin(*args, stdin="hi\nand you?\n\nignored\n")
    assert result.returncode == 0, result.stderr
    run = load_run(run_dir)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    first = chat_reply(run, messages, 4, temperature=0)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "and you?"}]
    second = chat_reply(run, messages, 4, temperature=0)
    # No "you> " (stdin is not a terminal), the second reply saw the first exchange, the empty line ended the chat.
    assert result.stdout == f"{first}\n{second}\n"
    # A conversation longer than the context goes on: the oldest turns are dropped.
    long_chat = keel_with_stdin(*args, stdin="".join(f"what is {i} plus one?\n" for i in range(20)))
    assert long_chat.returncode == 0, long_chat.stderr
    assert long_chat.stdout.count("\n") >= 20  # one line per reply at least


def test_chat_stops_at_end_of_turn(chat_data, tmp_path):
    run = load_run(make_run(tmp_path / "sft", chat_data, end_always=True))
    forward_calls = []
    run.model.register_forward_hook(lambda module, inputs, output: forward_calls.append(inputs[0].shape))
    assert chat_reply(run, [{"role": "user", "content": "hi"}], 8, temperature=0) == ""
    assert len(forward_calls) == 1  # the prompt only: the first new token was <|end|>
    result = keel("chat", str(run.path), "--prompt", "hi", "--temperature", "0", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "\n"


def test_history_drops_oldest_turns_keeps_system(chat_data):
    tokenizer = load_tokenizer(chat_data)
    system = {"role": "system", "content": "you add numbers"}
    turns = []
    for i in range(6):
        turns += [
            {"role": "user", "content": f"what is {i} plus one?"},
            {"role": "assistant", "content": f"{i} plus one is {i + 1}."},
        ]
    messages = [system, *turns, {"role": "user", "content": "and 7?"}]
    assert len(render(tokenizer, messages, add_generation_prompt=True)[0]) > CONTEXT_LENGTH - 8
    kept = fit_history(tokenizer, messages, CONTEXT_LENGTH, 8)
    assert kept[0] == system and kept[-1] == messages[-1]
    assert kept[1]["role"] == "user" and len(kept) < len(messages)
    assert kept[1:] == messages[-(len(kept) - 1) :]  # the newest turns, in order
    assert len(render(tokenizer, kept, add_generation_prompt=True)[0]) <= CONTEXT_LENGTH - 8
    # The exchange before the kept ones would not have fitted.
    first_kept = len(messages) - (len(kept) - 1)
    previous_user = max(i for i in range(1, first_kept) if messages[i]["role"] == "user")
    one_more = [system, *messages[previous_user:]]
    assert len(render(tokenizer, one_more, add_generation_prompt=True)[0]) > CONTEXT_LENGTH - 8
    short = [system, {"role": "user", "content": "hi"}]
    assert fit_history(tokenizer, short, CONTEXT_LENGTH, 8) == short


def test_message_too_long_for_context(chat_data, tmp_path):
    tokenizer = load_tokenizer(chat_data)
    with pytest.raises(UserError, match="--max-new-tokens"):
        fit_history(tokenizer, [{"role": "user", "content": "hi"}], CONTEXT_LENGTH, CONTEXT_LENGTH)
    run_dir = make_run(tmp_path / "sft", chat_data)
    long_message = " ".join(f"word{i}" for i in range(100))
    assert_user_error(
        keel("chat", str(run_dir), "--prompt", long_message, "--max-new-tokens", "8"),
        "last message needs",
        "context of 64 tokens",
        "--max-new-tokens",
    )
    assert_user_error(
        keel("chat", str(run_dir), "--prompt", "hi", "--system", long_message),
        "last message and the system turn need",
        "--max-new-tokens",
    )


def test_pretraining_run_has_no_chat_template(tiny_data, tmp_path):
    run_dir = make_run(tmp_path / "pretrain", tiny_data)
    result = keel("chat", str(run_dir), "--prompt", "hi")
    assert_user_error(result, "has no chat template", "task.kind=sft", "keel sample")
    assert str(run_dir) in result.stderr
