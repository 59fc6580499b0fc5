"""The one-way rule of ../shared/STYLE.md, checked by parsing every import."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lower number = lower layer. A module may import its own layer or lower ones only.
LAYERS = {
    "cpu_kernels": 0,
    "hybrid.errors": 1, "hybrid.read": 1,  # checkpoint -> config and tensors (and the expert store)
    "placement": 2,  # -> placement plan
    "hybrid.run": 3,  # -> the model a plan is applied to
    "hybrid.generation": 4,  # -> opening a runtime, generation
    "hybrid.cli": 5, "hybrid.chat": 5, "hybrid.profile": 5, "hybrid.server": 5,  # -> front ends
}


def layer_of(module: str):
    best = None
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return best[1] if best else None


def project_modules():
    for pkg in ("hybrid", "cpu_kernels", "placement"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            yield ".".join(parts), path


def imports(path: Path, top_level_only=False):
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_every_module_has_a_layer():
    for module, _ in project_modules():
        if module not in ("hybrid",):
            assert layer_of(module) is not None, f"{module} is missing from LAYERS in tests/test_layout.py"


def test_no_upward_imports():
    for module, path in project_modules():
        mine = layer_of(module)
        if mine is None:
            continue
        for imp in imports(path):
            theirs = layer_of(imp)
            assert theirs is None or theirs <= mine, f"{module} (layer {mine}) imports {imp} (layer {theirs})"


def test_cpu_kernels_import_numpy_and_numba_only():
    # llvmlite is numba's own backend; gguf, llama.cpp's Python package: its type table and IQ grids define the
    # GGUF block formats
    allowed_roots = {"numpy", "numba", "llvmlite", "gguf", "cpu_kernels", "__future__"}
    for module, path in project_modules():
        if not module.startswith("cpu_kernels") or module == "cpu_kernels.bench":
            continue
        for imp in imports(path):
            root = imp.split(".")[0]
            assert root in allowed_roots or root in STDLIB, f"{module} imports {imp}"
    bench = ROOT / "cpu_kernels" / "bench.py"
    if bench.exists():  # the benchmark may use torch inside the baseline function, not at module level
        assert not {i.split(".")[0] for i in imports(bench, top_level_only=True)} & {"torch", "hybrid", "placement"}


def test_placement_does_not_import_torch_at_module_level():
    for module, path in project_modules():
        if module.startswith("placement"):
            assert "torch" not in {i.split(".")[0] for i in imports(path, top_level_only=True)}, module


def test_no_import_cycles():
    graph = {}
    mods = dict(project_modules())
    for module, path in mods.items():
        graph[module] = {i for i in imports(path) if i in mods and i != module}
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for n in graph[m]:
            if state.get(n) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(stack + [m, n])}")
            if n not in state:
                visit(n, stack + [m])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [])


def test_hybrid_init_is_cheap():
    assert set(imports(ROOT / "hybrid" / "__init__.py")) == set()


STDLIB = set(sys.stdlib_module_names)

FRONT_ENDS = ("hybrid.cli", "hybrid.chat", "hybrid.profile", "hybrid.server")
MAX_COMMAND_LINES = 40


def test_front_ends_only_parse_and_call():
    """Click commands stay short and reach torch and the model only through library functions."""
    for module, path in project_modules():
        if not module.startswith(FRONT_ENDS):
            continue
        top = {i.split(".")[0] for i in imports(path, top_level_only=True)}
        assert "torch" not in top, f"{module} imports torch at module level: `hybrid --help` would pay for it"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(
                    "command" in ast.unparse(d) for d in node.decorator_list):
                n = node.end_lineno - node.lineno + 1
                assert n <= MAX_COMMAND_LINES, f"{module}.{node.name} is {n} lines; move the work into the library"
        for imp in imports(path):
            assert not imp.startswith(("hybrid.run.layers", "hybrid.run.model", "hybrid.run.rope")), \
                f"{module} reaches into the model ({imp}); call a library function instead"
