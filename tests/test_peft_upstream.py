"""PEFT's own tests, run with qGOFT configurations: its mixed-adapter-batch and multiple-active-
adapter tests here, in this process, and its generic tuner tests in a process of their own
(``test_peft_generic_tuner_tests_with_qgoft_cases``, marked ``full``: ``make test-full``).

PEFT's ``tests/test_custom_models.py`` (its source distribution of the installed release, not
its wheel) has ``TestMixedAdapterBatches``: each test takes the configurations of two adapters
and checks a mixed batch against the adapters run one at a time, the refusals (wrong length,
training mode, merged adapters, unknown names), disabled adapters, adapters on other layers
and ``modules_to_save``. Its cases are LoRA's, RoAd's and GLoRA's; here its test methods
run with qGOFT's, unchanged. Nothing of PEFT's code is copied into this repository: the source
distribution is fetched from the package index into a cache on first use (``pip download``),
and the test module imported from there. Modules its helpers import at the top but these tests
never use (``diffusers``, ``datasets``) are stood in for when they are not installed.
"""
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft", minversion="0.21")
from peft_generic_cases import DESELECT, install_stand_ins  # noqa: E402

from qgoft_kernels.peft import QGOFTConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_path")


def _cache() -> Path:
    base = os.environ.get("QGOFT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "qgoft_kernels")
    return Path(base) / f"peft-{peft.__version__}-tests"


def _peft_tests() -> Path:
    """PEFT's ``tests`` folder of the installed release, fetched once."""
    target = _cache()
    if (target / "tests" / "test_custom_models.py").exists():
        return target / "tests"
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", f"peft=={peft.__version__}", "--no-binary",
                               ":all:", "--no-deps", "--no-build-isolation", "-q", "-d", tmp],
                              capture_output=True, text=True, timeout=600)
        archives = list(Path(tmp).glob("peft-*.tar.gz"))
        if proc.returncode != 0 or not archives:
            pytest.skip(f"PEFT {peft.__version__}'s source distribution could not be downloaded (no package index "
                        f"here?): {proc.stderr.strip()[-300:]}")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent))
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.split("/")[1:2] == ["tests"] and m.isfile()]
            tar.extractall(staging, members=members, filter="data")
        try:
            (staging / archives[0].name.removesuffix(".tar.gz")).rename(target)
        except OSError:  # another test process (pytest-xdist) put it there first
            if not (target / "tests" / "test_custom_models.py").exists():
                raise
            shutil.rmtree(staging)
        else:
            staging.rmdir()
    return target / "tests"


@pytest.fixture(scope="module")
def upstream():
    """PEFT's ``test_custom_models`` module, imported as the package ``peft_upstream_tests``; the
    stand-ins and PEFT's test modules leave ``sys.modules`` after this file (a stand-in ``datasets``
    left there breaks transformers' Trainer in any test that runs later)."""
    folder = _peft_tests()
    package = types.ModuleType("peft_upstream_tests")
    package.__path__ = [str(folder)]
    sys.modules["peft_upstream_tests"] = package
    stood_in = install_stand_ins()
    try:
        yield importlib.import_module("peft_upstream_tests.test_custom_models")
    finally:
        for key in [k for k in sys.modules if k == "peft_upstream_tests" or k.startswith("peft_upstream_tests.")]:
            del sys.modules[key]
        for name in stood_in:
            sys.modules.pop(name, None)


def quasi(**options):
    return QGOFTConfig(init_weights=False, **options)


def goft_scaled(**options):
    return QGOFTConfig(block="givens", scale=True, init_weights=False, **options)


#: pairs of adapters on the MLP's first layer, as PEFT's MIXED_ADAPTER_TEST_CASES has for LoRA
CASES = [
    ("qGOFT quasi, two adapters", quasi(target_modules=["lin0"]), quasi(target_modules=["lin0"])),
    ("qGOFT quasi with GOFT+scale", quasi(target_modules=["lin0"]), goft_scaled(target_modules=["lin0"])),
    ("qGOFT on both layers", quasi(target_modules=["lin0", "lin1"]), goft_scaled(target_modules=["lin0", "lin1"])),
]
IDS = [c[0] for c in CASES]
SAME_CASE_TESTS = ["test_mixed_adapter_batches_mlp", "test_mixed_adapter_batches_length_mismatch_raises",
                   "test_mixed_adapter_batches_training_mode_raises", "test_mixed_adapter_batches_disabled",
                   "test_mixed_adapter_batches_merged_raises"]


