"""The README's quickstart runs as written, and so does every Python block of the docs."""
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

import torch

from qgoft_kernels.verify import assert_close

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_quickstart_runs(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU PyTorch path: quick
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    merged, layer, x = scope["merged"], scope["layer"], scope["x"]
    assert isinstance(merged, torch.nn.Linear)
    assert_close(merged(x), layer(x), atol=1e-5)


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_python_block_of_the_docs_runs():
    """Every ```python block of README.md and docs/*.md runs unchanged, each in a fresh namespace,
    under pytest-markdown-docs (in a fresh process, on the CPU PyTorch path); none is skipped."""
    fences = {p.name: len(re.findall(r"^[ \t]*```python\b", p.read_text(), re.M)) for p in DOCS}
    marked = [p.name for p in DOCS if re.search(r"^[ \t]*```python[ \t]+\S", p.read_text(), re.M)]
    assert sum(fences.values()) >= 6 and not marked, f"a block marked notest (or with options) in {marked}"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        report = pathlib.Path(tmp) / "report.xml"
        proc = subprocess.run([sys.executable, "-m", "pytest", "--markdown-docs", "-m", "markdown-docs", "-q",
                               "-p", "no:cacheprovider", f"--junitxml={report}", *map(str, DOCS)],
                              cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        ran = [case.get("name") for case in suite.iter("testcase")]
    assert int(suite.get("skipped")) == 0 and len(ran) == sum(fences.values()), (fences, ran)
