"""Where triton has no wheel (macOS, Windows) the package installs without it and runs the PyTorch path."""
import os
import pathlib
import subprocess
import sys

import pytest
import tomllib
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parent.parent

# a process in which `import triton` fails as it does where triton is not installed
BLOCK_TRITON = """
import importlib.abc, sys
class _NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NoTriton())
"""

USE = BLOCK_TRITON + """
import warnings
import torch
import qgoft_kernels as qk
from qgoft_kernels.reference import rotate_reference

layer = qk.GivensLinear.from_linear(torch.nn.Linear(16, 8), scale=True)
x = torch.randn(3, 16, requires_grad=True)
layer(x).sum().backward()
assert x.grad is not None and layer.rotation.grad is not None
params = torch.randn(15, 2, 2)
want = rotate_reference(x.detach().double(), params.double(), block="quasi").float()
torch.testing.assert_close(qk.givens_rotate(x.detach(), params, block="quasi"), want)
try:
    qk.givens_rotate(x.detach(), params, block="quasi", backend="triton")
except ImportError as e:
    print("triton:", e)
assert not [m for m in sys.modules if m == "triton" or m.startswith("triton.")]
print("ok")
"""


def _run(code: str, *args: str, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run([sys.executable, *(["-c", code] if code else []), *args], capture_output=True, text=True,
                          env=environ, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_package_works_without_triton(interpret):
    """Import, forward, backward and a float64 check; ``backend="triton"`` names what is missing.
    ``TRITON_INTERPRET=1`` asks triton for its interpreter: without triton, "auto" runs PyTorch."""
    proc = _run(USE, TRITON_INTERPRET=interpret)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok"), proc.stdout
    assert "triton: backend='triton': the Triton path needs triton" in proc.stdout
    assert "Linux" in proc.stdout


def test_verify_without_triton_checks_the_pytorch_path():
    # the first cases of the matrix (the whole one runs in `make bench`)
    code = BLOCK_TRITON + ("import sys; import qgoft_kernels.verify as v; from qgoft_kernels.__main__ import main\n"
                           "v.default_cases = lambda device, full=v.default_cases: full(device)[::12]\n"
                           "sys.exit(main(['verify', '--seed', '1']))")
    proc = _run(code)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "checking the PyTorch path" in proc.stdout
    assert "FAIL" not in proc.stdout and "PASS" in proc.stdout


def test_triton_is_required_on_linux_only():
    """``pip install .`` on macOS or Windows must not try to install triton (no wheel there)."""
    deps = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    triton = [r for r in deps if r.name == "triton"]
    assert len(triton) == 1 and triton[0].marker is not None, "triton must carry an environment marker"
    base = {"python_version": "3.11", "platform_machine": "x86_64"}
    for system, sys_platform, wanted in (("Linux", "linux", True), ("Darwin", "darwin", False),
                                         ("Windows", "win32", False)):
        env = base | {"platform_system": system, "sys_platform": sys_platform,
                      "os_name": "nt" if system == "Windows" else "posix"}
        assert triton[0].marker.evaluate(env) is wanted, system
