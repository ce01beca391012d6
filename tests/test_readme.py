"""The README's quickstart runs as written."""
import pathlib
import re

import torch

from qgoft_kernels.verify import assert_close


def test_quickstart_runs(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU PyTorch path: quick
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    merged, layer, x = scope["merged"], scope["layer"], scope["x"]
    assert isinstance(merged, torch.nn.Linear)
    assert_close(merged(x), layer(x), atol=1e-5)
