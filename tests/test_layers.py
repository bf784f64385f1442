"""The import structure: every import between the project's modules (top-level and inside
functions, read with ast) points down the layer order of the README's layout table, so there is
no cycle; and `import report` / `import figures` in a fresh interpreter load no torch."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def layers() -> dict[str, int]:
    """{module: layer} from the README's layout table (its `layer` column; 0 is the bottom)."""
    table = {}
    for line in (REPO / "README.md").read_text().splitlines():
        row = re.match(r"\| `(\w+)\.py` \| (\d+) \|", line)
        if row:
            table[row.group(1)] = int(row.group(2))
    return table


def imports_of(path: Path, modules) -> set[str]:
    """The project modules a file imports anywhere in it (a function body's imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(modules) - {path.stem}


def graph() -> dict[str, set[str]]:
    modules = layers()
    return {m: imports_of(REPO / f"{m}.py", modules) for m in modules}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle's path, found by depth-first search (white / grey / black colouring)."""
    state, found = {}, []

    def visit(node, path):
        state[node] = "grey"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "grey":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "black"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def upward(edges: dict[str, set[str]], layer: dict[str, int]) -> list[str]:
    """Imports of a module in the same or a higher layer."""
    return [f"{a} (layer {layer[a]}) imports {b} (layer {layer[b]})"
            for a in sorted(edges) for b in sorted(edges[a]) if layer[b] >= layer[a]]


def test_the_layout_table_lists_every_module_with_a_layer():
    on_disk = {p.stem for p in REPO.glob("*.py")}
    assert set(layers()) == on_disk


def test_no_import_cycle_and_none_points_up():
    edges = graph()
    assert cycles(edges) == []
    assert upward(edges, layers()) == []


def test_the_checks_catch_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert upward({"a": {"b"}, "b": set()}, {"a": 0, "b": 1}) == ["a (layer 0) imports b (layer 1)"]
    source = "def f():\n    import report as r\n    from stats import mean_std\n"
    path = REPO / "tests" / "_layers_probe.py"
    try:
        path.write_text(source)
        assert imports_of(path, {"report", "stats", "_layers_probe"}) == {"report", "stats"}
    finally:
        path.unlink()


@pytest.mark.parametrize("module", ["report", "figures", "stats", "errors"])
def test_the_reports_load_no_torch(module):
    """Fresh interpreter: what `import <module>` loads (sys.modules), torch not among it."""
    code = f"import sys; import {module}; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
