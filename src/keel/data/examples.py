"""SFT examples and preference pairs: JSONL records and built-in sources -> token sequences + loss masks.

Input records (JSONL, one per line; the kind is read from the fields):

- SFT, plain: `{"prompt": str, "completion": str}`;
- SFT, chat: `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`,
  with at least one assistant turn;
- preference pair: `{"prompt": str | messages, "chosen": str, "rejected": str}`, with an optional
  soft label: `"p_chosen"` in [0, 1] (the share of raters who preferred chosen) or
  `"votes": {"chosen": a, "rejected": b}` (p = a / (a + b)); neither means p = 1.

Sequences follow the template of `keel.data.chat`. A pair becomes two sequences, 2i = prompt +
chosen and 2i+1 = prompt + rejected, with the same prompt tokens and the mask on the response
and its end token. A sequence of L tokens fits a context of T when L <= T + 1 (inputs and
targets are the same tokens shifted by one); a longer one is refused or has the end of its
response cut, and a prompt that leaves no room for one response token is always an error.

Built-in sources, made from the files `builtin:python-stdlib` reads:

- `builtin:stdlib-sft`: every function or method with a docstring (defined at module or class
  level, also inside if/try/with blocks there, not inside other functions) is one example:
  prompt = its source from the start of its `def` line through the line that ends its docstring
  (signature and docstring, original indentation), completion = the rest of its source. A
  function whose remaining body is empty, or longer than 2000 characters, or whose docstring
  line also holds code, is skipped.
- `builtin:stdlib-pref`: the same functions, chosen = the real body, rejected = the body with one
  mechanical corruption. The first token of the body (found with `tokenize`, so strings,
  f-strings and comments are never touched) that is one of `==` / `!=`, `<=` / `>`, `>=` / `<`,
  `is not` / `is`, `not in` / `in` (comparison only: an `in` of a for loop or comprehension
  does not count), `True` / `False` is replaced by its partner; if there is none, the first pair
  of adjacent statements at the top level of the body whose sources differ (each on lines of
  its own) are swapped; if neither is possible the function is skipped. The rejected function
  still parses. A pair whose difference truncation cuts off is skipped.

Built-in examples that do not fit the context (a prompt longer than it, or a sequence too long
under --too-long refuse) are skipped and counted, not errors: nobody can edit the standard library.

No built-in example leaks: a file's examples go to the split its text went to in pretraining,
`split_of(Cleaner(min_chars, dedup).clean(path, bytes), val_fraction)` with the options of the
base data (the data directory given as --tokenizer, or the data of the run given as --tokenizer);
files the cleaner drops were not pretrained on and give no examples. A function found word for
word in files of both splits (posixpath and ntpath share some) is skipped, since pretraining saw
it on both sides; a repeat within one split is kept once. Records of user files are
split by `split_of(json.dumps(record, sort_keys=True), val_fraction)`.

DATA_DIR holds `manifest.json` (version 2, "kind": "sft" | "pref"), the tokenizer extended with
the chat markers, and per split `{split}.tokens.bin` (all sequences back to back, manifest
dtype), `{split}.mask.bin` (uint8 per token: 1 = the token carries loss), `{split}.offsets.bin`
(int64, sequences + 1 entries: sequence i is tokens[offsets[i]:offsets[i+1]]) and, for pairs,
`{split}.p_chosen.bin` (float32 per pair). A split's "bytes" is the UTF-8 size of its masked
text, for bits per byte.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import json
import math
import os
import re
import tokenize
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from keel.data.chat import ROLES, Piece, Template, add_chat_tokens, chat_pieces, encode_pieces, plain_pieces
from keel.data.clean import Cleaner
from keel.data.shards import (
    FORMAT,
    MANIFEST_FILE,
    SPLITS,
    check_manifest,
    read_manifest,
    sha256_file,
    split_of,
    token_dtype,
    verify_files,
)
from keel.data.sources import python_stdlib_files
from keel.data.tokenizer import EOT, TOKENIZER_FILE, load_tokenizer
from keel.data.toy import TOY_SOURCES, toy_base, toy_examples
from keel.errors import UserError

EXAMPLES_VERSION = 2
KINDS = ("sft", "pref")
KIND_NAMES = {"text": "pretraining text", "sft": "SFT examples", "pref": "preference pairs"}
BUILTIN_SOURCES = {"builtin:stdlib-sft": "sft", "builtin:stdlib-pref": "pref"}
TOO_LONG_MODES = ("truncate", "refuse")
DEFAULT_CONTEXT_LENGTH = 256
DEFAULT_VAL_FRACTION = 0.02
MAX_BODY_CHARS = 2000
RUN_CONFIG_FILE = "config.yaml"  # as keel.runs.rundir writes it (not imported: runs depends on data)
ENCODE_BATCH = 512  # examples encoded per encode_batch call
FORMS = {
    "sft": 'an SFT example is {"prompt": "...", "completion": "..."} or {"messages": [{"role": ..., "content": ...}]}',
    "pref": 'a preference pair is {"prompt": "..." or [messages], "chosen": "...", "rejected": "..."}',
}


def record_kind(record: dict) -> str | None:
    """ "pref", "sft" or "text", from the fields a record has; None if it has none of them."""
    if "chosen" in record or "rejected" in record:
        return "pref"
    if "messages" in record or "completion" in record:
        return "sft"
    if "text" in record:
        return "text"
    if "prompt" in record:
        return "sft"  # a prompt without its completion: the SFT checks name the missing field
    return None


def source_kind(source: str) -> str:
    """The kind of data a source holds: builtin names say it, a .jsonl file's first record shows it."""
    if source in BUILTIN_SOURCES:
        return BUILTIN_SOURCES[source]
    if source in TOY_SOURCES:
        return "sft"
    path = Path(source)
    if path.suffix != ".jsonl" or not path.is_file() or not os.access(path, os.R_OK):
        return "text"  # the text reader counts a file it may not read as unreadable and says so
    for line_number, record in _jsonl_records(path):
        if not isinstance(record, dict):
            return "text"  # the text reader names the line
        kind = record_kind(record)
        if kind is None:
            raise UserError(
                f'{path}:{line_number} has none of the fields "text", "prompt", "messages", "chosen"; '
                f'each line must be a text document {{"text": ...}}, {FORMS["sft"]}, or {FORMS["pref"]}'
            )
        return kind
    return "text"  # an empty file: the text reader says it holds no documents


