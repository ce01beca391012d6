"""The commit id with and without git, and the GPU commands' refusal to run on a CPU."""
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from benchmarks.provenance import REPO, commit_id

HAS_GIT = shutil.which("git") is not None


def test_commit_without_git_falls_back_to_the_variable_then_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("QGOFT_COMMIT", raising=False)
    assert commit_id(str(tmp_path)) == ("unknown", "none")
    (tmp_path / "COMMIT").write_text("abc1234\n")
    assert commit_id(str(tmp_path)) == ("abc1234", "COMMIT file")
    monkeypatch.setenv("QGOFT_COMMIT", "def5678")
    assert commit_id(str(tmp_path)) == ("def5678", "QGOFT_COMMIT")


def test_commit_without_a_git_binary(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on the path
    monkeypatch.setenv("QGOFT_COMMIT", "def5678")
    assert commit_id(REPO) == ("def5678", "QGOFT_COMMIT")


@pytest.mark.skipif(not HAS_GIT, reason="git is not installed")
def test_commit_of_a_copy_inside_another_repository_is_not_that_one(tmp_path, monkeypatch):
    monkeypatch.delenv("QGOFT_COMMIT", raising=False)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, env=env)
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "outer"], cwd=tmp_path, check=True, env=env)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "COMMIT").write_text("abc1234\n")
    assert commit_id(str(copy)) == ("abc1234", "COMMIT file")
    assert commit_id(str(tmp_path))[1] == "git"


@pytest.mark.skipif(not (HAS_GIT and os.path.exists(os.path.join(REPO, ".git"))), reason="not a git checkout")
def test_commit_of_this_checkout():
    commit, source = commit_id()
    if source == "git":  # a worktree copied without its main repository falls back
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        assert commit.removesuffix("+dirty") == head.stdout.strip()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("module", ["benchmarks.gpu_quick", "benchmarks.gpu_check", "benchmarks.models"])
def test_gpu_commands_stop_at_once_without_cuda(module, tmp_path):
    out = tmp_path / "out"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", module, "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA device" in proc.stderr
    assert not out.exists()  # wrote nothing
    assert time.monotonic() - start < 30  # seconds, not the 12 minutes of the CPU fallbacks
