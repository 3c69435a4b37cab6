"""The package's import graph has no cycles and points down the layers of docs/architecture.md."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).parents[1] / 'smallssd_jax'

# (group, rank) by module prefix; the first match wins. A module may import
# modules of its own group and of groups with a lower rank, nothing else.
# docs/architecture.md draws the same table.
LAYERS = [
    ('smallssd_jax.tools', 'tools', 8),
    ('smallssd_jax.main', 'main', 7),
    ('smallssd_jax.datasets.__main__', 'main', 7),   # the dataset audit command
    ('smallssd_jax.runner', 'runner', 6),
    ('smallssd_jax.train', 'train', 5),
    ('smallssd_jax.predictor', 'predictor', 5),
    ('smallssd_jax.config_check', 'config_check', 5),
    ('smallssd_jax.export', 'export', 6),
    ('smallssd_jax.checkpoints', 'checkpoints', 4),
    ('smallssd_jax.evaluation', 'evaluation', 4),
    ('smallssd_jax.detect', 'detect', 4),
    ('smallssd_jax.video', 'detect', 4),
    ('smallssd_jax.weights', 'weights', 3),
    ('smallssd_jax.task', 'task', 2),
    ('smallssd_jax.config_blocks', 'config_blocks', 2),
    ('smallssd_jax.models', 'models', 1),
    ('smallssd_jax.datasets', 'datasets', 1),
    ('smallssd_jax.metrics', 'metrics', 1),
    ('smallssd_jax.anchors', 'core', 1),
    ('smallssd_jax.matching', 'core', 1),
    ('smallssd_jax.losses', 'core', 1),
    ('smallssd_jax.postprocess', 'core', 1),
    ('smallssd_jax.pixels', 'core', 1),
    ('smallssd_jax.coverage', 'core', 1),
    ('smallssd_jax.boxes', 'foundation', 0),
    ('smallssd_jax.config_lib', 'foundation', 0),
    ('smallssd_jax.errors', 'foundation', 0),
    ('smallssd_jax.sharding', 'foundation', 0),
    ('smallssd_jax.batch_layout', 'foundation', 0),
    ('smallssd_jax.console', 'foundation', 0),
    ('smallssd_jax._xla', 'foundation', 0),
    ('smallssd_jax.writers', 'foundation', 0),
    ('smallssd_jax.optim', 'foundation', 0),
    ('smallssd_jax', 'root', 9),          # __init__: lazy re-exports only
]


def layer_of(module: str) -> tuple[str, int]:
  for prefix, group, rank in LAYERS:
    if module == prefix or module.startswith(prefix + '.'):
      return group, rank
  raise KeyError(f'{module} has no layer in tests/test_layering.py (and docs/architecture.md)')


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(PACKAGE.parent).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts = parts[:-1]
  return '.'.join(parts)


def import_graph(package: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
  """`{module: {smallssd_jax modules it imports}}`, function-level imports included."""
  modules = {module_name(p): p for p in package.rglob('*.py')}
  graph = {}
  for name, path in modules.items():
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        targets = [f'{node.module}.{a.name}' for a in node.names]
      for target in targets:
        if not target.startswith('smallssd_jax'):
          continue
        # `from smallssd_jax.x import y`: y is a module or a name in x.
        while target not in modules and '.' in target:
          target = target.rsplit('.', 1)[0]
        if target in modules and target != name:
          edges.add(target)
    graph[name] = edges
  return graph


def violations(graph: dict[str, set[str]]) -> list[str]:
  """Imports that point up or sideways between layers, and import cycles."""
  out = []
  for module, targets in sorted(graph.items()):
    group, rank = layer_of(module)
    for target in sorted(targets):
      if group == 'root':
        out.append(f'{module} imports {target}: the package root re-exports lazily only')
        continue
      target_group, target_rank = layer_of(target)
      if target_group != group and target_rank >= rank:
        out.append(f'{module} ({group}, layer {rank}) imports {target} '
                   f'({target_group}, layer {target_rank})')
  # Cycles, by depth-first search.
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(node: str) -> None:
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        out.append('import cycle: ' + ' -> '.join(stack[stack.index(nxt):] + [nxt]))
      elif nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = 2

  for node in sorted(graph):
    if node not in state:
      visit(node)
  return out


def test_the_package_is_layered_without_cycles():
  graph = import_graph()
  assert 'smallssd_jax.train' in graph and 'smallssd_jax.evaluation' in graph
  assert violations(graph) == []


def test_evaluation_does_not_know_the_trainer():
  graph = import_graph()
  assert 'smallssd_jax.train' not in graph['smallssd_jax.evaluation']
  assert 'smallssd_jax.datasets.photometric' not in graph['smallssd_jax.pixels']


@pytest.mark.parametrize('planted, expected', [
    (('smallssd_jax.boxes', 'smallssd_jax.train'), 'imports smallssd_jax.train'),
    (('smallssd_jax.evaluation', 'smallssd_jax.detect'), 'imports smallssd_jax.detect'),
    (('smallssd_jax.losses', 'smallssd_jax.anchors'), 'import cycle'),
])
def test_a_planted_upward_import_or_cycle_is_found(planted, expected):
  graph = import_graph()
  source, target = planted
  if expected == 'import cycle':
    # Within one group (allowed by layer) but closing a loop: anchors -> losses -> anchors.
    graph['smallssd_jax.anchors'] = set(graph['smallssd_jax.anchors']) | {'smallssd_jax.losses'}
  graph[source] = set(graph[source]) | {target}
  assert any(expected in v for v in violations(graph)), violations(graph)


def test_importing_the_package_leaves_xla_flags_alone():
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ('import os, smallssd_jax, smallssd_jax.train, smallssd_jax.models; '
          'print(repr(os.environ.get("XLA_FLAGS")))')
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'SMALLSSD_JAX_XLA_DEFAULTS')}
  env['JAX_PLATFORMS'] = 'cpu'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                       timeout=120, check=True).stdout.strip()
  assert out == 'None'
  code = 'import os, smallssd_jax; smallssd_jax.apply_cpu_xla_defaults(); print(os.environ["XLA_FLAGS"])'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                       timeout=120, check=True).stdout.strip()
  assert out == '--xla_disable_hlo_passes=dot-library-rewriter'


def test_every_command_line_entry_point_applies_the_cpu_xla_defaults():
  """Importing the package leaves XLA_FLAGS alone, so each `python -m` entry point must set
  the CPU defaults itself (without them the CPU train step is several times slower)."""
  package = pathlib.Path(__file__).parents[1] / 'smallssd_jax'
  entry_points = [p for p in package.rglob('*.py')
                  if "if __name__ == '__main__':" in p.read_text()]
  assert len(entry_points) >= 10
  missing = []
  for path in entry_points:
    tree = ast.parse(path.read_text())
    calls = {node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute)}
    if 'apply_cpu_xla_defaults' not in calls:
      missing.append(str(path.relative_to(package)))
  assert not missing, f'entry points that do not apply the CPU XLA defaults: {missing}'