def kind_of_sources(sources: list[str]) -> str:
    """The one kind all sources share; a UserError naming two sources of different kinds."""
    kinds = [source_kind(source) for source in sources]
    for source, kind in zip(sources, kinds):
        if kind != kinds[0]:
            raise UserError(
                f"{source} holds {KIND_NAMES[kind]} but {sources[0]} holds {KIND_NAMES[kinds[0]]}; "
                "a data directory holds one kind, so run keel prepare once per kind"
            )
    return kinds[0]


# The base: the data or run directory given as --tokenizer.


@dataclass
class Base:
    """What prepare takes from the --tokenizer directory."""

    path: Path
    # val_fraction, min_chars, dedup of the base's pretraining data; {} when it has no manifest
    # (a bare tokenizer.json: defaults apply); None when it is a run whose data cannot be found.
    options: dict | None
    context_length: int | None  # model.context_length when the base is a run directory

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.path)


def resolve_base(path: Path) -> Base:
    """Read a --tokenizer directory: a data dir (manifest.json), a run dir (config.yaml) or just a tokenizer.json."""
    path = Path(path)
    if not (path / TOKENIZER_FILE).is_file():
        raise UserError(
            f"--tokenizer {path} has no {TOKENIZER_FILE}; pass a data directory written by keel prepare "
            "or a run directory written by keel train"
        )
    if (path / RUN_CONFIG_FILE).is_file():
        import yaml  # imported here: only run directories need it

        try:
            config = yaml.safe_load((path / RUN_CONFIG_FILE).read_text())
        except yaml.YAMLError:
            config = None
        if not isinstance(config, dict):
            raise UserError(
                f"{path / RUN_CONFIG_FILE} is not a run config; pass --tokenizer the directory keel train wrote"
            )
        data_path = (config.get("data") or {}).get("path")
        context_length = (config.get("model") or {}).get("context_length")
        manifest = read_manifest(Path(data_path)) if data_path else None
        return Base(path, _split_options(manifest) if manifest else None, context_length)
    manifest = read_manifest(path)
    return Base(path, _split_options(manifest) if manifest else {}, None)


def _split_options(manifest: dict) -> dict:
    options = manifest.get("options", {})
    return {key: options[key] for key in ("val_fraction", "min_chars", "dedup") if key in options}


# Reading and checking records.


@dataclass
class Example:
    """One example before encoding: where it came from, its split, its sequences and (pairs) its soft label."""

    where: str  # file:line, for error messages
    split: str
    sequences: list[list[Piece]]  # one for SFT; chosen and rejected for a pair
    p_chosen: float = 1.0
    # Built-in examples that cannot fit are skipped and counted: nobody can edit the standard library.
    skip_if_unfit: bool = False


def _jsonl_records(path: Path) -> Iterator[tuple[int, object]]:
    with open(path, "rb") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
                reason = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
                raise UserError(f"{path}:{line_number} is not valid JSON ({reason}); fix or remove that line") from err
            yield line_number, record


