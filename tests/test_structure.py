"""The package's shape, checked from its source: three roles (kernels imported only by ops, the ops contract, the
trainer), no import cycle among its modules, imports at the top of each file (but optional dependencies), one outer
training loop, and no function in the trainer over 80 lines."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rto_fast"
# Imported inside functions on purpose: optional dependencies, and torch features newer than the oldest torch.
OPTIONAL = ("deepspeed", "peft", "triton", "flash_attn", "wandb", "torch.utils.tensorboard",
            "torch.nn.attention.varlen", "torch.nn.attention.flex_attention", "transformers.integrations")
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for _ in range(node.level - 1):
        package = package.rsplit(".", 1)[0]
    return f"{package}.{node.module}" if node.module else package


def imports_of(module: str) -> list[tuple[str, ast.stmt, bool]]:
    """(imported module, node, at module level) for every import in `module` (a name imported from a package that
    is itself a submodule counts as that submodule)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # Module level, or in a module-level `try: import ... except ImportError` (a version-dependent name).
    top_level = {id(node) for statement in tree.body
                 for node in (ast.walk(statement) if isinstance(statement, ast.Try) else [statement])}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.append((submodule if submodule in MODULES else target, node, id(node) in top_level))
    return found


def package_graph() -> dict[str, set[str]]:
    graph = {}
    for module in MODULES:
        edges = set()
        for target, _, _ in imports_of(module):
            # An import of a.b.c also runs a.b and a (their __init__): the nearest module of the package counts.
            while target and target not in MODULES:
                target = target.rsplit(".", 1)[0] if "." in target else ""
            if target and target != module and target.startswith("rto_fast"):
                edges.add(target)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == "open":
                return stack[stack.index(child):] + [child]
            if child not in state:
                cycle = visit(child)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_the_imports():
    graph = package_graph()
    assert "rto_fast.trainer.loop" in graph["rto_fast.trainer.supervised"]
    assert "rto_fast.kernels.logprobs" in graph["rto_fast.ops.logprobs"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_among_the_package_modules():
    assert find_cycle(package_graph()) is None


def test_kernels_are_imported_only_by_the_ops():
    for module, edges in package_graph().items():
        if module.startswith(("rto_fast.kernels", "rto_fast.ops")):
            continue
        assert not [edge for edge in edges if edge.startswith("rto_fast.kernels")], module


def test_the_ops_and_the_tasks_do_not_import_the_trainer():
    for module, edges in package_graph().items():
        if module.startswith(("rto_fast.ops", "rto_fast.kernels", "rto_fast.tasks")):
            assert not [edge for edge in edges if edge.startswith("rto_fast.trainer")], module


@pytest.mark.parametrize("module", [name for name in MODULES if not name.startswith("rto_fast.kernels")])
def test_imports_stand_at_the_top_but_optional_dependencies(module):
    late = [f"line {node.lineno}: {target}" for target, node, top in imports_of(module)
            if not top and not target.startswith(OPTIONAL) and not target.startswith("rto_fast.kernels")]
    assert not late, f"{module}: imports inside functions: {late}"


def test_no_function_in_the_trainer_is_over_80_lines():
    long = []
    for module, path in MODULES.items():
        if not module.startswith("rto_fast.trainer"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, long


def test_one_outer_training_loop():
    """Only rto_fast.trainer.loop resumes, checkpoints and shows progress: every stage that trains goes through it."""
    owners = {}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                if name in ("resume_point", "checkpoint_or_stop", "ProgressBar", "save_checkpoint"):
                    owners.setdefault(name, set()).add(module)
    assert owners["resume_point"] == owners["checkpoint_or_stop"] == owners["ProgressBar"] == {"rto_fast.trainer.loop"}
    assert "rto_fast.trainer.supervised" not in owners["save_checkpoint"]
    assert "rto_fast.trainer.rl.stage" not in owners["save_checkpoint"]
