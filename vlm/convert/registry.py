"""Hugging Face checkpoint importers, registered by the config.json `model_type` they read, and
exporters, registered by the vlm `model_name` they write.

An importer module decorates its `import_hf_*(path, scan=False) -> (model name, kwargs, params)` with
`@register_importer("type", ...)`; `vlm.convert.hf.import_hf` finds it with `importer_for(model_type)`. The
first lookup imports every submodule of vlm.convert (importlib + pkgutil), so that a new importer needs only
its own file. An exporter `export_*(config, params, out, *, model_type=None, peft=None) -> config.json dict`
(`vlm.export`'s job for one family: config is the run's, peft its config.peft or None) is decorated with
`@register_exporter("model_name", ...)`. This module imports no other vlm module (the importers import it).
"""

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

Importer = Callable[..., tuple[str, dict[str, Any], dict]]
Exporter = Callable[..., dict[str, Any]]

_IMPORTERS: dict[str, Importer] = {}
_EXPORTERS: dict[str, Exporter] = {}
_discovered = False


def _qualname(fn: Importer) -> str:
  return f"{fn.__module__}.{fn.__qualname__}"


def _registrar(table: dict[str, Callable], what: str, keys: tuple[str, ...]) -> Callable[[Callable], Callable]:
  if not keys:
    raise ValueError(f"register_{what} needs at least one name")

  def register(fn: Callable) -> Callable:
    for key in keys:
      old = table.get(key)
      if old is not None and _qualname(old) != _qualname(fn):  # the same function again: a module reload
        raise ValueError(f"{key!r} has two {what}s: {_qualname(old)} and {_qualname(fn)}")
      table[key] = fn
    return fn

  return register


def register_importer(*model_types: str) -> Callable[[Importer], Importer]:
  """Decorator: the function imports the HF checkpoint directories of these config.json model_types; it is
  called as fn(path, scan=scan) and returns (vlm model name, model kwargs, params). A model_type registered to
  another function raises ValueError."""
  return _registrar(_IMPORTERS, "importer", model_types)


def register_exporter(*model_names: str) -> Callable[[Exporter], Exporter]:
  """Decorator: the function exports the runs of these vlm model_names as HF directories (see above)."""
  return _registrar(_EXPORTERS, "exporter", model_names)


def _discover() -> None:
  """Imports every submodule of this package once (their decorators register the importers)."""
  global _discovered
  if _discovered:
    return
  _discovered = True  # before the imports: a module that looks an importer up while imported does not recurse
  try:
    package = importlib.import_module(__package__)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
      importlib.import_module(f"{__package__}.{info.name}")
  except BaseException:
    _discovered = False
    raise


def known_model_types() -> list[str]:
  """The config.json model_types that have an importer, sorted."""
  _discover()
  return sorted(_IMPORTERS)


def importer_for(model_type: str, config_file: str = "config.json") -> Importer:
  """The importer registered for `model_type`; ValueError naming the model_type, config_file (the config.json
  it comes from) and the known model_types when there is none."""
  _discover()
  fn = _IMPORTERS.get(model_type)
  if fn is None:
    raise ValueError(
      f"{config_file}: model_type {model_type!r} has no importer in vlm.convert; known: {sorted(_IMPORTERS)}"
    )
  return fn


def exporter_for(model_name: str, config_file: str = "config.json") -> Exporter:
  """The exporter registered for `model_name`; ValueError naming config_file (the run's config.json) and the
  model_names that have one when there is none."""
  _discover()
  fn = _EXPORTERS.get(model_name)
  if fn is None:
    raise ValueError(f"{config_file}: model_name={model_name!r} has no HF export; supported: {sorted(_EXPORTERS)}")
  return fn