def jsonl_examples(path: Path, kind: str, template: Template, val_fraction: float) -> Iterator[Example]:
    """The examples of one JSONL file of `kind`; a UserError naming file:line for the first bad record."""
    first = None
    for line_number, record in _jsonl_records(path):
        where = f"{path}:{line_number}"
        if not isinstance(record, dict):
            raise UserError(f"{where} is not a JSON object; {FORMS[kind]}")
        record_kind_ = record_kind(record)
        if record_kind_ != kind:
            if record_kind_ is None:
                raise UserError(f"{where} has none of the fields of {KIND_NAMES[kind]}; {FORMS[kind]}")
            raise UserError(
                f"{where} holds {KIND_NAMES[record_kind_]} but {first or path} holds {KIND_NAMES[kind]}; "
                "put each kind in its own file and prepare them separately"
            )
        first = first or where
        split = split_of(json.dumps(record, sort_keys=True), val_fraction)
        if kind == "sft":
            yield Example(where, split, [_sft_pieces(record, where, template)])
        else:
            yield Example(where, split, _pair_pieces(record, where, template), _p_chosen(record, where))


def _sft_pieces(record: dict, where: str, template: Template) -> list[Piece]:
    if "messages" in record:
        if "prompt" in record or "completion" in record:
            raise UserError(f'{where} has both "messages" and "prompt"/"completion"; keep one form per example')
        messages = _messages(record["messages"], where, "messages")
        assistant_turns = [m for m in messages if m["role"] == "assistant"]
        if not assistant_turns:
            raise UserError(
                f'{where}: "messages" has no assistant turn, so there is nothing to learn; '
                'add a {"role": "assistant", "content": "..."} message or remove the line'
            )
        if any(not m["content"] for m in assistant_turns):
            raise UserError(f"{where} has an assistant turn with empty content; write the reply or remove the line")
        return chat_pieces(template, messages)
    prompt = _string(record, "prompt", where, "sft")
    completion = _string(record, "completion", where, "sft")
    if not completion:
        raise UserError(f'{where} has an empty "completion"; write the text to learn or remove the line')
    return plain_pieces(template, prompt, completion)


def _pair_pieces(record: dict, where: str, template: Template) -> list[list[Piece]]:
    if "prompt" not in record:
        raise UserError(f'{where} has no "prompt" field; {FORMS["pref"]}')
    prompt = record["prompt"]
    if isinstance(prompt, list):
        prefix = chat_pieces(template, _messages(prompt, where, "prompt"), add_generation_prompt=True)
        end_id = template.end_id
    elif isinstance(prompt, str):
        prefix = [Piece(template.eot_id, False), Piece(prompt, False)]
        end_id = template.eot_id
    else:
        raise UserError(f'{where}: "prompt" is neither a string nor a list of messages; {FORMS["pref"]}')
    responses = []
    for key in ("chosen", "rejected"):
        response = _string(record, key, where, "pref")
        if not response:
            raise UserError(f'{where} has an empty "{key}" response; write the response or remove the line')
        responses.append([*prefix, Piece(response, True), Piece(end_id, True)])
    return responses


