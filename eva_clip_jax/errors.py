"""The project's own "the input is wrong" error, apart from the ValueErrors of the libraries underneath.

A command (`eva_clip_jax.cli.run`) ends in one `error:` line for an InputError, with no traceback; any other
ValueError is a bug and keeps its traceback. This module imports nothing from the package, so every layer can use it.
"""


class InputError(ValueError):
  """What the user gave is wrong and they can fix it: a config value, a flag, a model or dataset name, the content of
  a file they pointed at, or an install that does not fit the host. A ValueError, so `except ValueError` still
  catches it; a check of the package's own invariants (a bug when it fails) raises ValueError or asserts instead."""


class MissingDependency(InputError, ImportError):
  """An optional library a feature needs is not installed (tensorflow-datasets, torch, huggingface_hub): the
  message says what to install. An ImportError too, so `except ImportError` around optional imports still works."""
