"""The compiled CPU kernels (qgoft_kernels.native) against the dense formulation's ATen ops, and
how they are built and turned off. The layer's tests (test_torch_path.py) run both ways too."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qgoft_kernels import dense, native

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler here: the kernels are not built")


def _aten_forward(x, blocks, Q):
    return dense._rows_forward(x, blocks, Q)[0]


def _aten_transposed(x, blocks, Q):
    """``x @ blockdiag(blocks)^T @ U^T``."""
    return dense._rows_transposed(x, blocks, Q)[0]


def _aten_backward(x, g, blocks, Q):
    nb = blocks.shape[0]
    roots, delta = dense._roots(x, Q, nb) if Q is not None else (None, None)
    return dense._rows_forward_backward(dense._blocks(g, nb), x, roots, delta, blocks, Q, True, True, True)


def _inputs(rows, nb, b, dtype, gen, with_q=True):
    x = torch.randn(rows, nb * b, generator=gen, dtype=dtype)
    g = torch.randn(rows, nb * b, generator=gen, dtype=dtype)
    blocks = torch.randn(nb, b, b, generator=gen, dtype=dtype)
    Q = torch.randn(nb, nb, generator=gen, dtype=dtype) if with_q and nb > 1 else None
    return x, g, blocks, Q


def _close(a, b, dtype):
    tol = 1e-4 if dtype == torch.float32 else 1e-11
    scale = b.abs().max().item() if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, scale))


# rows: whole tiles of 8 per thread, tails, one row, none; b: the vector widths (16, 32, 64
# floats) and one done value by value (8); nb up to the roots' vector width and past it
SHAPES = [(64, 12, 32), (37, 3, 32), (1, 5, 32), (0, 4, 32), (50, 16, 16), (16, 2, 64), (21, 18, 8), (30, 1, 32),
          (41, 33, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("rows, nb, b", SHAPES)
def test_rotate_matches_aten(rows, nb, b, dtype, gen):
    x, _, blocks, Q = _inputs(rows, nb, b, dtype, gen)
    _close(native.rotate(x, blocks, Q, False, torch.empty_like(x)), _aten_forward(x, blocks, Q), dtype)
    transposed = native.rotate(x, blocks, Q, True, torch.empty_like(x))
    _close(transposed, _aten_transposed(x, blocks, Q), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("rows, nb, b", SHAPES)
def test_backward_matches_aten(rows, nb, b, dtype, gen):
    x, g, blocks, Q = _inputs(rows, nb, b, dtype, gen)
    expected = _aten_backward(x, g, blocks, Q)
    partials = torch.empty(native.scratch_size(nb, b, Q is not None), dtype=dtype)
    dx, dblocks = torch.empty_like(x), torch.empty_like(blocks)
    dQ = torch.empty_like(Q) if Q is not None else None
    native.backward(x, g, blocks, Q, dx, dblocks, dQ, partials)
    for got, want in zip((dx, dblocks, dQ), expected):
        if want is not None:
            _close(got, want, dtype)
    # without dx: the roots' gradient from the blocks' first rows alone
    dblocks2 = torch.empty_like(blocks)
    dQ2 = torch.empty_like(Q) if Q is not None else None
    native.backward(x, g, blocks, Q, None, dblocks2, dQ2, partials)
    assert torch.equal(dblocks2, dblocks)
    if Q is not None:
        _close(dQ2, expected[2], dtype)
    # dx alone
    dx2 = torch.empty_like(x)
    native.backward(x, g, blocks, Q, dx2, None, None, partials)
    assert torch.equal(dx2, dx)


def test_strided_rows_and_outputs(gen):
    """Rows with a stride past their width (a slice of wider rows), read and written in place."""
    x, g, blocks, Q = _inputs(40, 6, 32, torch.float32, gen)
    wide = torch.zeros(40, 250)
    wide[:, 30:222] = x
    out = torch.full((40, 300), 7.0)
    native.rotate(wide[:, 30:222], blocks, Q, False, out[:, 50:242])
    _close(out[:, 50:242], _aten_forward(x, blocks, Q), torch.float32)
    assert (out[:, :50] == 7).all() and (out[:, 242:] == 7).all()


def test_bit_identical_repeats(gen):
    x, g, blocks, Q = _inputs(300, 12, 32, torch.float32, gen)
    partials = torch.empty(native.scratch_size(12, 32, True))
    results = []
    for _ in range(2):
        dx, dblocks, dQ = torch.empty_like(x), torch.empty_like(blocks), torch.empty_like(Q)
        native.backward(x, g, blocks, Q, dx, dblocks, dQ, partials)
        results.append((dx, dblocks, dQ, native.rotate(x, blocks, Q, False, torch.empty_like(x))))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_applies_only_where_the_kernels_can_run():
    blocks = (4, 32)
    assert native.applies(torch.zeros(8, 128), blocks)
    assert not native.applies(torch.zeros(8, 128, dtype=torch.bfloat16), blocks)
    assert not native.applies(torch.zeros(128, 8).T, blocks)  # features not of unit stride
    assert not native.applies(torch.zeros(8, 128 * 32), (1, 128 * 32))  # a block past MAX_BLOCK
    assert not native.applies(torch.zeros(2, 2048), (2048, 1))  # more blocks than MAX_BLOCKS


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("QGOFT_NATIVE", "0")
    assert native.library() is None
    assert not native.applies(torch.zeros(8, 128), (4, 32))


@pytest.mark.parametrize("value, on", [("0", False), ("false", False), ("OFF", False), (" no ", False),
                                       ("1", True), ("True", True), ("on", True), ("YES", True), ("", True)])
def test_switch_takes_the_usual_spellings(value, on, monkeypatch):
    monkeypatch.setenv("QGOFT_NATIVE", value)
    assert native.enabled() is on
    assert (native.library() is not None) is on


def test_switch_refuses_an_unknown_value(monkeypatch):
    monkeypatch.setenv("QGOFT_NATIVE", "maybe")
    with pytest.raises(ValueError, match="QGOFT_NATIVE='maybe'.*false"):
        native.library()


@pytest.mark.parametrize("fused", [True, False], ids=["DenseLinear", "DenseRotation"])
def test_backward_takes_the_forwards_way_when_the_switch_changes(fused, monkeypatch, gen):
    """QGOFT_NATIVE=0 set between a forward on the compiled kernels and its backward: the
    backward still runs the kernels its forward chose (and the gradients are ATen's)."""
    import qgoft_kernels as qk

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("QGOFT_TORCH_PATH", "dense")
    layer = qk.GivensLinear(64, 16, block="quasi", scale=True)
    with torch.no_grad():
        layer.rotation.add_(0.3 * torch.randn(layer.rotation.shape, generator=gen))
    x = torch.randn(40, 64, generator=gen, requires_grad=True)

    def run(switch_off_before_backward):
        if fused:
            out = layer(x)
        else:
            out = qk.givens_rotate(x, layer.rotation, block="quasi", scale=layer.scale, backend="torch")
        if switch_off_before_backward:
            monkeypatch.setenv("QGOFT_NATIVE", "0")
        grads = torch.autograd.grad(out.square().sum(), [x, layer.rotation, layer.scale])
        monkeypatch.delenv("QGOFT_NATIVE", raising=False)
        return out, grads

    out, grads = run(True)
    monkeypatch.setenv("QGOFT_NATIVE", "0")
    ref_out, ref_grads = run(False)
    _close(out, ref_out, torch.float32)
    for got, want in zip(grads, ref_grads):
        _close(got, want, torch.float32)


def test_built_once_into_the_cache_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("QGOFT_CACHE_DIR", str(tmp_path))
    compiler = native._compiler()
    first = native._compile(compiler)
    assert first.parent == tmp_path and first.exists()
    stamp = first.stat().st_mtime_ns
    assert native._compile(compiler) == first and first.stat().st_mtime_ns == stamp
    # no temporary file left: the build and its stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, first.name + ".sha256"]


_LOAD_IN_A_PROCESS = """
import warnings
import torch
from qgoft_kernels import native
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    lib = native.library()
assert lib is not None, [str(w.message) for w in caught]
x, blocks = torch.randn(8, 64), torch.randn(2, 32, 32)
native.rotate(x, blocks, torch.randn(2, 2), False, torch.empty_like(x))
print("warnings:", len(caught))
"""


def _load_in_a_process(cache, script=_LOAD_IN_A_PROCESS):
    """Load the kernels in a fresh process with ``cache`` as the cache directory (a bad library
    can kill the process that loads it: SIGBUS); returns its output, failing on a crash."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "QGOFT_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop("QGOFT_NATIVE", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"exit status {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def _libm() -> Path:
    """The C math library's file: a valid shared library that is not ours."""
    import ctypes.util
    name = ctypes.util.find_library("m")
    folders = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu", "/lib64", "/usr/lib64",
               "/lib", "/usr/lib")
    found = [Path(d) / name for d in folders if name and (Path(d) / name).exists()]
    if not found:
        pytest.skip("no libm file found to stand in for a foreign library")
    return found[0]


