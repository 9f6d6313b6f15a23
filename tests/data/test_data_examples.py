"""SFT examples and preference pairs: the chat template, `keel prepare` of JSONL and built-in sources, the reader."""

import ast
import json
import shutil
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import CORPUS_MODULES, assert_user_error, keel

from keel.data import ExampleData, open_data, open_examples, prepare
from keel.data.chat import ASSISTANT, CHAT_TOKENS, END, SYSTEM, USER, add_chat_tokens, render
from keel.data.clean import Cleaner
from keel.data.examples import Function, build_examples, corrupt, documented_functions, plan_examples, stdlib_examples
from keel.data.shards import split_of
from keel.data.tokenizer import EOT, load_tokenizer
from keel.errors import UserError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
VAL_FRACTION = 0.5  # a few records still fill both splits

PLAIN = [
    {"prompt": f"Question {i}: what is {i} + {i}?\n", "completion": f"The answer is {2 * i}. Voilà, café ☕ {i}!"}
    for i in range(8)
]
CHAT = [
    {"messages": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": f"Name colour number {i}."},
        {"role": "assistant", "content": f"Blue{i}"},
        {"role": "user", "content": "And another? Write <|end|><|assistant|> literally."},
        {"role": "assistant", "content": f"Red{i} <|end|><|assistant|><|endoftext|>"},
    ]}
    for i in range(8)
]  # fmt: skip


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def split_records(records: list, val_fraction: float = VAL_FRACTION) -> dict[str, list]:
    """The records of each split, in file order, as prepare splits them."""
    splits = {"train": [], "val": []}
    for record in records:
        splits[split_of(json.dumps(record, sort_keys=True), val_fraction)].append(record)
    return splits


def decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


@pytest.fixture(scope="module")
def base_vocab(tiny_data) -> int:
    return load_tokenizer(tiny_data).get_vocab_size()


# The chat template.


def test_chat_tokens_are_appended_and_keep_the_base_ids(tiny_data, base_vocab):
    tokenizer = load_tokenizer(tiny_data)
    text = "def f(x):\n    return x  # <|user|>\n"
    before = tokenizer.encode(text).ids
    template = add_chat_tokens(tokenizer)
    appended = list(range(base_vocab, base_vocab + 4))
    assert [tokenizer.token_to_id(t) for t in CHAT_TOKENS] == appended
    assert [template.system_id, template.user_id, template.assistant_id, template.end_id] == appended
    assert template.eot_id == tokenizer.token_to_id(EOT) == 0
    assert tokenizer.encode(text).ids == before  # base ids unchanged, markers in text stay text
    assert add_chat_tokens(tokenizer) == template  # idempotent
    assert tokenizer.get_vocab_size() == base_vocab + 4


def test_render_lays_out_turns_and_masks_the_assistant(tiny_data):
    tokenizer = load_tokenizer(tiny_data)
    t = add_chat_tokens(tokenizer)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
    ]
    ids, mask = render(tokenizer, messages)

    def enc(text):
        return tokenizer.encode(text, add_special_tokens=False).ids

    expected = ([t.eot_id, t.system_id, *enc("Be brief."), t.end_id, t.user_id, *enc("Hi?"), t.end_id,
                 t.assistant_id, *enc("Hello."), t.end_id])  # fmt: skip
    assert ids == expected
    num_reply = len(enc("Hello.")) + 1
    assert mask == [0] * (len(expected) - num_reply) + [1] * num_reply  # reply and its <|end|>, nothing else
    prompt_ids, prompt_mask = render(tokenizer, messages[:2], add_generation_prompt=True)
    assert prompt_ids == expected[:-num_reply] and prompt_ids[-1] == t.assistant_id and not any(prompt_mask)


def test_markers_inside_content_are_plain_text(tiny_data):
    tokenizer = load_tokenizer(tiny_data)
    t = add_chat_tokens(tokenizer)
    content = f"{SYSTEM}{USER}{ASSISTANT}{END}{EOT}"
    ids, mask = render(tokenizer, [{"role": "user", "content": content}])
    specials = {t.eot_id, t.end_id, t.system_id, t.user_id, t.assistant_id}
    inner = ids[2:-1]
    assert not specials & set(inner)
    assert decode(tokenizer, inner) == content and ids[:2] == [t.eot_id, t.user_id] and ids[-1] == t.end_id


