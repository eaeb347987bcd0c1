"""Imports follow the data flow feature_specs/ -> components/ -> models/ -> pipeline/, and the
product never imports its measurements: every import statement of the tree (at module level
or inside a function) is read with ast and checked against the rules below."""

import ast
import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# package -> the project's packages it must never import, and why.
FORBIDDEN = {
    "feature_specs": ({"components", "models", "pipeline", "serving", "benchmarks"},
                      "feature_specs is the source everything else derives from"),
    "components": ({"pipeline", "benchmarks"}, "the pipeline is built from the components"),
    "models": ({"pipeline", "serving", "benchmarks"}, "the pipeline trains the models, not the other way; "
                                                       "the server knows no model"),
    "pipeline": ({"benchmarks"}, "the product never imports its measurements"),
    "serving": ({"models", "pipeline", "benchmarks"}, "the server serves any SavedModel"),
}


def imported_packages(path: pathlib.Path):
    """(line, top-level package) of every absolute import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def violations(root: pathlib.Path):
    found = []
    for package, (forbidden, why) in FORBIDDEN.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, imported in imported_packages(path):
                if imported in forbidden:
                    found.append(f"{path.relative_to(root)}:{line} imports {imported} ({why})")
    return found


def test_imports_follow_the_data_flow():
    found = violations(REPO_ROOT)
    assert not found, "\n".join(found)


def test_the_check_sees_imports_inside_functions(tmp_path):
    (tmp_path / "serving").mkdir()
    (tmp_path / "serving" / "x.py").write_text("import os\n\ndef f():\n    from models import export\n")
    assert violations(tmp_path) == ["serving/x.py:4 imports models (the server serves any SavedModel)"]

