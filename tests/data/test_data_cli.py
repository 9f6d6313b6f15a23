"""`keel prepare` as a user runs it, in a subprocess: unreachable hubs, stop signals, folders it must not touch."""

from conftest import assert_user_error, keel


def test_an_unreachable_hub_fails_at_once_with_one_sentence(tmp_path):
    # A closed local port refuses at once, as an unreachable hub would after HUB_TIMEOUT_SECONDS;
    # the subprocess timeout keeps a regression from hanging the suite for minutes.
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}
    result = keel("prepare", "hf:someone/some-corpus", "--out", str(tmp_path / "out"), env=env, timeout=60)
    assert_user_error(result, "cannot reach the Hugging Face hub at http://127.0.0.1:9", "hf:someone/some-corpus")
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_force_refuses_a_folder_that_is_not_keel_data(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "manifest.json").write_text('{"name": "my web app"}')
    (tmp_path / "site" / "index.html").write_text("<p>hello</p>")
    result = keel("prepare", "builtin:python-stdlib", "--out", str(tmp_path / "site"), "--force")
    assert_user_error(result, f"{tmp_path / 'site'} exists and is not a keel data directory", "choose another --out")
    assert sorted(p.name for p in (tmp_path / "site").iterdir()) == ["index.html", "manifest.json"]
