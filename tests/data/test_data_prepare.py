"""`keel.data.prepare` end to end on real text: standard-library modules copied into tmp_path."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keel.data import clean, open_data, prepare
from keel.data.shards import token_dtype
from keel.errors import UserError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Small, stable modules present in every Python keel supports: a corpus of ~300 KB of real code.
MODULES = [
    "abc.py", "bisect.py", "colorsys.py", "contextvars.py", "copy.py", "fnmatch.py", "glob.py",
    "graphlib.py", "heapq.py", "keyword.py", "numbers.py", "operator.py", "queue.py", "reprlib.py",
    "sched.py", "shlex.py", "stat.py", "string.py", "textwrap.py", "tty.py",
]  # fmt: skip
OPTIONS = dict(vocab_size=512, val_fraction=0.25, progress=False)


def copy_modules(folder: Path, names=MODULES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(STDLIB / name, folder / name)
    return folder


def normalised(path: Path) -> str:
    return path.read_text(encoding="utf-8").replace("\r\n", "\n").replace("\r", "\n")


def documents_of(data_dir: Path, split: str) -> list[str]:
    """Decode a .bin back into its documents (split on the end-of-text separator)."""
    data = open_data(data_dir)
    ids = data.tokens(split).tolist()
    assert ids[0] == data.eot_id  # every document starts with the separator
    starts = [i for i, token in enumerate(ids) if token == data.eot_id] + [len(ids)]
    return [data.tokenizer.decode(ids[a + 1 : b]) for a, b in zip(starts, starts[1:])]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, dict, Path]:
    corpus = copy_modules(tmp_path_factory.mktemp("corpus"))
    out = tmp_path_factory.mktemp("data") / "stdlib"
    return out, prepare([str(corpus)], out, **OPTIONS), corpus


def test_prepare_writes_data_dir_and_manifest(prepared):
    out, manifest, corpus = prepared
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "tokenizer.json", "train.bin", "val.bin"]
    assert manifest["sizes"] == {name: (out / name).stat().st_size for name in manifest["files"]}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["documents"]["read"] == manifest["documents"]["kept"] == len(MODULES)
    assert manifest["sources"] == [{"source": str(corpus), "documents": len(MODULES), "kept": len(MODULES)}]
    assert manifest["options"] == {"vocab_size": 512, "val_fraction": 0.25, "dedup": "exact", "min_chars": 32}
    assert manifest["tokenizer"] == {"file": "tokenizer.json", "vocab_size": 512, "eot": "<|endoftext|>", "eot_id": 0}
    assert manifest["dtype"] == "uint16"
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    splits = manifest["splits"]
    assert splits["train"]["documents"] > 0 and splits["val"]["documents"] > 0
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(MODULES)
    assert sum(s["bytes"] for s in splits.values()) == sum(len(normalised(corpus / m).encode()) for m in MODULES)
    for split, counts in splits.items():
        tokens = open_data(out).tokens(split)
        assert tokens.dtype == np.uint16 and tokens.ndim == 1 and len(tokens) == counts["tokens"]
    # No temporary build or work directory is left next to the output.
    assert sorted(p.name for p in out.parent.iterdir()) == ["stdlib"]


def test_shards_decode_to_the_original_files(prepared):
    out, manifest, corpus = prepared
    decoded = documents_of(out, "train") + documents_of(out, "val")
    assert sorted(decoded) == sorted(normalised(corpus / m) for m in MODULES)
    assert len(documents_of(out, "val")) == manifest["splits"]["val"]["documents"]


def test_same_input_gives_identical_files(prepared, tmp_path):
    out, manifest, corpus = prepared
    again = prepare([str(corpus)], tmp_path / "again", **OPTIONS)
    assert again["files"] == manifest["files"]


def test_a_build_left_by_a_killed_prepare_is_swept_and_a_live_one_kept(prepared, tmp_path):
    _, _, corpus = prepared
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a prepare SIGKILLed mid-build leaves its hidden build directory behind
    left = tmp_path / f".out.{dead.pid}.0badc0de.tmp"
    running = tmp_path / f".out.{os.getppid()}.5eed5eed.tmp"  # another prepare, still building
    for build in (left, running):
        build.mkdir()
        (build / "train.bin").write_bytes(b"half")
    prepare([str(corpus)], tmp_path / "out", **OPTIONS)
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, "out"]


def test_binary_and_non_utf8_files_are_skipped_and_counted(tmp_path):
    corpus = copy_modules(tmp_path / "corpus")
    # A UTF-16 text file has NUL bytes; a Latin-1 file with accents is not UTF-8.
    (corpus / "notes_utf16.txt").write_bytes("Notes saved by a Windows editor, in UTF-16.\n".encode("utf-16"))
    (corpus / "latin1.txt").write_bytes("Café, crème brûlée et pâtisserie: encodé en Latin-1.\n".encode("latin-1"))
    (corpus / "short.md").write_text("# Title\n")
    manifest = prepare([str(corpus)], tmp_path / "out", **OPTIONS)
    skipped = manifest["documents"]["skipped"]
    assert skipped["binary"] == {"count": 1, "examples": [str(corpus / "notes_utf16.txt")]}
    assert skipped["not_utf8"] == {"count": 1, "examples": [str(corpus / "latin1.txt")]}
    assert skipped["too_short"] == {"count": 1, "examples": [str(corpus / "short.md")]}
    assert manifest["documents"]["read"] == len(MODULES) + 3
    assert manifest["documents"]["kept"] == len(MODULES)


def near_copy(text: str) -> str:
    """The same module with one line changed, as a fork or a vendored copy would have."""
    lines = text.splitlines(keepends=True)
    middle = len(lines) // 2
    lines[middle] = "# patched locally: " + lines[middle]
    return "".join(lines)


@pytest.mark.parametrize(("dedup", "num_dropped"), [("none", 0), ("exact", 1), ("minhash", 2)])
def test_dedup_modes(tmp_path, dedup, num_dropped):
    corpus = copy_modules(tmp_path / "corpus")
    shutil.copy(corpus / "textwrap.py", corpus / "textwrap_copy.py")  # an exact copy
    (corpus / "textwrap_fork.py").write_text(near_copy((corpus / "textwrap.py").read_text()))
    manifest = prepare([str(corpus)], tmp_path / "out", dedup=dedup, **OPTIONS)
    documents = manifest["documents"]
    assert documents["kept"] == len(MODULES) + 2 - num_dropped
    assert documents["skipped"]["duplicate"]["examples"] == (
        [] if dedup == "none" else [str(corpus / "textwrap_copy.py")]
    )
    assert documents["skipped"]["near_duplicate"]["examples"] == (
        [str(corpus / "textwrap_fork.py")] if dedup == "minhash" else []
    )


def test_jsonl_and_parquet_sources(tmp_path):
    texts = [(STDLIB / name).read_text() for name in MODULES]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts[:10])) + "\n")
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": texts[10:], "path": MODULES[10:]}), parquet, row_group_size=4)
    manifest = prepare([str(jsonl), str(parquet)], tmp_path / "out", **OPTIONS)
    assert [s["kept"] for s in manifest["sources"]] == [10, len(MODULES) - 10]
    assert sorted(documents_of(tmp_path / "out", "train") + documents_of(tmp_path / "out", "val")) == sorted(texts)


def test_include_reads_only_the_code_of_a_folder_that_also_holds_data_files(tmp_path):
    """site-packages as a corpus: its .py files, not the .parquet test fixtures packages ship."""
    package = tmp_path / "site-packages" / "pkg"
    (package / "tests" / "data").mkdir(parents=True)
    for name in MODULES:
        shutil.copyfile(STDLIB / name, package / Path(name).name)
    (package / "module.pyi").write_text("def f(x: int) -> int: ...\n" * 10)
    pq.write_table(pa.table({"carat": [0.2, 0.3]}), package / "tests" / "data" / "fixture.parquet")
    with pytest.raises(UserError, match="fixture.parquet has no 'text' column"):
        prepare([str(tmp_path / "site-packages")], tmp_path / "everything", **OPTIONS)
    manifest = prepare([str(tmp_path / "site-packages")], tmp_path / "code", include=["*.py"], **OPTIONS)
    assert manifest["documents"]["read"] == len(MODULES)  # not the .pyi, not the parquet
    assert manifest["options"]["include"] == ["*.py"]
    with pytest.raises(UserError, match=r"no files named \*\.rs; check --include"):
        prepare([str(tmp_path / "site-packages")], tmp_path / "none", include=["*.rs"], **OPTIONS)
    assert not (tmp_path / "none").exists() and not (tmp_path / "everything").exists()


def test_hf_source_from_local_dataset_folder(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    # Hubs are unreachable here: load_dataset must only read the local folder.
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
        monkeypatch.setattr(datasets.config, name, True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    texts = [(STDLIB / name).read_text() for name in MODULES]
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    manifest = prepare([f"hf:{folder}"], tmp_path / "out", **OPTIONS)
    assert manifest["documents"]["kept"] == len(MODULES)
    assert manifest["sources"][0]["source"] == f"hf:{folder}"
    with pytest.raises(UserError, match="could not load hf:.*::validation"):
        prepare([f"hf:{folder}::validation"], tmp_path / "out2", **OPTIONS)


def test_existing_out_dir_is_refused_and_left_unchanged(prepared, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(prepared[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match=f"{out} already exists; pass --force to replace it"):
        prepare([str(prepared[2])], out, **OPTIONS)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_force_replaces_existing_data_dir(prepared, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(prepared[0], out)
    corpus = copy_modules(tmp_path / "other", MODULES[:8])
    manifest = prepare([str(corpus)], out, force=True, **OPTIONS)
    assert manifest["documents"]["kept"] == 8
    assert json.loads((out / "manifest.json").read_text()) == manifest
    open_data(out).verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "other"]  # old copy and build dir are gone


def test_failed_force_keeps_the_old_data_dir_and_leaves_nothing(prepared, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(prepared[0], out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a fine first document, long enough to keep"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=f"{bad}:2 is not valid JSON"):
        prepare([str(prepared[2]), str(bad)], out, force=True, **OPTIONS)
    open_data(out).verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "data"]


def test_force_refuses_to_replace_a_folder_keel_did_not_write(tmp_path):
    corpus = copy_modules(tmp_path / "corpus")
    with pytest.raises(UserError, match="not a keel data directory"):
        prepare([str(corpus)], corpus, force=True, **OPTIONS)
    assert sorted(p.name for p in corpus.iterdir()) == sorted(MODULES)


@pytest.mark.parametrize(
    "manifest",
    ['{"name": "my web app", "icons": []}', '{"format": "keel-data", "files": {"../../etc": "x"}}', "not json"],
)
def test_force_refuses_a_folder_whose_manifest_is_not_keels(prepared, tmp_path, manifest):
    project = copy_modules(tmp_path / "project", MODULES[:3])
    (project / "manifest.json").write_text(manifest)
    before = {p.name: p.read_bytes() for p in project.iterdir()}
    with pytest.raises(UserError, match=f"{project} exists and is not a keel data directory .* choose another --out"):
        prepare([str(prepared[2])], project, force=True, **OPTIONS)
    assert {p.name: p.read_bytes() for p in project.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # no build dir left either


def test_force_replaces_only_the_files_keel_wrote(prepared, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(prepared[0], out)
    open_data(out)  # writes the verification stamp, which is keel's too
    (out / "NOTES.md").write_text("where this data came from\n")
    (out / "extra").mkdir()
    (out / "extra" / "train.bin").write_bytes(b"a user's file, whatever its name")
    old_manifest = json.loads((out / "manifest.json").read_text())
    old_manifest["files"]["stale.bin"] = "0" * 64  # a file an older keel wrote and the new build no longer does
    (out / "manifest.json").write_text(json.dumps(old_manifest))
    (out / "stale.bin").write_bytes(b"old")
    manifest = prepare([str(copy_modules(tmp_path / "other", MODULES[:8]))], out, force=True, **OPTIONS)
    assert sorted(p.name for p in out.iterdir()) == [
        "NOTES.md", "extra", "manifest.json", "tokenizer.json", "train.bin", "val.bin",
    ]  # fmt: skip
    assert (out / "NOTES.md").read_text() == "where this data came from\n"
    assert (out / "extra" / "train.bin").read_bytes() == b"a user's file, whatever its name"
    assert open_data(out).manifest == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "other"]


def test_force_never_overwrites_a_file_keel_did_not_write(prepared, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(prepared[0], out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["files"]["val.bin"], manifest["sizes"]["val.bin"]  # so val.bin is not keel's any more
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "val.bin").write_bytes(b"the user's own file")
    with pytest.raises(UserError, match=f"{out / 'val.bin'} was not written by keel prepare and would be overwritten"):
        prepare([str(prepared[2])], out, force=True, **OPTIONS)
    assert (out / "val.bin").read_bytes() == b"the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_force_fills_an_empty_folder(prepared, tmp_path):
    (tmp_path / "data").mkdir()
    prepare([str(prepared[2])], tmp_path / "data", force=True, **OPTIONS)
    open_data(tmp_path / "data")


# Every bad input ends in a UserError naming the input.


def test_missing_source(tmp_path):
    with pytest.raises(UserError, match=f"source {tmp_path / 'nope'} does not exist"):
        prepare([str(tmp_path / "nope")], tmp_path / "out", **OPTIONS)
    assert not (tmp_path / "out").exists()


def test_unknown_scheme(tmp_path):
    with pytest.raises(UserError, match="unknown source scheme in 's3://bucket/corpus'"):
        prepare(["s3://bucket/corpus"], tmp_path / "out", **OPTIONS)
    with pytest.raises(UserError, match="unknown builtin corpus 'builtin:wikipedia'"):
        prepare(["builtin:wikipedia"], tmp_path / "out", **OPTIONS)


def test_empty_corpus_after_cleaning(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a.txt", "b.txt"):
        (corpus / name).write_text("too short\n")
    with pytest.raises(UserError, match=r"nothing is left of .*corpus after cleaning \(2 too_short\)"):
        prepare([str(corpus)], tmp_path / "out", **OPTIONS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_folder_with_only_binary_files(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in MODULES[:3]:  # real text, but saved as UTF-16
        (corpus / name.replace(".py", ".txt")).write_bytes((STDLIB / name).read_text().encode("utf-16"))
    message = f"{corpus} has no text: all 3 of its files are binary, not UTF-8 or unreadable"
    with pytest.raises(UserError, match=message):
        prepare([str(corpus)], tmp_path / "out", **OPTIONS)


def test_folder_without_supported_files(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(STDLIB / "os.py", corpus / "os.c")
    with pytest.raises(UserError, match=f"{corpus} contains no .txt, .md"):
        prepare([str(corpus)], tmp_path / "out", **OPTIONS)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "docs.jsonl"
    bad.write_text('{"text": "first document is fine and long enough"}\n\n{"text": "unterminated}\n')
    with pytest.raises(UserError, match=f"{bad}:3 is not valid JSON"):
        prepare([str(bad)], tmp_path / "out", **OPTIONS)
    bad.write_text('{"text": "first document is fine and long enough"}\n{"body": "no text field"}\n')
    with pytest.raises(UserError, match=f'{bad}:2 has no "text" string field'):
        prepare([str(bad)], tmp_path / "out", **OPTIONS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


def test_parquet_without_text_column_names_its_columns(tmp_path):
    bad = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": ["some text"], "path": ["a.py"]}), bad)
    with pytest.raises(UserError, match=f"{bad} has no 'text' column \\(it has content, path\\)"):
        prepare([str(bad)], tmp_path / "out", **OPTIONS)


def test_vocab_size_too_small(tmp_path):
    corpus = copy_modules(tmp_path / "corpus", MODULES[:2])
    with pytest.raises(UserError, match="vocab size 256 is too small; use at least 257"):
        prepare([str(corpus)], tmp_path / "out", vocab_size=256, progress=False)


def test_corpus_too_small_to_split(tmp_path):
    corpus = copy_modules(tmp_path / "corpus", MODULES[:1])
    with pytest.raises(UserError, match="too small to split: its 1 documents"):
        prepare([str(corpus)], tmp_path / "out", **OPTIONS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_ids_above_uint16_use_uint32():
    # A corpus this small cannot supply 65k merges, so check the rule prepare applies directly.
    assert token_dtype(2**16) == np.uint16 and token_dtype(2**16 + 1) == np.uint32


def test_unreadable_files_and_broken_symlinks_are_skipped_and_counted(tmp_path):
    corpus = copy_modules(tmp_path / "corpus")
    (corpus / "gone.py").symlink_to(corpus / "deleted.py")  # dangling
    (corpus / "loop.py").symlink_to(corpus / "loop.py")  # points at itself
    (corpus / "loop.jsonl").symlink_to(corpus / "loop.jsonl")
    (corpus / "zeros.txt").symlink_to("/dev/zero")  # would never end
    os.mkfifo(corpus / "pipe.txt")  # would block the open
    unreadable = [corpus / name for name in ("gone.py", "loop.jsonl", "loop.py", "pipe.txt", "zeros.txt")]
    if os.geteuid() != 0:  # root reads a chmod 000 file all the same
        shutil.copy(STDLIB / "this.py", corpus / "secret.py")
        (corpus / "secret.py").chmod(0)
        unreadable.append(corpus / "secret.py")
        shutil.copy(STDLIB / "this.py", tmp_path / "secret.jsonl")
        (tmp_path / "secret.jsonl").chmod(0)
        with pytest.raises(UserError, match="secret.jsonl has no text: all 1 of its files are .* unreadable"):
            prepare([str(tmp_path / "secret.jsonl")], tmp_path / "out", **OPTIONS)
    manifest = prepare([str(corpus)], tmp_path / "out", **OPTIONS)
    skipped = manifest["documents"]["skipped"]["unreadable"]
    assert skipped == {"count": len(unreadable), "examples": [str(path) for path in sorted(unreadable)]}
    assert manifest["documents"]["kept"] == len(MODULES)


def test_long_documents_are_cut_into_pieces_that_encode_as_the_whole(tmp_path, monkeypatch):
    corpus = copy_modules(tmp_path / "corpus", MODULES[:8])
    (corpus / "notes.txt").write_bytes("Grüße aus 東京 🐍, line\r\n".encode() * 300)
    whole = prepare([str(corpus)], tmp_path / "whole", **OPTIONS)
    monkeypatch.setattr(clean, "PIECE_CHARS", 500)
    monkeypatch.setattr(clean, "READ_BYTES", 333)  # chunks that end inside CRLFs and UTF-8 sequences
    pieces = prepare([str(corpus)], tmp_path / "pieces", **OPTIONS)
    # Cut before whitespace, where the pre-tokenizer splits anyway: the same merges, the same ids.
    assert pieces["files"] == whole["files"] and pieces["splits"] == whole["splits"]


def test_a_line_without_spaces_longer_than_a_piece_round_trips(tmp_path, monkeypatch):
    corpus = copy_modules(tmp_path / "corpus", MODULES[:8])
    (corpus / "one_line.txt").write_text("x" * 3_000 + "é" * 2_000 + " tail")
    monkeypatch.setattr(clean, "PIECE_CHARS", 500)
    prepare([str(corpus)], tmp_path / "out", **OPTIONS)
    decoded = documents_of(tmp_path / "out", "train") + documents_of(tmp_path / "out", "val")
    assert sorted(decoded) == sorted(normalised(path) for path in corpus.iterdir())


def test_a_stop_signal_waits_for_the_files_to_be_swapped():
    import keel.data

    # Python's own handler, also when the suite runs in the background (`make test &` ignores SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    steps = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with keel.data._signals_held():
                signal.raise_signal(signal.SIGINT)
                steps.append("the swap went on")
        assert steps == ["the swap went on"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