# Preparing SFT examples from JSONL.


@pytest.fixture(scope="module")
def sft_dir(tiny_data, tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("sft")
    plain, chat = write_jsonl(folder / "plain.jsonl", PLAIN), write_jsonl(folder / "chat.jsonl", CHAT)
    out = folder / "data"
    manifest = prepare([str(plain), str(chat)], out, tokenizer=tiny_data, val_fraction=VAL_FRACTION, progress=False)
    return out, manifest


def test_sft_manifest_and_files(sft_dir, tiny_data, base_vocab):
    out, manifest = sft_dir
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "tokenizer.json"]
        + [f"{split}.{name}.bin" for split in ("train", "val") for name in ("tokens", "mask", "offsets")]
    )
    assert sorted(p.name for p in out.parent.iterdir()) == ["chat.jsonl", "data", "plain.jsonl"]  # no build dir left
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert (manifest["format"], manifest["version"], manifest["kind"]) == ("keel-data", 2, "sft")
    assert manifest["options"] == {
        "context_length": 256,
        "too_long": "truncate",
        "val_fraction": VAL_FRACTION,
        "min_chars": 32,
        "dedup": "exact",
        "tokenizer_from": str(tiny_data),
    }
    assert manifest["template"] == {
        "eot_id": 0,
        "end_id": base_vocab + 3,
        "system_id": base_vocab,
        "user_id": base_vocab + 1,
        "assistant_id": base_vocab + 2,
    }
    assert manifest["tokenizer"] == {"file": "tokenizer.json", "vocab_size": base_vocab + 4, "eot": EOT, "eot_id": 0}
    assert load_tokenizer(out).token_to_id(END) == base_vocab + 3  # the saved tokenizer is the extended one
    assert manifest["sources"] == [
        {"source": str(out.parent / "plain.jsonl"), "examples": 8},
        {"source": str(out.parent / "chat.jsonl"), "examples": 8},
    ]
    data = open_examples(out, "sft")
    data.verify()
    for split, counts in manifest["splits"].items():
        seqs = data.sequences(split)
        assert counts["examples"] == counts["sequences"] == len(seqs) == len(split_records(PLAIN + CHAT)[split])
        assert counts["tokens"] == len(seqs.tokens) == seqs.offsets[-1] == seqs.lengths().sum()
        assert counts["loss_tokens"] == int(seqs.mask.sum()) and counts["truncated"] == 0
        assert counts["max_length"] == seqs.lengths().max()
        assert seqs.tokens.dtype == np.uint16 and seqs.mask.dtype == np.uint8 and seqs.offsets.dtype == np.int64


def test_plain_and_chat_records_round_trip(sft_dir):
    out, manifest = sft_dir
    data = open_examples(out)
    tokenizer = data.tokenizer
    assert (data.kind, data.vocab_size, data.eot_id, data.end_id) == (
        "sft",
        manifest["tokenizer"]["vocab_size"],
        0,
        manifest["template"]["end_id"],
    )
    for split in ("train", "val"):
        seqs = data.sequences(split)
        expected_bytes = 0
        for i, record in enumerate(split_records(PLAIN)[split] + split_records(CHAT)[split]):
            ids, mask = seqs.get(i)
            assert ids[0] == data.eot_id and mask[-1] == 1  # starts with eot; the end token carries loss
            if "completion" in record:
                assert decode(tokenizer, ids[mask == 1]) == record["completion"] + EOT
                assert decode(tokenizer, ids[mask == 0]) == EOT + record["prompt"]
                assert ids[-1] == data.eot_id
                expected_bytes += len(record["completion"].encode())
            else:
                replies = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
                assert decode(tokenizer, ids[mask == 1]) == "".join(reply + END for reply in replies)
                assert ids[-1] == data.end_id
                # The literal markers in the content are text: the special ids occur once per turn only.
                assert (ids == data.end_id).sum() == len(record["messages"])
                expected_bytes += sum(len(reply.encode()) for reply in replies)
        assert manifest["splits"][split]["bytes"] == expected_bytes


