"""The cfrl_jax package imports downward only: no import cycle, at module level or inside functions.

The graph is read from the source with `ast` (nothing is imported): an edge a -> b for every
`import cfrl_jax.b`, `from cfrl_jax import b` and `from cfrl_jax.b import name` in module a, at any
depth (function-level imports count: one that only dodges a cycle still is one). `from cfrl_jax.x
import y` points at cfrl_jax.x.y when y is a submodule, else at cfrl_jax.x; importing a submodule
also runs its package's __init__, so a -> cfrl_jax.x.y adds a -> cfrl_jax.x too (when that is
another module than a's own package).
"""
from __future__ import annotations

import ast
import os
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def package_modules(package_dir: str) -> dict[str, str]:
  """{dotted module name: file path} of every .py file under package_dir (a package's own
  __init__.py is named after the package)."""
  base = os.path.dirname(os.path.abspath(package_dir))
  modules = {}
  for dirpath, dirnames, filenames in os.walk(package_dir):
    dirnames[:] = sorted(d for d in dirnames if os.path.exists(os.path.join(dirpath, d, '__init__.py')))
    for f in sorted(filenames):
      if f.endswith('.py'):
        path = os.path.join(dirpath, f)
        parts = os.path.relpath(path, base)[:-3].split(os.sep)
        if parts[-1] == '__init__':
          parts = parts[:-1]
        modules['.'.join(parts)] = path
  return modules


def _is_package(name: str, modules: dict[str, str]) -> bool:
  return modules.get(name, '').endswith('__init__.py')


def imported_modules(name: str, path: str, modules: dict[str, str]) -> set[str]:
  """The package's modules that module `name` (file `path`) imports, at any depth of its code."""
  root = name.split('.')[0]
  tree = ast.parse(open(path, encoding='utf-8').read(), filename=path)
  own_package = name if _is_package(name, modules) else name.rpartition('.')[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:    # relative: from .x import y
        anchor = own_package.split('.')
        anchor = anchor[:len(anchor) - node.level + 1]
        source = '.'.join(anchor + ([node.module] if node.module else []))
      else:
        source = node.module or ''
      targets = [f'{source}.{a.name}' if f'{source}.{a.name}' in modules else source for a in node.names]
    else:
      continue
    for target in targets:
      if target.split('.')[0] != root:
        continue
      while target and target not in modules:      # `import pkg.mod.attr` style: the module part
        target = target.rpartition('.')[0]
      # Importing pkg.sub.mod runs pkg/__init__ and pkg/sub/__init__ first.
      parts = target.split('.')
      for k in range(1, len(parts) + 1):
        found.add('.'.join(parts[:k]))
  # Nor is the module itself or its own enclosing packages: they are already importing when it runs.
  return {t for t in found if not (name + '.').startswith(t + '.')}


def import_graph(package_dir: str) -> dict[str, set[str]]:
  """{module: modules of the same package it imports} for every module under package_dir."""
  modules = package_modules(package_dir)
  return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle (a list [a, b, ..., a]) per strongly connected component with more than one module
  or a self-loop, found by Tarjan's algorithm; [] when the graph is acyclic."""
  index, low, on_stack, stack, components = {}, {}, set(), [], []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
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
      components.append(set(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  cycles = []
  for component in components:
    start = min(component)
    if len(component) == 1 and start not in graph.get(start, ()):
      continue
    cycles.append(_cycle_through(start, component, graph))
  return cycles


def _cycle_through(start: str, component: set[str], graph: dict[str, set[str]]) -> list[str]:
  """A shortest path start -> ... -> start inside one strongly connected component (breadth first)."""
  parent, frontier = {start: None}, [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w in sorted(graph.get(v, ())):
        if w == start:
          path = [v]
          while parent[path[-1]] is not None:
            path.append(parent[path[-1]])
          return path[::-1] + [start]
        if w in component and w not in parent:
          parent[w] = v
          nxt.append(w)
    frontier = nxt
  raise AssertionError(f'{start} is in a strongly connected component but no cycle returns to it.')


def test_cfrl_jax_has_no_import_cycle():
  graph = import_graph(os.path.join(ROOT, 'cfrl_jax'))
  assert 'cfrl_jax.models.qwen' in graph and 'cfrl_jax.train.trainer' in graph   # the walk found the package
  cycles = find_cycles(graph)
  assert not cycles, 'import cycles in cfrl_jax (modules must import downward only):\n' + '\n'.join(
      '  ' + ' -> '.join(c) for c in cycles)


def _write_package(root, files: dict[str, str]) -> str:
  for rel, text in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
  return str(root / 'fake')


def test_finder_reports_a_cycle_hidden_in_a_function(tmp_path):
  """fake.a -> fake.sub.b (module level, `from fake.sub import b` naming a submodule) and
  fake.sub.b -> fake.a inside a function: the cycle the test above exists to catch."""
  pkg = _write_package(tmp_path, {
      'fake/__init__.py': '',
      'fake/a.py': 'from fake.sub import b\n',
      'fake/sub/__init__.py': '',
      'fake/sub/b.py': 'def f():\n  from fake import a\n  return a\n',
      'fake/c.py': 'import os\nfrom fake.sub.b import f\n',
  })
  graph = import_graph(pkg)
  assert graph['fake.a'] == {'fake.sub', 'fake.sub.b'}
  assert graph['fake.sub.b'] == {'fake.a'}
  assert graph['fake.c'] == {'fake.sub', 'fake.sub.b'}
  assert find_cycles(graph) == [['fake.a', 'fake.sub.b', 'fake.a']]


def test_finder_passes_a_layered_package_and_finds_the_shortest_cycle(tmp_path):
  pkg = _write_package(tmp_path, {
      'fake/__init__.py': 'from fake.low import x\n',     # the package imports its bottom module
      'fake/low.py': 'x = 1\n',
      'fake/mid.py': 'import fake.low\nfrom fake.low import x\n',
      'fake/top.py': 'from fake import mid, low\n',
  })
  graph = import_graph(pkg)
  assert graph['fake'] == {'fake.low'} and graph['fake.top'] == {'fake.mid', 'fake.low'}
  assert find_cycles(graph) == []
  # The bottom module reaching up to the top closes a cycle of three.
  (tmp_path / 'fake' / 'low.py').write_text('def f():\n  import fake.top\nx = 1\n')
  assert find_cycles(import_graph(pkg)) == [['fake.low', 'fake.top', 'fake.low']]
  (tmp_path / 'fake' / 'top.py').write_text('from fake import mid\n')
  assert find_cycles(import_graph(pkg)) == [['fake.low', 'fake.top', 'fake.mid', 'fake.low']]


@pytest.mark.parametrize('source,expected', [
    ('from fake import low\n', {'fake.low'}),
    ('from fake.low import x\n', {'fake.low'}),
    ('import fake.low as l\n', {'fake.low'}),
    ('from . import low\n', {'fake.low'}),
    ('from .low import x\n', {'fake.low'}),
    ('from fake.sub.deep import y\n', {'fake.sub', 'fake.sub.deep'}),   # runs fake/sub/__init__ first
    ('import json\nfrom os import path\n', set()),
])
def test_imported_modules_resolves_each_import_form(tmp_path, source, expected):
  pkg = _write_package(tmp_path, {'fake/__init__.py': '', 'fake/low.py': 'x = 1\n', 'fake/sub/__init__.py': '',
                                  'fake/sub/deep.py': 'y = 1\n', 'fake/m.py': source})
  assert import_graph(pkg)['fake.m'] == expected
