"""The package's shape: no import cycle, small modules and loop functions, a docstring atop every module, and
README's Layout section naming every module (so a newcomer's map stays true)."""
import ast
import pathlib
import re

PKG = pathlib.Path(__file__).resolve().parents[1] / "so8t_jax"
README = PKG.parent / "README.md"


def _modules() -> dict[str, pathlib.Path]:
    return {".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PKG.rglob("*.py")}


def _imports(name: str, path: pathlib.Path, known) -> set[str]:
    """Package modules `name` imports, anywhere in the file (function-level imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative
                base = ".".join(name.split(".")[:-node.level] + [node.module])
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m in known and m != name and m != "so8t_jax"}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None
    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    mods = _modules()
    graph = {n: _imports(n, p, mods) for n, p in mods.items()}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_modules_are_small_and_documented():
    for name, path in _modules().items():
        text = path.read_text()
        assert len(text.splitlines()) <= 400, f"{name}: {len(text.splitlines())} lines (split it)"
        if text.strip():
            assert ast.get_docstring(ast.parse(text)), f"{name}: no module docstring"


def test_loop_functions_are_short():
    for name in ("trainer", "train_step", "evaluate"):
        tree = ast.parse((PKG / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                assert n <= 60, f"{name}.{node.name}: {n} lines"


def test_readme_layout_names_every_module():
    layout = README.read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    for name, path in _modules().items():
        if path.name == "__init__.py":
            continue
        assert re.search(rf"\b{re.escape(path.stem)}(\.py)?\b", layout), f"README's Layout misses {name}"