def test_reader_refuses_the_wrong_kind_of_directory(sft_dir, tiny_data):
    out, _ = sft_dir
    with pytest.raises(UserError, match=f"{out} holds SFT examples, not pretraining text"):
        open_data(out)
    with pytest.raises(UserError, match=f"{tiny_data} holds pretraining text, not SFT examples"):
        open_examples(tiny_data)
    with pytest.raises(UserError, match=f"{out} holds SFT examples, not preference pairs"):
        open_examples(out, "pref")


def test_fingerprint_and_verify(sft_dir, tmp_path):
    out, _ = sft_dir
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert open_examples(copy).fingerprint() == open_examples(out).fingerprint()
    mask = bytearray((copy / "train.mask.bin").read_bytes())
    mask[3] ^= 1
    (copy / "train.mask.bin").write_bytes(mask)
    with pytest.raises(UserError, match=f"{copy / 'train.mask.bin'} is corrupted"):
        open_examples(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["train.mask.bin"] = "0" * 64
    assert ExampleData(copy, manifest).fingerprint() != open_examples(out).fingerprint()


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda m: m.pop("template"), "no template"),
        (lambda m: m.update(kind="rlhf"), "kind is 'rlhf', not one of sft, pref"),
        (lambda m: m["splits"]["val"].update(sequences=None), "splits.val.sequences is not int"),
        (lambda m: m["files"].pop("val.offsets.bin"), "files has no sha256 of val.offsets.bin"),
        (lambda m: m["files"].update({"../x": "0" * 64}), "it names '../x', which is not a file of its own directory"),
    ],
)
def test_a_damaged_manifest_of_examples_is_refused(sft_dir, tmp_path, edit, problem):
    copy = tmp_path / "copy"
    shutil.copytree(sft_dir[0], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError) as error:
        open_examples(copy)
    fix = f"re-create {copy} with keel prepare --force"
    assert str(error.value) == f"{copy / 'manifest.json'} is damaged ({problem}); {fix}"
    (copy / "manifest.json").write_text('{"format": "keel-data", "kind": "sft", ')
    with pytest.raises(UserError, match="manifest.json is damaged \\(not a JSON object\\)"):
        open_examples(copy)