def _string(record: dict, key: str, where: str, kind: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise UserError(f'{where} has no "{key}" string field; {FORMS[kind]}')
    return value


def _messages(value: object, where: str, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise UserError(f'{where}: "{key}" must be a non-empty list of {{"role": ..., "content": ...}} messages')
    for number, message in enumerate(value, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise UserError(f'{where}: message {number} of "{key}" needs a "role" and a "content" string')
        if message.get("role") not in ROLES:
            raise UserError(
                f'{where}: message {number} of "{key}" has role {message.get("role")!r}; use one of {", ".join(ROLES)}'
            )
    return value


def _is_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, int) or math.isfinite(value)


def _p_chosen(record: dict, where: str) -> float:
    """The soft label of a pair: share of raters who preferred chosen (1.0 without one)."""
    if "p_chosen" in record and "votes" in record:
        raise UserError(f'{where} has both "p_chosen" and "votes"; keep one of them')
    if "p_chosen" in record:
        p = record["p_chosen"]
        if not _is_number(p) or not 0 <= p <= 1:
            raise UserError(f'{where}: "p_chosen" is {p!r}; it must be a number from 0 to 1 (share preferring chosen)')
        return float(p)
    if "votes" in record:
        votes = record["votes"]
        counts = [votes.get(key) for key in ("chosen", "rejected")] if isinstance(votes, dict) else [None]
        if not all(_is_number(c) and c >= 0 for c in counts) or sum(counts) <= 0:
            raise UserError(
                f'{where}: "votes" is {votes!r}; it must be {{"chosen": a, "rejected": b}} '
                "with counts >= 0 and a + b > 0"
            )
        return counts[0] / (counts[0] + counts[1])
    return 1.0


# Built-in sources: functions of the standard library.


@dataclass
class Function:
    """A documented function: its `def` line through its docstring (`prompt`) and the rest (`body`)."""

    line: int  # of the def, 1-based
    prompt: str
    body: str
    statements: list[tuple[int, int]]  # (first, last) line of each statement after the docstring, decorators included


def documented_functions(text: str, skipped: Counter | None = None) -> Iterator[Function]:
    """The documented functions of a module's source (see the module docstring); reasons to skip go to `skipped`."""
    skipped = Counter() if skipped is None else skipped
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        skipped["unparsable_file"] += 1
        return
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)] + [len(text)]
    lines = text.split("\n")
    for node in _definitions(tree.body):
        docstring = node.body[0] if ast.get_docstring(node, clean=False) is not None else None
        if docstring is None:
            continue
        after_docstring = lines[docstring.end_lineno - 1].encode()[docstring.end_col_offset :].decode(errors="replace")
        if len(node.body) == 1:
            skipped["empty_body"] += 1
        elif after_docstring.strip() and not after_docstring.strip().startswith("#"):
            skipped["code_on_docstring_line"] += 1
        else:
            body_end = line_starts[min(node.end_lineno, len(line_starts) - 1)]
            body = text[line_starts[docstring.end_lineno] : body_end]
            if len(body) > MAX_BODY_CHARS:
                skipped["body_too_long"] += 1
            else:
                prompt = text[line_starts[node.lineno - 1] : line_starts[docstring.end_lineno]]
                statements = [
                    (min([s.lineno] + [d.lineno for d in getattr(s, "decorator_list", [])]), s.end_lineno)
                    for s in node.body[1:]
                ]
                yield Function(node.lineno, prompt, body, statements)


BLOCKS = (ast.If, ast.Try, ast.With, ast.AsyncWith, ast.ExceptHandler)


def _definitions(statements: list[ast.stmt]) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Functions defined at this level, in classes, and in if/try/with blocks here; not inside functions."""
    for node in statements:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        elif isinstance(node, ast.ClassDef):
            yield from _definitions(node.body)
        elif isinstance(node, BLOCKS) or type(node).__name__ == "TryStar":  # ast.TryStar: Python 3.11+
            for name in ("body", "handlers", "orelse", "finalbody"):
                yield from _definitions(getattr(node, name, []))


# Each flip negates a comparison (not (a <= b) is a > b) or a constant.
FLIPS = {"==": "!=", "!=": "==", "<=": ">", ">": "<=", ">=": "<", "<": ">=", "True": "False", "False": "True"}


def corrupt(function: Function) -> str | None:
    """The function's body with one mechanical corruption (see the module docstring), or None if none applies."""
    if not _parses(function.prompt + function.body):
        return None
    return _flip_first_operator(function) or _swap_first_statements(function)


def _flip_first_operator(function: Function) -> str | None:
    source = function.prompt + function.body
    line_starts = [0] + [m.end() for m in re.finditer("\n", source)]
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return None
    fstring_start, fstring_end = getattr(tokenize, "FSTRING_START", None), getattr(tokenize, "FSTRING_END", None)
    fstring_depth = 0
    for i, token in enumerate(tokens):
        # Python 3.12+ tokenizes the code inside f-strings; it is string content here.
        fstring_depth += (token.type == fstring_start) - (token.type == fstring_end)
        start = line_starts[token.start[0] - 1] + token.start[1]
        if fstring_depth or start < len(function.prompt) or token.type not in (tokenize.OP, tokenize.NAME):
            continue
        end = line_starts[token.end[0] - 1] + token.end[1]
        following = tokens[i + 1] if i + 1 < len(tokens) else None
        if token.string in FLIPS:
            replacement = FLIPS[token.string]
        elif token.string == "is":
            if following is not None and following.string == "not":  # "is not" -> "is"
                end = line_starts[following.end[0] - 1] + following.end[1]
                replacement = "is"
            else:
                replacement = "is not"
        elif token.string == "not" and following is not None and following.string == "in":  # "not in" -> "in"
            end = line_starts[following.end[0] - 1] + following.end[1]
            replacement = "in"
        elif token.string == "in" and tokens[i - 1].string != "not":
            replacement = "not in"
        else:
            continue
        corrupted = source[:start] + replacement + source[end:]
        if _parses(corrupted):  # rules out the `in` of for loops and comprehensions
            return corrupted[len(function.prompt) :]
    return None


