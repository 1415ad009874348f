"""Provenance of a run: package versions, machine, input fingerprints, weight hashes and seeds.

Everything here is the same when the same inputs are run again on the
same machine. Two ``results.json`` files of such runs differ only in the
fields named in :data:`TIMING_FIELDS` (:func:`strip_timing` removes them),
provided DP noise is seeded.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

# Packages whose versions can change a figure; a missing optional one is recorded as null.
PACKAGES = ("linkrisk", "torch", "torchvision", "numpy", "scipy", "scikit-learn", "pandas", "pyarrow", "opacus",
            "prv-accountant", "open_clip_torch", "timm", "transformers", "safetensors", "hi-ml-multimodal",
            "wordllama", "pillow", "pydicom", "matplotlib", "jinja2", "typer", "rich")

# Fields of results.json, at any depth, that differ between two otherwise identical runs: start and end
# times (ISO 8601), and wall times in seconds (the whole run, and each refit attacker's fit).
TIMING_FIELDS = ("started", "finished", "seconds", "fit_seconds")


def package_versions() -> dict[str, str | None]:
    """Return the installed version of each package in :data:`PACKAGES` (None when not installed)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_summary() -> dict[str, Any]:
    """Return the machine's OS, Python, CPU count, memory, torch threads and GPUs."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "memory_bytes": _memory_bytes(), "torch_threads": torch.get_num_threads(),
            "cuda_devices": gpus}


def provenance(config: dict[str, Any], inputs: dict[str, Any], models: dict[str, Any]) -> dict[str, Any]:
    """Collect the provenance record written into ``results.json`` and ``provenance.json``.

    Args:
        config: the resolved configuration (:func:`linkrisk.config.load_config`).
        inputs: per cohort, its row counts and content fingerprint (``PairedCohort.fingerprint``).
        models: per model, its adapter, weights path and weights SHA-256.
    """
    seeds = {"seed": config["run"]["seed"]}
    for section in ("demo", "mitigation"):
        if config.get(section):
            seeds[f"{section}.dp_noise_seed"] = config[section].get("dp_noise_seed")
    return {"packages": package_versions(), "machine": machine_summary(), "inputs": inputs, "models": models,
            "seeds": seeds}


def strip_timing(results: Any) -> Any:
    """Return a copy of ``results`` without the timing fields (:data:`TIMING_FIELDS`) at any depth."""
    if isinstance(results, dict):
        return {key: strip_timing(value) for key, value in results.items() if key not in TIMING_FIELDS}
    if isinstance(results, list):
        return [strip_timing(value) for value in results]
    return results


__all__ = ["PACKAGES", "TIMING_FIELDS", "machine_summary", "package_versions", "provenance", "strip_timing"]