def test_missing_tokenizer_of_examples_is_refused(sft_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(sft_dir[0], copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(UserError, match=f"{copy / 'tokenizer.json'} is missing; re-create {copy} with keel prepare"):
        open_examples(copy)


def test_truncation_keeps_the_prompt_and_is_counted(tiny_data, tmp_path):
    long = {"prompt": "Summarise: ", "completion": "word " * 200}
    records = [long] + PLAIN
    source = write_jsonl(tmp_path / "long.jsonl", records)
    manifest = prepare(
        [str(source)],
        tmp_path / "out",
        tokenizer=tiny_data,
        val_fraction=VAL_FRACTION,
        context_length=64,
        progress=False,
    )
    split = split_of(json.dumps(long, sort_keys=True), VAL_FRACTION)
    data = open_examples(tmp_path / "out")
    ids, mask = data.sequences(split).get(0)
    prompt_ids = data.tokenizer.encode(long["prompt"]).ids
    assert len(ids) == 65 and list(ids[1 : 1 + len(prompt_ids)]) == prompt_ids and mask[1 + len(prompt_ids) :].all()
    assert manifest["splits"][split]["truncated"] == 1 and manifest["splits"][split]["max_length"] == 65
    assert sum(s["truncated"] for s in manifest["splits"].values()) == 1
    with pytest.raises(UserError, match=f"{source}:1: the example is .* tokens, more than the context 64"):
        prepare(
            [str(source)],
            tmp_path / "refused",
            tokenizer=tiny_data,
            val_fraction=VAL_FRACTION,
            context_length=64,
            too_long="refuse",
            progress=False,
        )
    assert not (tmp_path / "refused").exists()


def test_a_prompt_longer_than_the_context_is_an_error_even_when_truncating(tiny_data, tmp_path):
    source = write_jsonl(tmp_path / "p.jsonl", PLAIN + [{"prompt": "long " * 100, "completion": "ok"}])
    with pytest.raises(UserError, match=f"{source}:9: the prompt is \\d+ tokens, longer than the context 64;"):
        prepare([str(source)], tmp_path / "out", tokenizer=tiny_data, context_length=64, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


# Preference pairs.

PAIRS = [
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."},
    {"prompt": "Add 2 and 2.", "chosen": "4", "rejected": "5", "p_chosen": 0.75},
    {"prompt": "Best editor?", "chosen": "Whichever you like.", "rejected": "Only mine.",
     "votes": {"chosen": 3, "rejected": 1}},
    {"prompt": [{"role": "user", "content": "Capital of France?"}], "chosen": "Paris.", "rejected": "Lyon.",
     "votes": {"chosen": 1, "rejected": 4}},
    {"prompt": [{"role": "system", "content": "Terse."}, {"role": "user", "content": "2*3?"}],
     "chosen": "6", "rejected": "8", "p_chosen": 0},
    {"prompt": "Spell cat.", "chosen": "c-a-t", "rejected": "k-a-t", "p_chosen": 1},
    {"prompt": "Is water wet?", "chosen": "Yes.", "rejected": "No.", "p_chosen": 0.6},
    {"prompt": "Colour of sky?", "chosen": "Blue.", "rejected": "Green."},
]  # fmt: skip
P_CHOSEN = [1.0, 0.75, 0.75, 0.2, 0.0, 1.0, 0.6, 1.0]


def test_pairs_share_the_prompt_and_store_soft_labels(tiny_data, tmp_path):
    source = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    manifest = prepare([str(source)], tmp_path / "out", tokenizer=tiny_data, val_fraction=VAL_FRACTION, progress=False)
    assert manifest["kind"] == "pref"
    data = open_examples(tmp_path / "out", "pref")
    expected_p = {split: [] for split in ("train", "val")}
    for record, p in zip(PAIRS, P_CHOSEN):
        expected_p[split_of(json.dumps(record, sort_keys=True), VAL_FRACTION)].append(p)
    for split in ("train", "val"):
        records = split_records(PAIRS)[split]
        seqs = data.sequences(split)
        assert len(seqs) == 2 * len(records) == manifest["splits"][split]["sequences"]
        assert manifest["splits"][split]["examples"] == len(records)
        np.testing.assert_allclose(data.p_chosen(split), expected_p[split])
        assert data.p_chosen(split).dtype == np.float32
        for i, record in enumerate(records):
            (chosen, chosen_mask), (rejected, rejected_mask) = seqs.get(2 * i), seqs.get(2 * i + 1)
            num_prompt = int(np.argmax(chosen_mask))
            assert num_prompt == int(np.argmax(rejected_mask))
            assert np.array_equal(chosen[:num_prompt], rejected[:num_prompt])  # the same prompt tokens
            end = data.end_id if isinstance(record["prompt"], list) else data.eot_id
            end_text = END if end == data.end_id else EOT
            assert chosen_mask[num_prompt:].all() and rejected_mask[num_prompt:].all()
            assert decode(data.tokenizer, chosen[num_prompt:]) == record["chosen"] + end_text
            assert decode(data.tokenizer, rejected[num_prompt:]) == record["rejected"] + end_text
            if isinstance(record["prompt"], list):
                assert chosen[num_prompt - 1] == manifest["template"]["assistant_id"]  # the generation prompt


# Built-in sources from the standard library.


def test_documented_functions_split_signature_and_docstring_from_the_body():
    text = (
        "import os\n\n"
        "def top(a,\n        b):\n    '''Add.\n\n    Really.'''\n    # a comment\n    return a + b\n\n"
        'class C:\n    def method(self):\n        """Doc."""  # trailing comment\n'
        "        x = 1\n        return x\n\n"
        "    def undocumented(self):\n        return 2\n\n"
        '    def only_doc(self):\n        """Nothing else."""\n\n'
        '    def long(self):\n        """Long."""\n' + "        x = 1\n" * 300 + "\n"
        'def outer():\n    """Outer."""\n'
        '    def inner():\n        """Inner."""\n        return 1\n    return inner\n'
    )
    skipped = Counter()
    functions = list(documented_functions(text, skipped))
    assert [(f.line, f.prompt, f.body) for f in functions] == [
        (3, "def top(a,\n        b):\n    '''Add.\n\n    Really.'''\n", "    # a comment\n    return a + b\n"),
        (12, '    def method(self):\n        """Doc."""  # trailing comment\n', "        x = 1\n        return x\n"),
        (26 + 300, 'def outer():\n    """Outer."""\n',
         '    def inner():\n        """Inner."""\n        return 1\n    return inner\n'),
    ]  # fmt: skip
    assert skipped == {"empty_body": 1, "body_too_long": 1}


def function_of(source: str) -> Function:
    return next(documented_functions(source))


@pytest.mark.parametrize(
    ("body", "corrupted"),
    [
        ("    return a == b\n", "    return a != b\n"),
        ("    return a <= b or a > c\n", "    return a > b or a > c\n"),
        ("    return a >= b\n", "    return a < b\n"),
        ("    return a < b\n", "    return a >= b\n"),
        ("    return a is not None\n", "    return a is None\n"),
        ("    return a is None\n", "    return a is not None\n"),
        ("    return a not in b\n", "    return a in b\n"),
        # The `in` of a for loop or comprehension is no comparison: the first comparison `in` flips.
        ("    for x in a:\n        y = [z for z in x]\n        if x in b:\n            return True\n",
         "    for x in a:\n        y = [z for z in x]\n        if x not in b:\n            return True\n"),
        # Strings and comments are not touched: the first operator in code flips.
        ("    s = 'a == b'  # x != y\n    t = f'{a == b}'\n    return s or False\n",
         "    s = 'a == b'  # x != y\n    t = f'{a == b}'\n    return s or True\n"),
        # No operator: the first adjacent pair of different statements swaps, comments between stay.
        ("    x = 1\n    x = 1\n    y = f(x)\n    # note\n    return y\n",
         "    x = 1\n    y = f(x)\n    x = 1\n    # note\n    return y\n"),
        ("    @decorator\n    def g():\n        pass\n    return g\n",
         "    return g\n    @decorator\n    def g():\n        pass\n"),
    ],
)  # fmt: skip
def test_corruption(body, corrupted):
    prompt = 'def f(a, b, c=None):\n    """Docstring with a == b and x in y."""\n'
    function = function_of(prompt + body)
    assert function.body == body
    assert corrupt(function) == corrupted
    ast.parse(prompt + corrupted)


def test_no_corruption_possible():
    assert corrupt(function_of('def f(a):\n    """Doc."""\n    return a\n')) is None
    assert corrupt(function_of('def f(a):\n    """Doc."""\n    x = a; return x\n')) is None  # one line: no swap
    assert corrupt(function_of('def f(a):\n    """Doc."""\n    g(a)\n    g(a)\n')) is None  # identical statements


def test_corrupting_a_method_keeps_its_indentation():
    source = "class C:\n    def m(self, x):\n        '''Doc.'''\n        return x == 1\n"
    function = function_of(source)
    assert corrupt(function) == "        return x != 1\n"


@pytest.fixture(scope="module")
def corpus_files() -> list[Path]:
    return [STDLIB / name for name in CORPUS_MODULES]


@pytest.mark.parametrize("kind", ["sft", "pref"])
def test_builtin_examples_follow_the_pretraining_split(tiny_data, corpus_files, kind):
    """No leak: each function lands in the split where pretraining put the text of its file."""
    data = open_data(tiny_data)
    ids = {split: data.tokens(split).tolist() for split in ("train", "val")}
    documents = {split: data.tokenizer.decode(ids[split]) for split in ("train", "val")}  # eot decodes to ""
    plan = plan_examples([f"builtin:stdlib-{kind}"], kind, tiny_data, None, None, None, 32, "exact")
    assert plan.options == {"val_fraction": 0.1, "min_chars": 32, "dedup": "exact"}  # from the base's manifest
    template = add_chat_tokens(data.tokenizer)
    examples = list(stdlib_examples(kind, template, plan.options, corpus_files))
    counts = {split: sum(e.split == split for e in examples) for split in ("train", "val")}
    assert counts["train"] > 100 and counts["val"] > 5
    for example in examples:
        path = Path(example.where.rsplit(":", 1)[0])
        text = Cleaner(32, "exact").clean(str(path), path.read_bytes())
        assert example.split == split_of(text, 0.1)
        prompt, body = example.sequences[0][1].content, example.sequences[0][2].content
        other = "val" if example.split == "train" else "train"
        assert prompt + body in documents[example.split] and prompt + body not in documents[other]
        assert len(example.sequences) == (2 if kind == "pref" else 1)
        if kind == "pref":
            rejected = example.sequences[1][2].content
            assert example.sequences[1][1].content == prompt and rejected != body
            source = prompt + rejected
            ast.parse("if 1:\n" + source if source[0].isspace() else source)  # the corrupted function still parses


def test_a_function_in_files_of_both_splits_is_left_out(tiny_data, tmp_path):
    shared = 'def shared(a):\n    """Shared by two modules."""\n    return a == 1\n'
    own = 'def own{n}(a):\n    """Only in module {n}."""\n    return a != {n}\n'
    options = {"val_fraction": 0.5, "min_chars": 32, "dedup": "exact"}
    files, splits = [], []
    for n in range(40):  # modules until two land in train and one in val
        path = tmp_path / f"module{n}.py"
        path.write_text(shared + "\n" + own.format(n=n))
        split = split_of(path.read_text(), options["val_fraction"])
        if splits.count(split) < (2 if split == "train" else 1):
            files.append(path)
            splits.append(split)
    assert sorted(splits) == ["train", "train", "val"]
    template = add_chat_tokens(load_tokenizer(tiny_data))
    skipped = Counter()
    examples = list(stdlib_examples("sft", template, options, files, skipped))
    assert [e.sequences[0][1].content.split("(")[0] for e in examples] == [f"def own{p.stem[6:]}" for p in files]
    assert skipped == {"in_files_of_both_splits": 3}
    del files[splits.index("val")]  # now only train files share it: it is kept once
    skipped = Counter()
    examples = list(stdlib_examples("sft", template, options, files, skipped))
    assert len(examples) == 3 and skipped == {"duplicate": 1}


def test_builtin_prepare_writes_examples_of_the_limited_files(tiny_data, corpus_files, tmp_path):
    plan = plan_examples(["builtin:stdlib-pref"], "pref", tiny_data, None, 128, None, 32, "exact")
    plan.stdlib_files = corpus_files
    manifest = build_examples(tmp_path, plan, progress=False)
    (source,) = manifest["sources"]
    assert source["examples"] == sum(s["examples"] for s in manifest["splits"].values()) > 100
    assert source["skipped"]["no_corruption"] > 0 and source["skipped"]["prompt_too_long"] > 0
    data = open_examples(tmp_path, "pref")
    for split in ("train", "val"):
        seqs = data.sequences(split)
        assert len(seqs) == 2 * manifest["splits"][split]["examples"] and seqs.lengths().max() <= 129
        assert (data.p_chosen(split) == 1.0).all()
        differ = [not np.array_equal(seqs.get(2 * i)[0], seqs.get(2 * i + 1)[0]) for i in range(len(seqs) // 2)]
        assert all(differ)  # truncation never leaves a pair without a difference


def test_builtin_refuses_a_val_fraction_other_than_pretraining(tiny_data, tmp_path):
    with pytest.raises(UserError, match="--val-fraction 0.3 differs from the 0.1 that split the pretraining data"):
        prepare(["builtin:stdlib-sft"], tmp_path / "out", tokenizer=tiny_data, val_fraction=0.3, progress=False)


# The --tokenizer directory.


def test_run_directory_as_tokenizer_gives_context_and_split(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(tiny_data / "tokenizer.json", run_dir / "tokenizer.json")
    config = {"data": {"path": str(tiny_data)}, "model": {"context_length": 48}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    plan = plan_examples(["x.jsonl"], "sft", run_dir, None, None, None, 32, "exact")
    assert (plan.context_length, plan.options["val_fraction"]) == (48, 0.1)
    source = write_jsonl(tmp_path / "plain.jsonl", PLAIN * 4)
    manifest = prepare([str(source)], tmp_path / "out", tokenizer=run_dir, val_fraction=VAL_FRACTION, progress=False)
    assert manifest["options"]["context_length"] == 48 and manifest["options"]["tokenizer_from"] == str(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"data": {"path": str(tmp_path / "gone")}}))
    with pytest.raises(UserError, match="has no manifest.json, so keel cannot split builtin:stdlib-sft"):
        prepare(["builtin:stdlib-sft"], tmp_path / "out2", tokenizer=run_dir, progress=False)


def test_text_prepare_can_reuse_a_tokenizer(tiny_data, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("bisect.py", "heapq.py", "glob.py", "shlex.py", "textwrap.py", "queue.py"):
        shutil.copy(STDLIB / name, corpus / name)
    manifest = prepare([str(corpus)], tmp_path / "out", tokenizer=tiny_data, val_fraction=0.3, progress=False)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tiny_data / "tokenizer.json").read_bytes()
    assert manifest["options"]["tokenizer_from"] == str(tiny_data)
    assert manifest["options"]["vocab_size"] == manifest["tokenizer"]["vocab_size"] == open_data(tiny_data).vocab_size
    with pytest.raises(UserError, match="--vocab-size 1000 differs from the"):
        prepare([str(corpus)], tmp_path / "out2", tokenizer=tiny_data, vocab_size=1000, progress=False)


# Bad input: one sentence naming the input and the fix, and nothing written.

BAD_RECORDS = [
    ({"prompt": "p"}, ':1 has no "completion" string field'),
    ({"prompt": "p", "completion": 3}, ':1 has no "completion" string field'),
    ({"completion": "c"}, ':1 has no "prompt" string field'),
    ({"prompt": "p", "completion": ""}, ':1 has an empty "completion"'),
    ({"messages": [{"role": "user", "content": "hi"}]}, ':1: "messages" has no assistant turn'),
    ({"messages": [{"role": "bot", "content": "hi"}]}, """:1: message 1 of "messages" has role 'bot'; use one of"""),
    ({"messages": [{"role": "user"}]}, ':1: message 1 of "messages" needs a "role" and a "content" string'),
    ({"messages": []}, ':1: "messages" must be a non-empty list'),
    ({"messages": [{"role": "assistant", "content": "a"}], "prompt": "p"}, ':1 has both "messages" and "prompt"'),
    ({"messages": [{"role": "assistant", "content": ""}]}, ":1 has an assistant turn with empty content"),
    ({"chosen": "a", "rejected": "b"}, ':1 has no "prompt" field'),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, ':1 has an empty "chosen" response'),
    ({"prompt": "p", "chosen": "a", "rejected": ""}, ':1 has an empty "rejected" response'),
    ({"prompt": "p", "chosen": "a"}, ':1 has no "rejected" string field'),
    ({"prompt": 5, "chosen": "a", "rejected": "b"}, ':1: "prompt" is neither a string nor a list of messages'),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"},
     """:1: message 1 of "prompt" has role 'robot'"""),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "p_chosen": 1.5}, ':1: "p_chosen" is 1.5; it must be a number'),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "p_chosen": "0.5"}, """:1: "p_chosen" is '0.5'; it must be"""),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "p_chosen": True}, ':1: "p_chosen" is True'),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "votes": {"chosen": 0, "rejected": 0}}, ':1: "votes" is'),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "votes": {"chosen": -1, "rejected": 3}}, ':1: "votes" is .* >= 0'),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "votes": [1, 2]}, ':1: "votes" is \\[1, 2\\]'),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "p_chosen": 0.5, "votes": {"chosen": 1, "rejected": 1}},
     ':1 has both "p_chosen" and "votes"'),
]  # fmt: skip