def _swap_first_statements(function: Function) -> str | None:
    first_body_line = function.line + function.prompt.count("\n")
    lines = function.body.split("\n")
    # A pair swaps only if neither statement shares a line with a neighbour (`a = 1; b = 2`), so whole lines move.
    spans = function.statements
    ends_before = [first_body_line - 1] + [last for _, last in spans]  # last line of the statement before each
    starts_after = [first for first, _ in spans[2:]] + [None]  # first line of the statement after each pair
    for (a_first, a_last), (b_first, b_last), before, after in zip(spans, spans[1:], ends_before, starts_after):
        if not (before < a_first and a_last < b_first and (after is None or b_last < after)):
            continue
        a0, a1, b0, b1 = (n - first_body_line for n in (a_first, a_last, b_first, b_last))
        if lines[a0 : a1 + 1] == lines[b0 : b1 + 1]:
            continue
        swapped = lines[:a0] + lines[b0 : b1 + 1] + lines[a1 + 1 : b0] + lines[a0 : a1 + 1] + lines[b1 + 1 :]
        body = "\n".join(swapped)
        if _parses(function.prompt + body):
            return body
    return None


def _parses(function_source: str) -> bool:
    # A method's source is indented: an `if` block makes it a statement that parses on its own.
    code = "if True:\n" + function_source if function_source[:1].isspace() else function_source
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def stdlib_examples(
    kind: str, template: Template, options: dict, files: list[Path] | None = None, skipped: Counter | None = None
) -> Iterator[Example]:
    """The examples of builtin:stdlib-sft or -pref, each in the split its file went to in pretraining.

    `options` holds val_fraction, min_chars and dedup of the pretraining data; `files` (default:
    the standard library, as builtin:python-stdlib reads it) lets tests use a few files.
    """
    skipped = Counter() if skipped is None else skipped
    cleaner = Cleaner(options["min_chars"], options["dedup"])
    found = []  # (where, split, function, digest) of every documented function, in file order
    splits_of_function: dict[bytes, set[str]] = {}
    for path in python_stdlib_files() if files is None else files:
        text = cleaner.clean(str(path), path)
        if text is None:  # not in the pretraining data either
            skipped["file_dropped_by_cleaner"] += 1
            continue
        split = split_of(text, options["val_fraction"])
        for function in documented_functions(text, skipped):
            digest = hashlib.blake2b((function.prompt + function.body).encode(), digest_size=16).digest()
            splits_of_function.setdefault(digest, set()).add(split)
            found.append((f"{path}:{function.line}", split, function, digest))
    seen = set()
    for where, split, function, digest in found:
        if len(splits_of_function[digest]) > 1:
            skipped["in_files_of_both_splits"] += 1
            continue
        if digest in seen:
            skipped["duplicate"] += 1
            continue
        seen.add(digest)
        if kind == "sft":
            bodies = [function.body]
        elif (rejected := corrupt(function)) is not None:
            bodies = [function.body, rejected]
        else:
            skipped["no_corruption"] += 1
            continue
        sequences = [plain_pieces(template, function.prompt, body) for body in bodies]
        yield Example(where, split, sequences, skip_if_unfit=True)


# Building a DATA_DIR of examples.


@dataclass
class Plan:
    """Everything checked before any file is written."""

    sources: list[str]
    kind: str
    base: Base
    context_length: int
    too_long: str
    options: dict  # val_fraction, min_chars, dedup
    stdlib_files: list[Path] | None = None  # tests: a few files instead of the whole standard library


def plan_examples(
    sources: list[str],
    kind: str,
    tokenizer_dir: Path | None,
    val_fraction: float | None,
    context_length: int | None,
    too_long: str | None,
    min_chars: int,
    dedup: str,
) -> Plan:
    """Check the options of an SFT or preference prepare and settle the ones taken from the base."""
    if tokenizer_dir is not None:
        base = resolve_base(Path(tokenizer_dir))
    elif all(source in TOY_SOURCES for source in sources):
        base = toy_base(sources)  # toy symbols bring their own tokenizer (keel.data.toy)
    else:
        raise UserError(
            f"{sources[0]} holds {KIND_NAMES[kind]}, which must use the tokenizer of the model they will train: "
            "pass --tokenizer RUN_DIR or --tokenizer DATA_DIR"
        )
    too_long = too_long or "truncate"
    if too_long not in TOO_LONG_MODES:
        raise UserError(f"unknown --too-long {too_long!r}; use one of {', '.join(TOO_LONG_MODES)}")
    context_length = context_length or base.context_length or DEFAULT_CONTEXT_LENGTH
    if context_length < 1:
        raise UserError(f"--context-length {context_length} must be at least 1")
    uses_stdlib = [source for source in sources if source in BUILTIN_SOURCES]
    if uses_stdlib and base.options is None:
        raise UserError(
            f"the data of run {base.path} (data.path in its {RUN_CONFIG_FILE}) has no {MANIFEST_FILE}, so keel cannot "
            f"split {uses_stdlib[0]} as pretraining did; pass --tokenizer that data directory instead"
        )
    base_options = base.options or {}
    base_fraction = base_options.get("val_fraction")
    if uses_stdlib and val_fraction is not None and base_fraction is not None and val_fraction != base_fraction:
        raise UserError(
            f"--val-fraction {val_fraction} differs from the {base_fraction} that split the pretraining data of "
            f"{base.path}; {uses_stdlib[0]} must split as pretraining did so that no validation function was "
            "trained on: drop --val-fraction"
        )
    options = {
        "val_fraction": val_fraction if val_fraction is not None else base_fraction or DEFAULT_VAL_FRACTION,
        "min_chars": base_options.get("min_chars", min_chars),
        "dedup": base_options.get("dedup", dedup),
    }
    if not 0 < options["val_fraction"] < 1:
        raise UserError(
            f"val fraction {options['val_fraction']} must lie strictly between 0 and 1; 0.02 is a good start"
        )
    return Plan(sources, kind, base, context_length, too_long, options)


