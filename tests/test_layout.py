"""The package's import graph: acyclic, and no import of our own modules hidden in a function."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: str) -> dict[str, Path]:
  out = {}
  for path in (ROOT / package).rglob("*.py"):
    parts = path.relative_to(ROOT).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def _targets(node, module: str, is_package: bool, modules) -> list[str]:
  """Our modules one import statement loads: `from a import b` names a.b when b is a module."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name in modules]
  base = node.module or ""
  if node.level:
    pkg = module.split(".") if is_package else module.split(".")[:-1]
    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
  out = []
  for alias in node.names:
    name = f"{base}.{alias.name}"
    out.append(name if name in modules else base)
  return [t for t in out if t in modules]


def import_graph(package: str = "gemma"):
  """({module: modules it imports}, [(module, line, target) imports inside functions]).

  An import of an ancestor package is left out: Python runs a package's __init__ before any of
  its modules whatever the module imports, so it is not a dependency the module chose."""
  modules = _modules(package)
  edges: dict[str, set[str]] = {m: set() for m in modules}
  hidden = []
  for module, path in modules.items():
    tree = ast.parse(path.read_text())
    in_function = {id(n) for f in ast.walk(tree)
                   if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    for node in ast.walk(tree):
      if not isinstance(node, (ast.Import, ast.ImportFrom)):
        continue
      for target in _targets(node, module, path.name == "__init__.py", modules):
        if target == module or module.startswith(target + "."):
          continue
        edges[module].add(target)
        if id(node) in in_function:
          hidden.append((module, node.lineno, target))
  return edges, hidden


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as a list of modules, or None."""
  state: dict[str, int] = {}  # 1 on the stack, 2 done
  stack: list[str] = []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for t in sorted(edges[m]):
      if state.get(t) == 1:
        return stack[stack.index(t):] + [t]
      if t not in state and (found := visit(t)):
        return found
    stack.pop()
    state[m] = 2
    return None

  for m in sorted(edges):
    if m not in state and (found := visit(m)):
      return found
  return None


def test_import_graph_is_acyclic():
  for package in ("gemma", "pallas_kernels"):
    edges, _ = import_graph(package)
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_no_imports_of_our_modules_inside_functions():
  _, hidden = import_graph("gemma")
  assert hidden == [], "\n".join(f"{m}:{line} imports {t}" for m, line, t in hidden)


def test_pallas_kernels_import_nothing_from_gemma():
  for path in (ROOT / "pallas_kernels").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module:
        assert not node.module.startswith("gemma"), path
      if isinstance(node, ast.Import):
        assert not any(a.name.startswith("gemma") for a in node.names), path


def test_cycle_finder_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None
