"""The repository itself: the package's imports only go down, and it stands alone."""
import ast
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qgoft_kernels"


def _imports(path: pathlib.Path) -> set[str]:
    """The package modules ``path`` imports, at any depth of the file (lazy imports included)."""
    module = path.relative_to(ROOT).with_suffix("").parts
    package = module[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
            names = [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            target, names = None, [a.name for a in node.names]
        else:
            continue
        for name in names + ([target] if target else []):
            if name.startswith("qgoft_kernels"):
                found.add(name)
    return found


def test_no_import_cycles():
    """Walking GivensLinear.forward down the stack never leads back up (no cycle, lazy or not)."""
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    # a package's __init__ re-exports its modules; importing it is not an edge back up
    graph = {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in graph.items()}

    def visit(m, stack):
        assert m not in stack, "import cycle: " + " -> ".join(stack + [m])
        for dep in graph[m]:
            visit(dep, stack + [m])

    for m in graph:
        visit(m, [])



def test_repository_stands_alone():
    """Nothing in the repository points at notes or folders that are not in it."""
    outside = ("SPEC.md", "SPEC §", "PAPER-NOTES", "PEERS-NOTES", "STYLE.md", "../shared", "/work/")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    this = pathlib.Path(__file__).resolve()
    hits = []
    for name in tracked.stdout.splitlines():
        path = ROOT / name
        if path.resolve() == this or not path.is_file() or path.suffix in (".png", ".svg", ".pdf"):
            continue
        text = path.read_text(errors="ignore")
        hits += [f"{name}: {word}" for word in outside if word in text]
    assert not hits, hits
