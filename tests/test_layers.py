"""The layering: `fluxir/` is the library and never loads Ray; only actors/ does."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import importlib, pkgutil, sys
import fluxir
names = sorted(m.name for m in pkgutil.walk_packages(fluxir.__path__, "fluxir.") if not m.name.endswith("__main__"))
for name in names:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith(("ray.", "actors")))
print(len(names), *loaded)
"""


def test_importing_every_fluxir_module_leaves_ray_unloaded():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    count, *loaded = out.stdout.split()
    assert int(count) >= 25  # every module of the package was imported, not an empty walk
    assert loaded == [], f"importing fluxir loaded {loaded}"


def test_no_fluxir_module_imports_actors():
    """Not even lazily inside a function (which the import probe above would not see): the command line,
    which calls both layers, lives in actors/ (actors/cli.py)."""
    offenders = []
    for path in sorted((ROOT / "fluxir").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                          if n == "actors" or n.startswith("actors.")]
    assert offenders == [], f"fluxir/ imports the Ray layer: {offenders}"


def test_the_readme_layout_names_every_module():
    """The README's layout block lists each module of fluxir/ and actors/ under its package."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed, package = set(), None
    for line in block.splitlines():
        if line[:1].strip():
            package = line.split()[0].rstrip("/")
        elif package in ("fluxir", "actors") and line.startswith("  ") and line[2:3].strip():  # not a continuation
            listed.add(f"{package}/{line.split()[0]}")
    modules = {f"{p.parent.name}/{p.name}" for package in ("fluxir", "actors") for p in (ROOT / package).glob("*.py")}
    assert modules - listed == set(), "modules missing from the README's layout"
    assert listed - modules == set(), "the README's layout names modules that do not exist"
