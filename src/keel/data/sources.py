"""Where documents come from: files, folders, the Python standard library, Hugging Face datasets.

`read_source(SOURCE)` checks SOURCE at once (so a typo in the last source fails before the
first one is read) and returns a lazy iterator of `(origin, content)` pairs: `origin` names the
document for the summary (a path, `path:line` or `path#row`), `content` is the path of a text
file (reading it in chunks, decoding, and telling binary or unreadable files belong to `clean`)
or a `str` from a structured record.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import socket
import sysconfig
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from keel.errors import UserError

Document = tuple[str, str | Path]

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
# Test suites are mostly fixtures and deliberately odd code; packages installed next to the
# stdlib are not part of it; hidden folders (.git, .venv) and caches never hold corpus text.
STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
PARQUET_BATCH_ROWS = 1024
HUB_TIMEOUT_SECONDS = 5  # a reachable hub answers a TCP connect in well under a second


def read_source(source: str, include: list[str] | None = None) -> Iterator[Document]:
    """Check SOURCE now and return an iterator over its documents.

    include: glob patterns of file names (`*.py`); a folder then yields the files that match one
    of them, whatever their suffix, instead of every file with a supported suffix.
    """
    if source.startswith("hf:"):
        return _hf_documents(source)
    if source.startswith("builtin:"):
        if source != "builtin:python-stdlib":
            raise UserError(
                f"unknown builtin corpus {source!r}; use builtin:python-stdlib (text), "
                "builtin:stdlib-sft (SFT examples), builtin:stdlib-pref (preference pairs), "
                "builtin:copy or builtin:reverse (toy SFT tasks of random symbols)"
            )
        return _files_documents(python_stdlib_files())
    path = Path(source)
    # A scheme is "word:" of two letters or more, so Windows drive letters (C:) stay paths.
    if not path.exists() and re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", source):
        raise UserError(
            f"unknown source scheme in {source!r}; "
            "use a file or folder path, builtin:python-stdlib or hf:NAME[:CONFIG][:SPLIT]"
        )
    if not path.exists():
        raise UserError(f"source {source} does not exist; check the path")
    if path.is_file():
        return _files_documents([path])
    files = list_files(path, include)
    if not files and include:
        raise UserError(f"{source} contains no files named {' or '.join(include)}; check --include")
    if not files:
        raise UserError(f"{source} contains no {', '.join(SUFFIXES)} files; point it at a folder of text")
    return _files_documents(files)


def list_files(folder: Path, include: list[str] | None = None) -> list[Path]:
    """Files under `folder` with a supported suffix (or a name matching `include`), recursively, in
    sorted (reproducible) order."""

    def wanted(name: str) -> bool:
        if include:
            return any(fnmatch.fnmatchcase(name, pattern) for pattern in include)
        return name.endswith(SUFFIXES)

    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root, n) for n in sorted(names) if wanted(n) and not n.startswith(".")]
    return files


def python_stdlib_files() -> list[Path]:
    """The running interpreter's standard library .py files, without test suites and site-packages."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_EXCLUDED_DIRS and not d.startswith("."))
        files += [Path(root, n) for n in sorted(names) if n.endswith(".py")]
    return files


def _files_documents(files: list[Path]) -> Iterator[Document]:
    for path in files:
        if path.suffix == ".jsonl" and _can_open(path):
            yield from _jsonl_documents(path)
        elif path.suffix == ".parquet" and _can_open(path):
            yield from _parquet_documents(path)
        else:
            # A file named explicitly is read as text whatever its suffix (README, notes.text); one that
            # cannot be opened (a dangling or looping symlink, no permission) is counted as unreadable there.
            yield str(path), path


def _can_open(path: Path) -> bool:
    if not path.is_file():  # opening a FIFO would block
        return False
    try:
        open(path, "rb").close()
    except OSError:
        return False
    return True


