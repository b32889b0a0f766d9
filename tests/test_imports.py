"""The import structure of vlm/: no import cycle, and no private name imported across modules.

Both are read from the source with `ast`, counting imports inside functions too (a lazy import that
closes a cycle is still a cycle in the design: two modules that each need the other). A package's
`__init__` counts as the module `vlm.pkg`; `from vlm.pkg import sub` is an edge to `vlm.pkg.sub`
when `sub` is a module, else to `vlm.pkg`.
"""

import ast
from pathlib import Path

VLM = Path(__file__).resolve().parent.parent / "vlm"


def modules() -> dict[str, Path]:
  out = {}
  for path in sorted(VLM.rglob("*.py")):
    parts = list(path.relative_to(VLM.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
  """(graph {module: modules it imports}, ['file:line: module imports source.name'] of private names)."""

  def owner(name: str) -> str | None:  # the module a dotted name lives in
    while name and name not in mods:
      name = name.rpartition(".")[0]
    return name or None

  graph: dict[str, set[str]] = {m: set() for m in mods}
  private = []
  for m, path in mods.items():
    package = m if path.name == "__init__.py" else m.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [(a.name, None) for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          up = package.split(".")[: len(package.split(".")) - node.level + 1]
          base = ".".join(up + ([node.module] if node.module else []))
        targets = [(base, a.name) for a in node.names]
      for base, name in targets:
        if not (base == "vlm" or base.startswith("vlm.")):
          continue
        full = f"{base}.{name}" if name else base
        target = owner(full) if full in mods else owner(base)
        if target and target != m:
          graph[m].add(target)
        if name and name.startswith("_") and not name.startswith("__") and full not in mods:
          private.append(f"{path.relative_to(VLM.parent)}:{node.lineno}: {m} imports {base}.{name}")
  return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan), each sorted."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  out: list[list[str]] = []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_graph_reader_sees_cycles_and_private_imports(tmp_path, monkeypatch):
  """The checks below can fail: a two-module cycle through a lazy import, and a private import."""
  pkg = tmp_path / "vlm"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("from vlm.sub import b  # noqa\n")
  (pkg / "a.py").write_text("def f():\n  from vlm.sub.b import g\n  return g\n")
  (pkg / "sub" / "b.py").write_text("from vlm import a\nfrom vlm.a import _h\n")
  (pkg / "c.py").write_text("from . import a\n")
  monkeypatch.setitem(globals(), "VLM", pkg)
  graph, private = imports(modules())
  assert graph["vlm.c"] == {"vlm.a"} and graph["vlm.sub"] == {"vlm.sub.b"}
  assert cycles(graph) == [["vlm.a", "vlm.sub.b"]]
  assert private == ["vlm/sub/b.py:2: vlm.sub.b imports vlm.a._h"]


def test_no_import_cycle_in_vlm():
  found = cycles(imports(modules())[0])
  assert not found, "import cycles (modules that import each other, directly or through others):\n  " + "\n  ".join(
    " <-> ".join(c) for c in found
  )


def test_no_private_name_is_imported_across_modules():
  private = imports(modules())[1]
  assert not private, "private names imported from another module (make them public where they are shared):\n  " + (
    "\n  ".join(private)
  )