class _SplitWriter:
    """Appends the sequences of one split to its .bin files and keeps its counts."""

    def __init__(self, build_dir: Path, split: str, kind: str, dtype: np.dtype, byte_lengths: np.ndarray):
        names = ["tokens", "mask", "offsets"] + (["p_chosen"] if kind == "pref" else [])
        self.files = {name: f"{split}.{name}.bin" for name in names}
        self._out = {name: open(build_dir / file, "wb") for name, file in self.files.items()}
        self._dtype, self._byte_lengths = dtype, byte_lengths
        self.counts = {
            "examples": 0,
            "sequences": 0,
            "tokens": 0,
            "loss_tokens": 0,
            "truncated": 0,
            "max_length": 0,
            "bytes": 0,
        }
        self._out["offsets"].write(np.zeros(1, np.int64).tobytes())

    def add(self, sequences: list[tuple[np.ndarray, np.ndarray]], num_truncated: int, p_chosen: float) -> None:
        counts = self.counts
        for ids, mask in sequences:
            self._out["tokens"].write(ids.astype(self._dtype).tobytes())
            self._out["mask"].write(mask.tobytes())
            counts["tokens"] += len(ids)
            self._out["offsets"].write(np.array([counts["tokens"]], np.int64).tobytes())
            counts["loss_tokens"] += int(mask.sum())
            counts["bytes"] += int(self._byte_lengths[ids[mask == 1]].sum())
            counts["max_length"] = max(counts["max_length"], len(ids))
        counts["examples"] += 1
        counts["sequences"] += len(sequences)
        counts["truncated"] += num_truncated
        if "p_chosen" in self._out:
            self._out["p_chosen"].write(np.array([p_chosen], np.float32).tobytes())

    def close(self) -> None:
        for out in self._out.values():
            out.close()