def _jsonl_documents(path: Path) -> Iterator[Document]:
    # Read bytes so that a line which is not UTF-8 is reported with its line number too.
    with open(path, "rb") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
                reason = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
                raise UserError(f"{path}:{line_number} is not valid JSON ({reason}); fix or remove that line") from err
            text = record.get("text") if isinstance(record, dict) else None
            is_example = isinstance(record, dict) and bool({"prompt", "messages", "chosen"} & set(record))
            if not isinstance(text, str) and is_example:
                raise UserError(
                    f"{path}:{line_number} is an SFT example or preference pair among text documents; keep one kind "
                    "per file and name files of examples themselves as sources (files in a folder are read as text)"
                )
            if not isinstance(text, str):
                raise UserError(f'{path}:{line_number} has no "text" string field; each line must be {{"text": "..."}}')
            yield f"{path}:{line_number}", text


def _parquet_documents(path: Path) -> Iterator[Document]:
    import pyarrow.parquet  # imported here: only parquet sources need it

    try:
        table = pyarrow.parquet.ParquetFile(path)
    except pyarrow.ArrowException as err:
        raise UserError(f"{path} is not a readable parquet file ({err}); check the file") from err
    schema = table.schema_arrow
    if "text" not in schema.names:
        raise UserError(
            f"{path} has no 'text' column (it has {', '.join(schema.names)}); rename the text column to 'text'"
        )
    if not pyarrow.types.is_string(schema.field("text").type) and not pyarrow.types.is_large_string(
        schema.field("text").type
    ):
        raise UserError(f"{path} has a 'text' column of type {schema.field('text').type}; it must hold strings")
    row = 0
    for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=["text"]):
        for text in batch.column(0).to_pylist():
            yield f"{path}#{row}", text or ""
            row += 1


def _hf_documents(source: str) -> Iterator[Document]:
    parts = source[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3:
        raise UserError(f"cannot read {source!r}; write hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT")
    name, config, split = (parts + ["", ""])[:3]
    if not Path(name).exists():  # a dataset folder on disk needs no hub
        _check_hub_reachable(source)  # before importing datasets, which alone takes seconds
    import datasets  # imported here: it is slow to import and only hf: sources need it

    try:
        dataset = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except Exception as err:  # the hub, the builders and the network raise many kinds
        raise UserError(f"could not load {source}: {err}; check the dataset name, config and split") from err
    if dataset.column_names is not None and "text" not in dataset.column_names:
        raise UserError(
            f"{source} has no 'text' column (it has {', '.join(dataset.column_names)}); "
            "pick a dataset with a text column"
        )
    return ((f"{source}#{row}", record["text"] or "") for row, record in enumerate(dataset))


def _check_hub_reachable(source: str) -> None:
    """A UserError within HUB_TIMEOUT_SECONDS if the hub's host cannot be reached.

    Without it, the hub client retries and waits out its own timeouts for minutes on a machine
    without network before it says anything. The connection is made in a thread because name
    resolution (getaddrinfo) takes no timeout of its own.
    """
    from huggingface_hub import constants  # its ENDPOINT honours HF_ENDPOINT

    offline = os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if constants.HF_HUB_OFFLINE or offline:
        return  # the user asked for the cache only: datasets says itself if the dataset is not there
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    errors: list[OSError] = []

    def connect() -> None:
        try:
            socket.create_connection((endpoint.hostname, port), timeout=HUB_TIMEOUT_SECONDS).close()
        except OSError as err:
            errors.append(err)

    thread = threading.Thread(target=connect, daemon=True)  # daemon: a hung lookup must not hold up the exit
    thread.start()
    thread.join(HUB_TIMEOUT_SECONDS)
    if thread.is_alive() or errors:
        reason = f"{errors[0].strerror or errors[0]}" if errors else f"no answer within {HUB_TIMEOUT_SECONDS} s"
        raise UserError(
            f"cannot reach the Hugging Face hub at {constants.ENDPOINT} to load {source} ({reason}); check the "
            "network, or set HF_HUB_OFFLINE=1 to read datasets already in the Hugging Face cache"
        )