@pytest.mark.parametrize(("record", "message"), BAD_RECORDS)
def test_bad_records(tiny_data, tmp_path, record, message):
    source = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(UserError, match=f"^{source}{message}"):
        prepare([str(source)], tmp_path / "out", tokenizer=tiny_data, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_bad_record_after_good_ones_leaves_nothing(tiny_data, tmp_path):
    source = write_jsonl(tmp_path / "bad.jsonl", PLAIN * 100 + [{"prompt": "p", "completion": ""}])
    with pytest.raises(UserError, match=f"{source}:801 has an empty"):
        prepare([str(source)], tmp_path / "out", tokenizer=tiny_data, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_mixed_kinds_in_one_file_or_prepare(tiny_data, tmp_path):
    mixed = write_jsonl(tmp_path / "mixed.jsonl", PLAIN[:2] + PAIRS[:1])
    with pytest.raises(UserError, match=f"{mixed}:3 holds preference pairs but {mixed}:1 holds SFT examples"):
        prepare([str(mixed)], tmp_path / "out", tokenizer=tiny_data, progress=False)
    text_then_sft = write_jsonl(tmp_path / "text.jsonl", [{"text": "a text document, long enough to keep"}] + PLAIN[:1])
    with pytest.raises(UserError, match=f"{text_then_sft}:2 is an SFT example or preference pair among text documents"):
        prepare([str(text_then_sft)], tmp_path / "out", progress=False)
    not_object = write_jsonl(tmp_path / "list.jsonl", PLAIN[:1] + [["prompt", "completion"]])
    with pytest.raises(UserError, match=f"{not_object}:2 is not a JSON object; an SFT example is"):
        prepare([str(not_object)], tmp_path / "out", tokenizer=tiny_data, progress=False)
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"question": "?"}])
    with pytest.raises(UserError, match=f'{unknown}:1 has none of the fields "text", "prompt"'):
        prepare([str(unknown)], tmp_path / "out", tokenizer=tiny_data, progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_inputs_through_the_cli(tiny_data, tmp_path):
    plain, pairs = write_jsonl(tmp_path / "plain.jsonl", PLAIN), write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = str(tmp_path / "out")
    assert_user_error(keel("prepare", str(plain), "--out", out), "--tokenizer", str(plain))
    assert_user_error(
        keel("prepare", str(plain), str(pairs), "--tokenizer", str(tiny_data), "--out", out),
        f"{pairs} holds preference pairs but {plain} holds SFT examples",
    )
    assert_user_error(
        keel("prepare", str(plain), "--tokenizer", str(tmp_path), "--out", out),
        f"--tokenizer {tmp_path} has no tokenizer.json",
    )
    (tmp_path / "broken.jsonl").write_text('{"prompt": "p", "completion": "c"}\n{"prompt": oops}\n')
    assert_user_error(
        keel("prepare", str(tmp_path / "broken.jsonl"), "--tokenizer", str(tiny_data), "--out", out),
        f"{tmp_path / 'broken.jsonl'}:2 is not valid JSON",
    )
    assert_user_error(keel("prepare", "builtin:stdlib-chat", "--out", out), "unknown builtin", "builtin:stdlib-sft")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jsonl", "pairs.jsonl", "plain.jsonl"]


def test_prepare_examples_through_the_cli(tiny_data, tmp_path):
    source = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    result = keel(
        "prepare",
        str(source),
        "--tokenizer",
        str(tiny_data),
        "--out",
        str(tmp_path / "out"),
        "--val-fraction",
        "0.5",
        "--context-length",
        "40",
        "--too-long",
        "truncate",
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'out'}: SFT examples" in result.stdout and "context 40" in result.stdout
    manifest = open_examples(tmp_path / "out").manifest
    assert manifest["options"]["context_length"] == 40 and manifest["options"]["val_fraction"] == 0.5
    assert sum(s["truncated"] for s in manifest["splits"].values()) == len(CHAT)
