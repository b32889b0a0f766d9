"""Imports tensorflow_datasets for use without TensorFlow.

tensorflow_datasets 4.9.10 reads and writes ArrayRecord datasets without
TensorFlow, but `DatasetBuilder.code_path` touches the `importlib_resources`
backport, which is not a dependency of this project. Python 3.11's own
`importlib.resources` has the same `abc.Traversable`, so we alias it when the
backport is missing. Import tfds through `import_tfds()`.
"""

from __future__ import annotations

import importlib.resources
import importlib.resources.abc
import sys


def import_tfds():
  """Returns the `tensorflow_datasets` module, usable without TensorFlow."""
  try:
    import importlib_resources  # noqa: F401
  except ImportError:
    sys.modules.setdefault("importlib_resources", importlib.resources)
  import tensorflow_datasets as tfds

  return tfds