@pytest.mark.parametrize("damage", ["truncated", "foreign", "garbage"])
def test_a_damaged_cache_entry_is_built_again(damage, tmp_path):
    """A cached library cut short (half its size), another valid library in its place (libm), or
    garbage: detected before it is loaded, built again, and loaded without a warning; the next
    process finds the new build and loads it as it is."""
    import shutil
    first = _load_in_a_process(tmp_path)
    assert "warnings: 0" in first
    built = [p for p in tmp_path.iterdir() if p.suffix == ".so"]
    assert len(built) == 1
    so = built[0]
    if damage == "truncated":
        data = so.read_bytes()
        so.write_bytes(data[:len(data) // 2])
    elif damage == "foreign":
        shutil.copyfile(_libm(), so)
    else:
        so.write_bytes(b"not a library at all\n" * 100)
    assert "warnings: 0" in _load_in_a_process(tmp_path)
    rebuilt = so.stat().st_mtime_ns
    assert "warnings: 0" in _load_in_a_process(tmp_path)
    assert so.stat().st_mtime_ns == rebuilt  # not built a third time


def test_without_a_compiler_the_aten_ops_run(tmp_path, monkeypatch, gen):
    """No compiler (or a failed build): a warning, then the layer on ATen's ops, same numbers."""
    import qgoft_kernels as qk

    layer = qk.GivensLinear(64, 16, block="quasi", scale=True)
    with torch.no_grad():
        layer.rotation.add_(0.3 * torch.randn(layer.rotation.shape, generator=gen))
    x = torch.randn(40, 64, generator=gen)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("QGOFT_TORCH_PATH", "dense")
    expected = layer(x)
    monkeypatch.setenv("QGOFT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native._load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="did not build"):
            assert native.library() is None
        assert not native.applies(x, (2, 32))
        torch.testing.assert_close(layer(x), expected)
    finally:
        monkeypatch.undo()
        native._load.cache_clear()
    assert native.library() is not None


def test_too_small_a_scratch_buffer_is_refused(gen):
    x, g, blocks, Q = _inputs(16, 4, 32, torch.float32, gen)
    short = torch.empty(native.scratch_size(4, 32, True) - 1)
    with pytest.raises(ValueError, match="scratch"):
        native.backward(x, g, blocks, Q, torch.empty_like(x), torch.empty_like(blocks), torch.empty_like(Q), short)


def _build_inputs(d, givens, scaled, dtype, gen):
    from qgoft_kernels.schedule import num_pairs
    count = num_pairs(d, "tree")
    params = (torch.randn(count, generator=gen, dtype=dtype) if givens
              else torch.randn(count, 2, 2, generator=gen, dtype=dtype))
    scale = torch.rand(d, generator=gen, dtype=dtype) + 0.5 if scaled else None
    return params, scale


def _aten(monkeypatch, fn, *args, **kwargs):
    """``fn`` with the compiled kernels turned off: dense.py's ATen ops."""
    with monkeypatch.context() as m:
        m.setenv("QGOFT_NATIVE", "0")
        return fn(*args, **kwargs)


# d: one block (the dense R, no Q), whole blocks, a last block padded, Q padded past nb;
# width: 32 and a narrow one with more Q stages than block stages
BUILDS = [(20, 32), (64, 32), (100, 32), (96, 8), (1000, 32), (7, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("givens", [True, False], ids=["givens", "quasi"])
@pytest.mark.parametrize("scaled", [False, True], ids=["", "scale"])
@pytest.mark.parametrize("d, width", BUILDS)
def test_build_matches_aten(d, width, scaled, givens, dtype, gen, monkeypatch):
    """The factors (and their transposes) and the parameters' gradients, one call each, against
    the ATen ops of dense._build and dense._build_backward."""
    params, scale = _build_inputs(d, givens, scaled, dtype, gen)
    _, b, nb = dense.layout(d, width)
    indices = dense._indices(d, "tree", b, scaled, givens, dtype, params.device)
    flat, flat_t, saved, compiled = dense._build(params, scale, givens, dtype, indices, transposed=True)
    ref, ref_t, ref_saved, aten = _aten(monkeypatch, dense._build, params, scale, givens, dtype, indices,
                                        transposed=True)
    used = indices[2]
    _close(flat[:used], ref[:used], dtype)
    _close(flat_t[:used], ref_t[:used], dtype)
    blocks, Q = dense._split(flat, nb, b)
    blocks_t, Q_t = dense._split(flat_t, nb, b)
    assert torch.equal(blocks_t, blocks.transpose(1, 2)) and (Q is None or torch.equal(Q_t, Q.T))
    dflat = torch.randn(flat.shape, generator=gen, dtype=dtype)
    dflat[used:] = 0
    assert compiled and not aten
    got = dense._build_backward(dflat, saved, params, scale, givens, indices, True, scaled, compiled)
    want = dense._build_backward(dflat, ref_saved, params, scale, givens, indices, True, scaled, aten)
    for a, e in zip(got, want):
        if e is None:
            assert a is None
        else:
            assert a.shape == e.shape and a.dtype == e.dtype
            _close(a, e, dtype)


def test_build_takes_its_own_dtype_only(gen):
    """Parameters in another dtype than the factors (or off the CPU) take the ATen ops."""
    params, scale = _build_inputs(64, True, True, torch.float32, gen)
    assert native.builds(params, scale, torch.float32, 7)
    assert not native.builds(params, scale, torch.float64, 7)
    assert not native.builds(params, scale.double(), torch.float32, 7)
    assert not native.builds(params.bfloat16(), None, torch.bfloat16, 7)
    assert not native.builds(params, None, torch.float32, native.MAX_FACTORS + 1)


def test_built_in_a_private_directory_when_the_cache_is_not_writable(tmp_path, monkeypatch):
    """A cache directory that cannot be made (under a file here, as under a read-only home):
    the kernels are built for this process in a temporary directory of its own instead."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("QGOFT_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    built = native._compile(native._compiler())
    assert built.exists() and built.parent.parent == tmp_path and built.parent.name.startswith("qgoft_kernels-")
    assert oct(built.parent.stat().st_mode & 0o777) == oct(0o700)


def test_the_abi_version_is_the_sources():
    assert f"int qgoft_abi_version(void) {{ return {native.ABI_VERSION}; }}" in native.SOURCE.read_text()


def test_a_stamped_library_of_another_abi_gives_one_warning(tmp_path):
    """A library whose stamp matches but that is not this source's (no qgoft_abi_version):
    one warning, and ATen's ops; no uncaught AttributeError."""
    import shutil
    _load_in_a_process(tmp_path)
    so = next(p for p in tmp_path.iterdir() if p.suffix == ".so")
    shutil.copyfile(_libm(), so)
    native._stamp(so).write_text(native._digest(so) + "\n")
    script = """
import warnings
from qgoft_kernels import native
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert native.library() is None and native.library() is None
print([str(w.message) for w in caught])
"""
    out = _load_in_a_process(tmp_path, script)
    assert out.count("qgoft_abi_version: missing, expected 3") == 1, out
