"""``harness.provenance``: the commit recorded for a tree without ``.git`` (a Ray job's upload)."""

from harness import provenance


def test_commit_of_a_tree_without_git_comes_from_the_job_env(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "_ROOT", tmp_path)  # a folder outside any git checkout
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.delenv(provenance.COMMIT_ENV, raising=False)
    assert provenance.project_commit() == "unknown"
    monkeypatch.setenv(provenance.COMMIT_ENV, "0123abc")
    assert provenance.project_commit() == "0123abc"


def test_a_git_checkout_names_its_own_commit_whatever_the_env_says(monkeypatch):
    monkeypatch.setenv(provenance.COMMIT_ENV, "not-this")
    assert provenance.project_commit().split("+")[0] != "not-this"
