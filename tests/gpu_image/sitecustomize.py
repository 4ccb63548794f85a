"""Makes this interpreter see the GPU machine's Python packages only: the image's list
(tests/data/gpu_image_packages.txt) plus the wheels the GPU command carries (benchmarks/gpu_wheels.txt).

Python imports `sitecustomize` at start-up from the first folder on sys.path that has one: putting this folder on
PYTHONPATH applies it to a process and, through the inherited environment, to every Python subprocess it starts
(gpu_check's pytest run and train-step workers). Every top-level module an installed distribution provides, where
none of its distributions is on either list, is set to None in sys.modules: `import grain` then raises
ModuleNotFoundError, `importlib.util.find_spec('grain')` returns None and importlib.metadata finds no 'grain', as on
a machine without it. The standard library and this checkout's own modules stay importable; so do the dependencies
of the listed packages as installed here (the image's packages work there, so theirs are there). What it cannot
imitate: the image's versions (jax 0.11.2 there). GPU_IMAGE_WHEEL_LIST swaps the wheel list (an empty file: the
image alone).
"""

import importlib.machinery
import importlib.metadata
import os
import pathlib
import re
import sys

_ROOT = pathlib.Path(__file__).resolve().parents[2]
_LISTS = (_ROOT / 'tests' / 'data' / 'gpu_image_packages.txt',
          pathlib.Path(os.environ.get('GPU_IMAGE_WHEEL_LIST', _ROOT / 'benchmarks' / 'gpu_wheels.txt')))
_OWN = 'eva-clip-jax'  # this checkout, on PYTHONPATH there as here


def _normalize(name: str) -> str:
  return re.sub(r'[-_.]+', '-', name).lower()  # PEP 503: 'ml_collections' is 'ml-collections'


def _listed() -> set[str]:
  names = {_OWN}
  for path in _LISTS:
    for line in path.read_text().splitlines():
      line = line.split('#')[0].strip()
      if line:
        names.add(_normalize(re.split(r'[=<>\[; ]', line)[0]))
  return names


def _with_dependencies(names: set[str]) -> set[str]:
  """`names` and what their installed versions require, transitively (extras left out). The image's packages work
  there, so their own dependencies are there: newer versions here may need modules the image's do not (torch 2.14
  imports optree), and those are not what this test looks for."""
  installed = {_normalize(d.metadata['Name'] or ''): d for d in importlib.metadata.distributions()}
  closure, todo = set(), list(names)
  while todo:
    name = todo.pop()
    if name in closure:
      continue
    closure.add(name)
    for requirement in (installed[name].requires or []) if name in installed else []:
      if 'extra' not in requirement.partition(';')[2]:  # an optional feature's needs are not the package's
        todo.append(_normalize(re.split(r'[=<>!~\[; (]', requirement.strip())[0]))
  return closure


def _hide() -> list[str]:
  listed = _with_dependencies(_listed())
  hidden = sorted(module for module, dists in importlib.metadata.packages_distributions().items()
                  if module.isidentifier() and module not in sys.stdlib_module_names
                  and not any(_normalize(d) in listed for d in dists))
  for module in hidden:
    sys.modules[module] = None
  # Their metadata too: libraries probe for optional packages with importlib.metadata.version (torch for optree).
  find_distributions = importlib.machinery.PathFinder.find_distributions

  def visible_distributions(*args, **kwargs):
    return (d for d in find_distributions(*args, **kwargs) if _normalize(d.metadata['Name'] or '') in listed)

  importlib.machinery.PathFinder.find_distributions = staticmethod(visible_distributions)
  return hidden


HIDDEN = _hide()