@pytest.mark.parametrize("test", SAME_CASE_TESTS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_peft_mixed_batch_tests(upstream, test, case):
    getattr(upstream.TestMixedAdapterBatches(), test)(*case)


@pytest.mark.parametrize("test, case", [
    ("test_mixed_adapter_batches_different_target_layers",
     ("qGOFT on different layers", quasi(target_modules=["lin0"]), goft_scaled(target_modules=["lin1"]))),
    ("test_mixed_adapter_batches_partly_overlapping_target_layers",
     ("qGOFT partly overlapping", quasi(target_modules=["lin0"]), quasi(target_modules=["lin0", "lin1"]))),
    ("test_mixed_adapter_batches_multiple_modules_to_save",
     ("qGOFT with modules to save", quasi(target_modules=["lin0"], modules_to_save=["lin1"]),
      quasi(target_modules=["lin0"], modules_to_save=["lin1"]))),
    ("test_mixed_adapter_batches_unsupported_layer_raises",
     ("qGOFT with an unsupported module to save", quasi(target_modules=["lin0"], modules_to_save=["gru"]),
      quasi(target_modules=["lin0"], modules_to_save=["gru"]))),
], ids=lambda v: v if isinstance(v, str) else v[0])
def test_peft_mixed_batch_tests_of_their_own_cases(upstream, test, case):
    getattr(upstream.TestMixedAdapterBatches(), test)(*case)


def test_peft_wrong_adapter_name_test(upstream):
    upstream.TestMixedAdapterBatches().test_mixed_adapter_batches_lora_wrong_adapter_name_raises(
        "qGOFT mixed batch wrong adapter name", quasi(target_modules=["lin0"]))


def test_the_suite_sees_a_qgoft_that_ignores_adapter_names_fail(upstream, monkeypatch):
    """What these tests catch: with ``adapter_names`` ignored (as before PEFT mixed batches
    worked with qGOFT), PEFT's own check fails."""
    from qgoft_kernels.peft import QGOFTModel

    @__import__("contextlib").contextmanager
    def ignore(self, *args, **kwargs):
        kwargs.pop("adapter_names", None)
        yield

    monkeypatch.setattr(QGOFTModel, "_enable_peft_forward_hooks", ignore)
    with pytest.raises(AssertionError):
        upstream.TestMixedAdapterBatches().test_mixed_adapter_batches_mlp(*CASES[0])
    assert torch.is_grad_enabled()


#: PEFT's MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES with qGOFT's: two adapters on its MLP, away from the identity
MULTIPLE_ACTIVE_CASES = [
    ("qGOFT quasi, two adapters", "qgoft", QGOFTConfig, {"target_modules": ["lin0"], "init_weights": False},
     {"target_modules": ["lin0"], "init_weights": False}),
    ("qGOFT quasi and GOFT+scale on both layers", "qgoft", QGOFTConfig,
     {"target_modules": ["lin0", "lin1"], "init_weights": False},
     {"target_modules": ["lin0", "lin1"], "block": "givens", "scale": True, "init_weights": False}),
]
MULTIPLE_ACTIVE_TESTS = ["test_multiple_active_adapters_forward", "test_multiple_active_adapters_merge_and_unmerge",
                         "test_sequential_merge_matches_batch_merge",
                         "test_unmerge_after_sequential_merge_restores_base"]


@pytest.mark.parametrize("test", MULTIPLE_ACTIVE_TESTS)
@pytest.mark.parametrize("case", MULTIPLE_ACTIVE_CASES, ids=[c[0] for c in MULTIPLE_ACTIVE_CASES])
def test_peft_multiple_active_adapter_tests(upstream, test, case):
    """PEFT's TestMultipleActiveAdapters: two adapters active at once, merged in one call or one
    at a time (rotations do not commute: the merges must keep the forward's order)."""
    getattr(upstream.TestMultipleActiveAdapters(), test)(*case)


#: where qGOFT's cases join PEFT's: just before the test class whose methods are parametrized by them
GENERIC_ANCHOR = "class TestPeftCustomModel(PeftCommonTester):"


@pytest.mark.full
def test_peft_generic_tuner_tests_with_qgoft_cases(tmp_path):
    """PEFT's generic tuner tests (``TestPeftCustomModel``: save/load, merge, safe merge, unload,
    disable, delete, multiple adapters, dtypes, training, over its tiny models) with qGOFT's cases
    (``tests/peft_generic_cases.py``) added to its ``TEST_CASES`` beside OFT's, in a copy of its
    file; run by pytest in a fresh process, only the qGOFT cases. Every one must pass."""
    folder = _peft_tests()
    source = (folder / "test_custom_models.py").read_text()
    assert source.count(GENERIC_ANCHOR) == 1, f"PEFT {peft.__version__}'s test file changed: no {GENERIC_ANCHOR!r}"
    patched = source.replace(GENERIC_ANCHOR, "from peft_generic_cases import TEST_CASES_QGOFT\n"
                                             "TEST_CASES = TEST_CASES + TEST_CASES_QGOFT\n\n\n" + GENERIC_ANCHOR)
    copy = folder / "test_custom_models_with_cases.py"  # a name -k QGOFT does not match
    if not copy.exists() or copy.read_text() != patched:
        copy.write_text(patched)
    # PEFT's tests import each other relatively: their folder is run as the package ``tests``
    (folder / "__init__.py").touch()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CPU PyTorch path
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parent.parent),
                                         env.get("PYTHONPATH", "")])
    report = tmp_path / "report.xml"
    args = [str(copy), "-k", f"QGOFT and {DESELECT}", "-q", "-p", "no:cacheprovider", "--rootdir", str(folder.parent),
            f"--junitxml={report}"]
    code = f"import sys, pytest, peft_generic_cases as c; c.install_stand_ins(); sys.exit(pytest.main({args!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=folder.parent, env=env, capture_output=True, text=True,
                          timeout=1800)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    # one test per (method parametrized by TEST_CASES) x case, at least
    assert tests >= 40 * 9 and tests - skipped >= 30 * 9, tail
