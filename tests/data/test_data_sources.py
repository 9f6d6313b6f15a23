"""Which files a source stands for."""

import sysconfig
from pathlib import Path

from keel.data.sources import list_files, python_stdlib_files, read_source

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def test_python_stdlib_files_are_the_library_without_tests():
    files = python_stdlib_files()
    relative = [f.relative_to(STDLIB) for f in files]
    assert Path("os.py") in relative and Path("json/decoder.py") in relative and Path("email/mime/text.py") in relative
    excluded = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    assert not [r for r in relative if excluded & set(r.parts[:-1])]
    assert all(f.suffix == ".py" for f in files)
    assert len(files) == len(set(files))
    assert sum(f.stat().st_size for f in files) > 5_000_000  # the real library, not a stub


def test_folder_listing_is_recursive_sorted_and_skips_hidden_and_other_suffixes(tmp_path):
    for name in [
        "b.py",
        "a.md",
        "sub/c.rst",
        "sub/d.jsonl",
        "sub/e.parquet",
        "f.c",
        ".hidden.txt",
        ".git/config.txt",
        "notes.txt",
    ]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_files(tmp_path)] == [
        "a.md", "b.py", "notes.txt", "sub/c.rst", "sub/d.jsonl", "sub/e.parquet",
    ]  # fmt: skip


def test_a_named_file_is_read_as_text_whatever_its_suffix(tmp_path):
    readme = tmp_path / "README"
    readme.write_bytes(b"plain text without a suffix\r\n")
    assert list(read_source(str(readme))) == [(str(readme), readme)]
