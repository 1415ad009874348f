"""Dataset specs ``NAME:PATH`` and the registry of loaders behind them."""

from __future__ import annotations

import importlib
from pathlib import Path

from linkrisk.data.cohort import PairedCohort
from linkrisk.data.sections import TextPolicy
from linkrisk.errors import ConfigError

# name -> (module, loader function, takes a text policy)
DATASETS: dict[str, tuple[str, str, bool]] = {
    "mimic-cxr": ("linkrisk.data.mimic", "load_mimic_cxr", True),
    "chexpert-plus": ("linkrisk.data.chexpert_plus", "load_chexpert_plus", True),
    "openi": ("linkrisk.data.openi", "load_openi", True),
    "covid": ("linkrisk.data.covid", "load_covid", False),
    "manifest": ("linkrisk.data.manifest", "load_manifest", False),
}


def parse_spec(spec: str) -> tuple[str, Path]:
    """Split ``NAME:PATH`` into the dataset name and its path."""
    name, sep, path = spec.partition(":")
    name = name.strip().lower()
    if not sep or not path.strip():
        raise ConfigError(f"invalid dataset {spec!r}; write NAME:PATH with NAME one of {', '.join(DATASETS)}")
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r} in {spec!r}; valid names: {', '.join(DATASETS)}")
    return name, Path(path.strip()).expanduser()


def load_dataset(spec: str, text_policy: TextPolicy | None = None) -> PairedCohort:
    """Load the dataset a ``NAME:PATH`` spec names, with its publisher's layout detected."""
    name, path = parse_spec(spec)
    module, function, takes_policy = DATASETS[name]
    loader = getattr(importlib.import_module(module), function)
    if text_policy is not None and not takes_policy:
        raise ConfigError(f"dataset {name} has no report sections, so a text policy does not apply")
    if text_policy is not None:
        return loader(path, text_policy=text_policy)
    return loader(path)
