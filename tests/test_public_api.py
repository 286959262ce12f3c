"""The public API guard (issue #18, item 9): ``robustbench_med.__all__`` is exactly the public names (the module
docstring's list plus the error classes), every name resolves, the grid entry points are exported, and no README code
example imports a private module."""
import ast
import inspect
import re
import types
from pathlib import Path

import pytest

import robustbench_med as rbm
from robustbench_med import errors

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", *sorted((ROOT / "leaderboards").rglob("README.md"))]


def docstring_api() -> set[str]:
    """The names of the ``Public API`` block of the package docstring."""
    block = rbm.__doc__.split("Public API", 1)[1].split("::", 1)[1].split("\n\n")[1]
    return {name.strip() for name in block.replace("\n", ",").split(",") if name.strip()}


def public_modules() -> set[str]:
    """``robustbench_med`` and the modules the docstring calls public."""
    sentence = rbm.__doc__.split("Public modules", 1)[1].split("\n\n", 1)[0]
    return {"robustbench_med", *re.findall(r"``(robustbench_med\.[\w.]+)``", sentence)}


def error_classes() -> set[str]:
    return {n for n, obj in vars(errors).items()
            if inspect.isclass(obj) and issubclass(obj, errors.RobustBenchMedError) and obj.__module__ == errors.__name__}


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def private_imports(code: str) -> list[str]:
    """The imports of ``code`` that reach past the public API: a ``robustbench_med`` module that is not public (or has
    a component starting with ``_``), or a name imported from ``robustbench_med`` that is not in ``__all__``."""
    bad = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            modules = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules = [(node.module, [a.name for a in node.names])]
        else:
            continue
        for module, names in modules:
            if module.split(".")[0] != "robustbench_med":
                continue
            if module not in public_modules() or any(part.startswith("_") for part in module.split(".")):
                bad.append(module)
            elif module == "robustbench_med" and names:
                bad += [f"robustbench_med.{n}" for n in names if n not in rbm.__all__]
    return bad


def test_all_is_exactly_the_public_names():
    assert len(rbm.__all__) == len(set(rbm.__all__)), "duplicates in __all__"
    assert not [n for n in rbm.__all__ if n.startswith("_")]
    public = {n for n in dir(rbm) if not n.startswith("_") and not isinstance(getattr(rbm, n), types.ModuleType)}
    assert public == set(rbm.__all__), f"public but not in __all__: {public - set(rbm.__all__)}; " \
                                       f"in __all__ only: {set(rbm.__all__) - public}"


def test_all_is_the_documented_api_plus_the_errors():
    assert set(rbm.__all__) == docstring_api() | error_classes()
    assert {"RobustBenchMedError", "ConfigError", "UnknownNameError"} <= error_classes()


def test_every_exported_name_resolves():
    for name in rbm.__all__:
        obj = getattr(rbm, name)
        assert obj is not None and (callable(obj) or inspect.isclass(obj)), name


@pytest.mark.parametrize("name, module", [("run_grid", "robustbench_med.runner"), ("load_grid", "robustbench_med.grid"),
                                          ("summarize", "robustbench_med.leaderboard"),
                                          ("build_entries", "robustbench_med.entries")])
def test_grid_entry_points_are_exported(name, module):
    import importlib

    assert name in rbm.__all__
    assert getattr(rbm, name) is getattr(importlib.import_module(module), name)
    assert name in dir(rbm)


def test_the_import_check_catches_private_imports():
    assert private_imports("from robustbench_med.runner import run_grid") == ["robustbench_med.runner"]
    assert private_imports("import robustbench_med._x as y") == ["robustbench_med._x"]
    assert private_imports("from robustbench_med import _LAZY, wrap") == ["robustbench_med._LAZY"]
    assert private_imports("import robustbench_med as rbm\nfrom robustbench_med.testing import assert_no_regression\n"
                           "from robustbench_med.errors import ConfigError\nimport torch") == []


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_readme_code_compiles_and_imports_only_the_public_api(readme):
    for i, code in enumerate(python_blocks(readme)):
        compile(code, f"{readme.name}[python block {i}]", "exec")
        assert private_imports(code) == [], f"{readme.name}, python block {i}"


def test_the_readme_has_python_examples():
    assert len(python_blocks(ROOT / "README.md")) >= 3
