"""Python API mirroring the CLI: one function per command, with the same option names.

Reach them from the package: ``linkrisk.audit(...)``, ``linkrisk.embed(...)``,
``linkrisk.mitigate(...)``, ``linkrisk.report(...)``, ``linkrisk.run(...)``,
``linkrisk.demo(...)`` and ``linkrisk.describe(...)``. Option values are
the CLI's, as Python values: lists in place of comma-separated strings,
``float("inf")`` or ``"inf"`` for an unbounded ε, hyphens or underscores in
choice values. Errors are :class:`~linkrisk.errors.ConfigError` (an option
value) or :class:`~linkrisk.errors.InputError` (an input file or record);
nothing is printed, and logging goes to the ``linkrisk`` logger.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from linkrisk.errors import ConfigError


def normalise_choice(value: str, valid: Sequence[str], option: str) -> str:
    """Accept hyphens or underscores; return the underscore spelling, or raise ConfigError naming the valid values."""
    normal = str(value).strip().lower().replace("-", "_")
    if normal not in valid:
        raise ConfigError(f"invalid {option} {value!r}; valid values: {', '.join(v.replace('_', '-') for v in valid)}")
    return normal


def audit(embeddings: str | Path, pools: Sequence[int | str] = (10, 100, 1000, "full"), ks: Sequence[int] = (1, 5, 10),
          direction: str = "image-to-report", level: str = "study", image_level: str = "image",
          merge_identical: bool = False, ties: str = "random", negatives: str = "random",
          label_policy: str = "zeros", fallback: str = "none", monte_carlo: int = 0, permutations: int = 0,
          match: Sequence[str] | None = None, n_boot: int = 1000, seed: int = 0,
          device: str = "cpu", precision: str = "fp32", block_size: int | None = None, engine: str = "local",
          address: str | None = None) -> dict[str, Any]:
    """Audit saved embeddings, as ``linkrisk audit``: Recall@K with lift and patient-bootstrap intervals.

    Args:
        embeddings: folder with ``image.npy``, ``report.npy`` and ``pairs.parquet`` (and
            ``reports.parquet`` for labels), or ``"manifest:PATH"``.
        pools: candidate pool sizes N (integers >= 2) or ``"full"``.
        ks: Recall cut-offs K.
        match: attribute names for attribute-matched pools and the attribute oracle (columns of
            ``images.parquet`` or ``reports.parquet``, or ``"labels"``); None or empty: off.
        precision: score matmul precision, ``fp32`` or ``bf16`` / ``fp16`` with near-ties re-scored
            in float64.
        engine, address: ``local``, or ``ray`` with a cluster address (``local``/None starts one for
            this call, ``auto`` joins ``ray start``'s, ``ray://HOST:PORT``); a cluster this process
            already joined with ``ray.init`` is used as it is.
        The other options are those of ``linkrisk audit --help``.

    Returns:
        One audit entry as described in docs/results-schema.md (``runs[]``).
    """
    from linkrisk._ray import ENGINES, check_engine
    from linkrisk.audit.distributed import counting_engine
    from linkrisk.audit.ranks import PRECISIONS

    if not isinstance(monte_carlo, int) or isinstance(monte_carlo, bool) or monte_carlo < 0:
        raise ConfigError(f"invalid monte_carlo {monte_carlo!r}; use 0 (off) or a positive number of pools")
    if not isinstance(permutations, int) or isinstance(permutations, bool) or permutations < 0:
        raise ConfigError(f"invalid permutations {permutations!r}; use 0 (off) or a positive number of permutations")
    if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < 1:
        raise ConfigError(f"invalid n_boot {n_boot!r}; use a positive number of resamples")
    if isinstance(match, str) or (match is not None and not all(isinstance(c, str) and c.strip() for c in match)):
        raise ConfigError(f"invalid match {match!r}; use a list of attribute column names, for example ['view', 'sex']")
    if block_size is not None and (not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1):
        raise ConfigError(f"invalid block_size {block_size!r}; use None (automatic) or a positive number of queries")
    fallback_choice = normalise_choice(fallback, ("none", "nearest_label"), "fallback")
    engine = normalise_choice(engine, ENGINES, "engine")
    check_engine(engine, address)
    with counting_engine(engine, address) as counting:
        return _audit_folder(embeddings, pools, ks, direction, level, image_level, merge_identical, ties, negatives,
                             label_policy, fallback_choice, monte_carlo, permutations, match, n_boot, seed, device,
                             normalise_choice(precision, PRECISIONS, "precision"), block_size, counting)


def _audit_folder(embeddings, pools, ks, direction, level, image_level, merge_identical, ties, negatives, label_policy,
                  fallback_choice, monte_carlo, permutations, match, n_boot, seed, device, precision, block_size,
                  engine) -> dict[str, Any]:
    from linkrisk.audit.design import DIRECTIONS, IMAGE_LEVELS, LEVELS
    from linkrisk.audit.embeddings import audit_folder
    from linkrisk.audit.negatives import LABEL_POLICIES
    from linkrisk.audit.recall import TIE_RULES
    from linkrisk.audit.run import NEGATIVES

    return audit_folder(
        str(embeddings) if str(embeddings).startswith("manifest:") else Path(embeddings), list(pools), list(ks),
        n_boot=n_boot, seed=seed, negatives=normalise_choice(negatives, NEGATIVES, "negatives"),
        label_policy=normalise_choice(label_policy, LABEL_POLICIES, "label_policy"),
        direction=normalise_choice(direction, DIRECTIONS, "direction"), level=normalise_choice(level, LEVELS, "level"),
        image_level=normalise_choice(image_level, IMAGE_LEVELS, "image_level"), merge_identical=merge_identical,
        ties=normalise_choice(ties, TIE_RULES, "ties"), fallback=None if fallback_choice == "none" else fallback_choice,
        monte_carlo_pools=monte_carlo, permutations=permutations,
        match=[column.strip() for column in match] if match else None, device=device, precision=precision,
        block_size=block_size, engine=engine)


def embed(model: str, weights: str | Path, dataset: str, out: str | Path, text_policy: str | None = None,
          device: str = "cpu", precision: str = "fp32", batch_size: int = 32, text_batch_size: int = 64,
          chunk_size: int = 512, workers: int = 2, fast_decode: bool = False, allow_download: bool = False,
          progress: bool = False, engine: str = "local", address: str | None = None,
          actors: int = 0) -> dict[str, Any]:
    """Embed a dataset with a model's frozen towers, as ``linkrisk embed``; return the ``embed.json`` summary.

    ``dataset`` is ``NAME:PATH`` (for example ``"openi:data/openi"``). Without ``allow_download``
    the Hugging Face libraries are set offline for this process (``HF_HUB_OFFLINE=1``), and in the
    Ray engine's workers. ``engine="ray"`` decodes in Ray tasks and encodes in Ray Data actor pools
    (``address`` and ``actors`` as in ``linkrisk embed --help``); the outputs and cache are the same.
    """
    from linkrisk.data.registry import load_dataset
    from linkrisk.data.sections import TextPolicy
    from linkrisk.models.adapters import load_adapter
    from linkrisk.models.embed import EmbedConfig, embed_cohort, hash_weights

    if not allow_download:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
    config = EmbedConfig(batch_size=batch_size, text_batch_size=text_batch_size, chunk_size=chunk_size,
                         workers=workers, device=device, precision=precision, fast_decode=fast_decode,
                         progress=progress, engine=engine, address=address, actors=actors).validate()
    cohort = load_dataset(dataset, TextPolicy.parse(text_policy) if text_policy else None)
    adapter = load_adapter(model, weights, allow_download=allow_download)
    weights_path = getattr(adapter, "weights_path", weights)
    return embed_cohort(adapter, cohort, Path(out), config,
                        {"model": model, "weights": str(weights), "weights_sha256": hash_weights(weights_path)})


def _epsilon(value: float | str) -> float:
    if isinstance(value, str) and value.strip().lower() in ("inf", "infinity"):
        return math.inf
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not number > 0:
        raise ConfigError(f"invalid epsilon {value!r}; use positive numbers or inf")
    return number


def mitigate(train: str | Path, public: str | Path, out: str | Path, target: Sequence[str | Path] = (),
             epsilons: Sequence[float | str] = (0.1, 0.34, 1.0, 3.0, 10.0, "inf"), delta: float | None = None,
             loss: str = "public-bank", init: str = "original", epochs: int = 20, batch_size: int = 64,
             sample_rate: float | None = None, max_grad_norm: float = 1.0, lr: float = 0.05, holdout: float = 0.0,
             refit_aux: str | Path | None = None, refit_ks: Sequence[int | str] = (50, 200, "all"),
             n_boot: int = 1000, seed: int = 0, dp_noise_seed: int | None = None, secure_mode: bool = False,
             progress: bool = False) -> dict[str, Any]:
    """Train DP heads at several ε and audit, probe and attack each, as ``linkrisk mitigate``.

    ``train``, ``public``, each ``target`` and ``refit_aux`` are folders written by
    :func:`embed`. Writes ``OUT/mitigate.json``, ``OUT/report.html`` and ``OUT/heads/``;
    returns the ``mitigate.json`` content.
    """
    import dataclasses

    from linkrisk.mitigate import DPConfig
    from linkrisk.mitigate.dp import INITS
    from linkrisk.mitigate.losses import LOSSES
    from linkrisk.mitigate.run import run_mitigation

    config = DPConfig(delta=delta, epochs=epochs, batch_size=batch_size, sample_rate=sample_rate,
                      max_grad_norm=max_grad_norm, lr=lr, loss=normalise_choice(loss, LOSSES, "loss"),
                      init=normalise_choice(init, INITS, "init"), noise_seed=dp_noise_seed, secure_mode=secure_mode, seed=seed)
    parsed = [_epsilon(value) for value in epsilons]
    for value in parsed:
        dataclasses.replace(config, epsilon=value).validate()
    for k in refit_ks:
        if k != "all" and not (isinstance(k, int) and not isinstance(k, bool) and k >= 2):
            raise ConfigError(f"invalid refit k {k!r}; use integers >= 2 or 'all'")
    return run_mitigation(Path(train), Path(public), [Path(t) for t in target], Path(out), parsed, config,
                          refit_aux=Path(refit_aux) if refit_aux else None, refit_ks=list(refit_ks),
                          holdout=holdout, n_boot=n_boot, seed=seed, progress=progress)


def describe(spec: str, text_policy: str | None = None) -> dict[str, Any]:
    """Load a dataset given as ``NAME:PATH`` and return its summary, as ``linkrisk data describe``."""
    from linkrisk.data.registry import load_dataset
    from linkrisk.data.sections import TextPolicy

    return load_dataset(spec, TextPolicy.parse(text_policy) if text_policy else None).describe()


def run(config: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Run a configuration, as ``linkrisk run``: a TOML file path, or a dict laid out like one.

    A dict is checked as a file would be (relative paths are taken from the current folder).
    Returns the results written to ``results.json``.
    """
    from linkrisk.config import load_config, resolve
    from linkrisk.runner import check_output_folder, run_config

    if isinstance(config, dict):
        resolved, text = resolve(config, Path.cwd()), None
    else:
        resolved, text = load_config(config), Path(config).read_text(encoding="utf-8")
    check_output_folder(Path(resolved["run"]["out"]))
    if not resolved["run"]["allow_download"]:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
    return run_config(resolved, text)


def demo(data: str | Path, out: str | Path = "runs/demo", **options: Any) -> dict[str, Any]:
    """Run the end-to-end demo on the shared data, as ``linkrisk demo``; return the results dict.

    ``options`` are the other keys of a configuration's ``[demo]`` and ``[run]`` tables
    (for example ``epsilon=1.0``, ``seed=3``, ``n_boot=200``, ``dp_noise_seed=0``).
    """
    from linkrisk.config import SCHEMA

    raw: dict[str, dict[str, Any]] = {"run": {"out": str(out)}, "demo": {"data": str(data)}}
    for key, value in options.items():
        if key in SCHEMA["demo"]:
            section = "demo"
        elif key in SCHEMA["run"]:
            section = "run"
        else:
            raise ConfigError(f"unknown demo option {key!r}; valid options: "
                              f"{', '.join([*SCHEMA['demo'], *SCHEMA['run']])}")
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, float) and math.isinf(value):
            value = "inf"
        raw[section][key] = value
    return run(raw)


def report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Rebuild ``report.html`` from ``RUN_DIR/results.json`` alone, as ``linkrisk report``; return its path."""
    from linkrisk.report import rebuild_report

    return rebuild_report(Path(run_dir), Path(out) if out else None)


__all__ = ["audit", "demo", "describe", "embed", "mitigate", "report", "run"]