def build_examples(build_dir: Path, plan: Plan, progress: bool = True) -> dict:
    """Write the files of an SFT or preference DATA_DIR into `build_dir` and return its manifest."""
    tokenizer = plan.base.tokenizer()
    if tokenizer.token_to_id(EOT) is None:
        raise UserError(
            f"{plan.base.path / TOKENIZER_FILE} has no {EOT} token; use a tokenizer written by keel prepare"
        )
    template = add_chat_tokens(tokenizer)
    vocab_size = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab_size)
    writers = {split: _SplitWriter(build_dir, split, plan.kind, dtype, _byte_lengths(tokenizer)) for split in SPLITS}
    source_counts = []
    try:
        with tqdm(desc="examples", unit=" examples", disable=not progress) as bar:
            for source in plan.sources:
                skipped: Counter = Counter()
                if source in BUILTIN_SOURCES:
                    examples = stdlib_examples(plan.kind, template, plan.options, plan.stdlib_files, skipped)
                elif source in TOY_SOURCES:
                    examples = toy_examples(source, template, plan.options["val_fraction"], skipped)
                else:
                    examples = jsonl_examples(Path(source), plan.kind, template, plan.options["val_fraction"])
                num_examples = 0
                for batch in _batched(examples, ENCODE_BATCH):
                    num_examples += _write_batch(batch, tokenizer, plan, writers, skipped)
                    bar.update(len(batch))
                if num_examples == 0:
                    raise UserError(f"{source} contains no examples; check that it is the file you meant")
                counts = {"source": source, "examples": num_examples}
                source_counts.append({**counts, "skipped": dict(skipped)} if skipped else counts)
    finally:
        for writer in writers.values():
            writer.close()
    splits = {split: writer.counts for split, writer in writers.items()}
    if not all(splits[split]["examples"] for split in SPLITS):
        raise UserError(
            f"the examples are too few to split: {splits['train']['examples']} went to train and "
            f"{splits['val']['examples']} to validation at val fraction {plan.options['val_fraction']}; "
            "add examples or change --val-fraction"
        )
    tokenizer.save(str(build_dir / TOKENIZER_FILE))
    files = [TOKENIZER_FILE] + [name for writer in writers.values() for name in writer.files.values()]
    manifest = {
        "format": FORMAT,
        "version": EXAMPLES_VERSION,
        "kind": plan.kind,
        "sources": source_counts,
        "options": {
            "context_length": plan.context_length,
            "too_long": plan.too_long,
            **plan.options,
            "tokenizer_from": str(plan.base.path),
        },
        "template": template.to_dict(),
        "tokenizer": {"file": TOKENIZER_FILE, "vocab_size": vocab_size, "eot": EOT, "eot_id": template.eot_id},
        "dtype": dtype.name,
        "splits": splits,
        "files": {name: sha256_file(build_dir / name) for name in files},
        "sizes": {name: (build_dir / name).stat().st_size for name in files},
    }
    (build_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _write_batch(
    batch: list[Example], tokenizer: Tokenizer, plan: Plan, writers: dict[str, _SplitWriter], skipped: Counter
) -> int:
    """Encode, fit and write a batch of examples; returns how many were written."""
    encoded = iter(encode_pieces(tokenizer, [pieces for example in batch for pieces in example.sequences]))
    num_written = 0
    for example in batch:
        sequences = [next(encoded) for _ in example.sequences]
        if example.skip_if_unfit:
            reason = _unfit(sequences, plan.context_length, plan.too_long)
            if reason is not None:
                skipped[reason] += 1
                continue
        fitted = [fit(ids, mask, plan.context_length, plan.too_long, example.where) for ids, mask in sequences]
        if example.skip_if_unfit and len(fitted) == 2 and np.array_equal(fitted[0][0], fitted[1][0]):
            skipped["corruption_cut_off"] += 1  # truncation cut off the only difference: nothing to prefer
            continue
        num_truncated = sum(truncated for *_, truncated in fitted)
        writers[example.split].add([(ids, mask) for ids, mask, _ in fitted], num_truncated, example.p_chosen)
        num_written += 1
    return num_written


def _unfit(sequences: list[tuple[list[int], list[int]]], context_length: int, too_long: str) -> str | None:
    """Why `fit` would refuse these sequences ("prompt_too_long" or "too_long"), or None if it would not."""
    if any(mask.index(1) > context_length for _, mask in sequences):
        return "prompt_too_long"
    if too_long == "refuse" and any(len(ids) > context_length + 1 for ids, _ in sequences):
        return "too_long"
    return None


def fit(
    ids: list[int], mask: list[int], context_length: int, too_long: str, where: str
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(ids, mask, truncated) of a sequence made to fit T + 1 tokens; a UserError if it cannot or may not."""
    num_prompt = mask.index(1)
    if num_prompt > context_length:
        raise UserError(
            f"{where}: the prompt is {num_prompt} tokens, longer than the context {context_length}; "
            "shorten the prompt or raise --context-length"
        )
    truncated = len(ids) > context_length + 1
    if truncated:
        if too_long == "refuse":
            raise UserError(
                f"{where}: the example is {len(ids)} tokens, more than the context {context_length} + 1; "
                "shorten it, raise --context-length, or pass --too-long truncate"
            )
        ids, mask = ids[: context_length + 1], mask[: context_length + 1]
    return np.asarray(ids, np.int64), np.asarray(mask, np.uint8), truncated


def _byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for: byte-level BPE spells each byte as one character; markers are 0."""
    lengths = np.zeros(tokenizer.get_vocab_size(), np.int64)
    for token, token_id in tokenizer.get_vocab(with_added_tokens=False).items():
        lengths[token_id] = len(token)
    lengths[list(tokenizer.get_added_tokens_decoder())] = 0
    return lengths


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def summary(manifest: dict, out: str) -> str:
    """What `keel prepare` prints for an SFT or preference DATA_DIR."""
    options = manifest["options"]
    lines = [
        f"wrote {out}: {KIND_NAMES[manifest['kind']]}, vocab {manifest['tokenizer']['vocab_size']} "
        f"(tokenizer of {options['tokenizer_from']} + chat markers), context {options['context_length']}"
    ]
    for name in SPLITS:
        s = manifest["splits"][name]
        lines.append(
            f"  {name}: {s['examples']:,} examples, {s['sequences']:,} sequences, {s['tokens']:,} tokens "
            f"({s['loss_tokens']:,} with loss), longest {s['max_length']:,}, truncated {s['truncated']:,}"
        )
    for source in manifest["sources"]:
        for reason, count in source.get("skipped", {}).items():
            lines.append(f"  {source['source']}: skipped {count:,} {reason.replace('_', ' ')}")
    return "\n".join(lines)


# Reading a DATA_DIR of examples.


@dataclass
class Sequences:
    """The sequences of one split: sequence i is tokens[offsets[i]:offsets[i+1]], with its loss mask."""

    tokens: np.ndarray  # (num_tokens,) memmap, manifest dtype
    mask: np.ndarray  # (num_tokens,) uint8 memmap: 1 = the token carries loss
    offsets: np.ndarray  # (num_sequences + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) of sequence i."""
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.tokens[start:end], self.mask[start:end]

    def lengths(self) -> np.ndarray:
        """Tokens per sequence, (num_sequences,) int64."""
        return np.diff(self.offsets)


@dataclass
class ExampleData:
    """A DATA_DIR of SFT examples or preference pairs: manifest, tokenizer and per-split sequences."""

    path: Path
    manifest: dict
    _splits: dict[str, Sequences] = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    @property
    def eot_id(self) -> int:
        return self.manifest["template"]["eot_id"]

    @property
    def end_id(self) -> int:
        return self.manifest["template"]["end_id"]

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.path)

    def sequences(self, split: str) -> Sequences:
        """The sequences of `split` ("train" or "val"), read from disk on demand."""
        assert split in SPLITS, split
        if split not in self._splits:
            self._splits[split] = Sequences(
                tokens=np.memmap(self._file(split, "tokens"), dtype=self.manifest["dtype"], mode="r"),
                mask=np.memmap(self._file(split, "mask"), dtype=np.uint8, mode="r"),
                offsets=np.fromfile(self._file(split, "offsets"), dtype=np.int64),
            )
        return self._splits[split]

    def p_chosen(self, split: str) -> np.ndarray:
        """(num_pairs,) float32: the share of raters who preferred chosen, per pair of `split`."""
        assert self.kind == "pref", "only preference pairs have p_chosen"
        return np.fromfile(self._file(split, "p_chosen"), dtype=np.float32)

    def fingerprint(self) -> str:
        """A hash of the data (the sha256 of every file), for cache keys."""
        return hashlib.sha256(json.dumps(self.manifest["files"], sort_keys=True).encode()).hexdigest()

    def verify(self) -> None:
        verify_files(self.path, self.manifest)

    def _file(self, split: str, name: str) -> Path:
        path = self.path / f"{split}.{name}.bin"
        if not path.is_file():
            raise UserError(f"{path} is missing; re-create {self.path} with keel prepare --force")
        return path


# The fields ExampleData and the tasks read; check_manifest refuses a manifest without them.
EXAMPLES_SCHEMA = {
    "format": str,
    "version": int,
    "kind": KINDS,
    "template": {"eot_id": int, "end_id": int},
    "tokenizer": {"vocab_size": int},
    "dtype": ("uint16", "uint32"),
    "splits": {split: {"examples": int, "sequences": int, "tokens": int} for split in SPLITS},
    "files": dict,
}


def _example_reads(manifest: dict) -> list[str]:
    names = ["tokens", "mask", "offsets"] + (["p_chosen"] if manifest["kind"] == "pref" else [])
    return [TOKENIZER_FILE] + [f"{split}.{name}.bin" for split in SPLITS for name in names]


def open_examples(data_dir: Path, kind: str | None = None) -> ExampleData:
    """Open a DATA_DIR of SFT examples or preference pairs (of `kind`, if given): check its manifest and verify
    its files (see `keel.data.shards.verify_files`); sequences are read lazily."""
    assert kind in (None, *KINDS), kind
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if manifest is None:
        raise UserError(f"{data_dir} is not a keel data directory; create it with keel prepare")
    version = manifest.get("version", 0)
    if manifest.get("format") != FORMAT or not isinstance(version, int) or version > EXAMPLES_VERSION:
        raise UserError(
            f"{data_dir} was written by a newer or unknown keel data format; re-create it with keel prepare --force"
        )
    found = manifest.get("kind", "text")
    if found in ("text", "images"):
        holds = "pretraining text" if found == "text" else "images"
        raise UserError(
            f"{data_dir} holds {holds}, not SFT examples or preference pairs; prepare a JSONL of examples "
            "with keel prepare FILE.jsonl --tokenizer DIR --out DATA_DIR"
        )
    if kind is not None and found != kind and found in KINDS:
        raise UserError(
            f"{data_dir} holds {KIND_NAMES[found]}, not {KIND_NAMES[kind]}; point data.path at a directory of "
            f"{KIND_NAMES[kind]}"
        )
    check_manifest(data_dir, manifest, EXAMPLES_SCHEMA, _example_reads)
    verify_files(data_dir, manifest)
    return ExampleData(data_dir, manifest)
