"""Input checking and backend dispatch of givens_rotate (runs anywhere)."""
import os

import pytest
import torch

import qgoft_kernels as qk
from qgoft_kernels.function import _check_inputs
from qgoft_kernels.reference import rotate_reference
from qgoft_kernels.verify import assert_close


def call(x, params, **kw):
    return qk.givens_rotate(x, params, backend="torch", **kw)


def test_wrong_last_dim():
    with pytest.raises(ValueError,
                       match=r"params .* d=8 \(x's last dimension\) must have shape \(7,\), got shape \(8,\)"):
        call(torch.randn(2, 8), torch.zeros(8))


def test_wrong_quasi_shape():
    with pytest.raises(ValueError, match=r"shape \(7, 2, 2\), got shape \(7,\)"):
        call(torch.randn(2, 8), torch.zeros(7), block="quasi")


def test_integer_inputs():
    with pytest.raises(TypeError, match="x must have a floating-point dtype, got torch.int64"):
        call(torch.ones(2, 8, dtype=torch.long), torch.zeros(7))
    with pytest.raises(TypeError, match="params must have a floating-point dtype"):
        call(torch.randn(2, 8), torch.zeros(7, dtype=torch.int32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        call([[1.0, 2.0]], torch.zeros(1))


def test_scale_shape():
    with pytest.raises(ValueError, match=r"scale must have shape \(8,\)"):
        call(torch.randn(2, 8), torch.zeros(7), scale=torch.ones(7))


def test_zero_width():
    with pytest.raises(ValueError, match="last dimension .* must be >= 1"):
        call(torch.randn(2, 0), torch.zeros(0))
    with pytest.raises(ValueError, match="at least one dimension"):
        call(torch.tensor(1.0), torch.zeros(0))


def test_bad_options():
    x, p = torch.randn(2, 8), torch.zeros(7)
    with pytest.raises(ValueError, match="block must be one of"):
        call(x, p, block="householder")
    with pytest.raises(ValueError, match="structure must be one of"):
        call(x, p, structure="butterfly")
    with pytest.raises(ValueError, match="backend must be one of"):
        qk.givens_rotate(x, p, backend="cuda")
    with pytest.raises(TypeError, match="transpose must be a bool"):
        call(x, p, transpose=1)


def test_mismatched_devices():
    x, p = torch.randn(2, 8), torch.zeros(7, device="meta")
    with pytest.raises(ValueError, match="params and x must be on one device: params is on meta, x on cpu"):
        call(x, p)
    with pytest.raises(ValueError, match="scale and params must be on one device"):
        call(x, torch.zeros(7), scale=torch.ones(8, device="meta"))


def test_triton_backend_limits(monkeypatch):
    d = qk.MAX_TRITON_DIM + 1
    x, p = torch.randn(1, d), torch.zeros(d - 1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match=f"supports d <= {qk.MAX_TRITON_DIM}, got d={d}"):
        _check_inputs(x, p, "givens", "tree", None, False, "triton")
    # auto falls back to the PyTorch path rather than failing
    assert _check_inputs(x, p, "givens", "tree", None, False, "auto") == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA tensor or TRITON_INTERPRET=1"):
            _check_inputs(torch.randn(2, 8), torch.zeros(7), "givens", "tree", None, False, "triton")
        assert _check_inputs(torch.randn(2, 8), torch.zeros(7), "givens", "tree", None, False, "auto") == "torch"


def test_torch_backend_keeps_dtype_and_shape():
    x = torch.randn(2, 3, 10, dtype=torch.float16)
    y = call(x, torch.randn(9, 2, 2), block="quasi")
    assert y.dtype == torch.float16 and y.shape == x.shape


@pytest.mark.parametrize("transpose", [False, True], ids=["xR", "xRT"])
def test_torch_path_takes_cos_sin_in_float32(transpose, gen):
    """bf16 (or fp16) angles with fp32 x: cos and sin are taken in fp32, as the kernels do."""
    d = 64
    x = torch.randn(5, d, generator=gen)
    theta = ((torch.rand(d - 1, generator=gen) * 2 - 1) * torch.pi).to(torch.bfloat16)
    R = qk.givens_matrix(d, theta.double())
    ref = x.double() @ (R.T if transpose else R)
    assert_close(call(x, theta, transpose=transpose), ref)
    assert_close(rotate_reference(x, theta, transpose=transpose), ref)


INTERPRET_LATE = """
import os, sys
import torch
import triton  # imported first, as peft, transformers or an optimizer step do
os.environ["TRITON_INTERPRET"] = "1"
import qgoft_kernels as qk

x = torch.randn(3, 8, requires_grad=True)
try:
    qk.givens_rotate(x, torch.zeros(7), transpose=True)
except RuntimeError as e:
    print("ERROR:", e)
    sys.exit(0)
print("no error")
sys.exit(1)
"""


def test_interpreter_flag_set_after_triton_import_is_explained():
    """TRITON_INTERPRET=1 set after triton was imported: a clear error saying what to do."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", INTERPRET_LATE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "TRITON_INTERPRET=1" in proc.stdout and "before" in proc.stdout and "triton" in proc.stdout


def test_kernels_defined_for_the_interpreter_refuse_the_compiled_mode(monkeypatch):
    """The reverse mismatch: kernels defined under the interpreter, TRITON_INTERPRET unset later."""
    if torch.cuda.is_available():
        pytest.skip("the kernels are compiled on a CUDA machine")
    from qgoft_kernels import ops
    from qgoft_kernels.checks import check_triton_mode

    ops._kernels()  # defined under the interpreter: conftest set TRITON_INTERPRET=1 first
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="asks for compiled GPU kernels, but .* were defined for the interpreter"):
        check_triton_mode()
