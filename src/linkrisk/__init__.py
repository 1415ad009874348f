"""linkrisk: measure and reduce image-to-report re-linkage risk in
vision-language embeddings of chest radiographs.

The Python API mirrors the CLI (see :mod:`linkrisk.api`):
``linkrisk.audit(...)``, ``linkrisk.embed(...)``, ``linkrisk.mitigate(...)``,
``linkrisk.report(...)``, ``linkrisk.run(...)``, ``linkrisk.demo(...)`` and
``linkrisk.describe(...)``. They are imported on first use, so
``import linkrisk`` stays cheap. ``linkrisk.audit``, ``linkrisk.mitigate``
and ``linkrisk.report`` are also the subpackages of those stages; calling
one runs the API function of the same name.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

_API_FUNCTIONS = ("audit", "demo", "describe", "embed", "mitigate", "report", "run")
_CALLABLE_SUBPACKAGES = ("audit", "mitigate", "report")


class _CallableModule(types.ModuleType):
    """A subpackage that can also be called: ``linkrisk.audit(...)`` runs :func:`linkrisk.api.audit`."""

    def __call__(self, *args, **kwargs):
        from linkrisk import api

        return getattr(api, self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


def _make_callable(module_name: str) -> None:
    """Give the subpackage ``module_name`` (already in ``sys.modules``) the callable module class."""
    sys.modules[module_name].__class__ = _CallableModule


def __getattr__(name: str):
    if name in _CALLABLE_SUBPACKAGES:
        return importlib.import_module(f"linkrisk.{name}")
    if name in _API_FUNCTIONS:
        from linkrisk import api

        return getattr(api, name)
    raise AttributeError(f"module 'linkrisk' has no attribute {name!r}")


__all__ = ["__version__", *_API_FUNCTIONS]
