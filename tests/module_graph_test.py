"""The package's import arrows (`benchmarks/module_graph.py`): no import cycle at all, so the
layers read in one direction; evaluation, checkpoints, reports and the error types by name
(issue 21)."""

import importlib.util

from conftest import REPO

spec = importlib.util.spec_from_file_location(
  'module_graph', REPO / 'benchmarks' / 'module_graph.py'
)
module_graph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module_graph)


def test_evaluation_checkpoints_and_reports_are_in_no_cycle():
  g = module_graph.graph()
  in_cycles = {m for c in module_graph.cycles(g['arrows']) for m in c}
  for name in ('infer.eval_lib', 'run.checkpointing', 'infer.reporting', 'errors', 'io.naming'):
    assert f'u2net_jax.{name}' in g['modules']
    assert f'u2net_jax.{name}' not in in_cycles, module_graph.cycles(g['arrows'])


def test_the_package_has_no_import_cycle():
  # Function-level imports count too: a lazy import that closes a loop is still back and forth.
  assert module_graph.cycles(module_graph.graph()['arrows']) == []


def test_cycles_finds_a_loop_and_nothing_else():
  assert module_graph.cycles([('a', 'b'), ('b', 'c'), ('c', 'a'), ('c', 'd')]) == [['a', 'b', 'c']]
  assert module_graph.cycles([('a', 'b'), ('b', 'c')]) == []
