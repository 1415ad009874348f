"""Run configuration files: one TOML file describes a whole run, and every CLI option maps to one of its keys.

A configuration has either a ``[demo]`` table (the end-to-end demo on the
shared COVID-19 and Open-i data) or ``[[cohorts]]`` and ``[[models]]``
tables (embed each cohort with each model, then audit, mitigate and probe).
``[run]`` contains what both kinds share (output folder, seed, bootstrap size,
device, logging). :data:`SCHEMA` lists every key with its type, default,
allowed values and help text; :func:`load_config` checks a file against it
and returns the resolved configuration (defaults filled in, relative paths
taken from the file's folder). :func:`template` writes the commented
starting file of ``linkrisk config init``.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path
from typing import Any

from linkrisk.errors import ConfigError

_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Key:
    """One configuration key.

    Attributes:
        kind: ``str``, ``path``, ``int``, ``float``, ``bool``, ``epsilon`` (a float or ``"inf"``),
            ``pool`` (an int of at least 2 or ``"full"``), ``refit_k`` (an int of at least 2 or
            ``"all"``), or a list of one of these written ``list:KIND``.
        default: the value used when the key is absent; ``_REQUIRED`` marks a key that must be given,
            ``None`` an optional key that stays unset.
        help: what the key sets and in what unit (the template's comment).
        choices: allowed values of a ``str`` key or of a list's items.
        minimum, maximum: inclusive bounds of a number (or of a list's numbers).
        cli: the CLI options that set the same value, as ``"COMMAND --option"``.
    """

    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    cli: tuple[str, ...] = ()


DIRECTIONS = ("image-to-report", "report-to-image")
LEVELS = ("study", "patient")
IMAGE_LEVELS = ("image", "study-mean")
NEGATIVES = ("random", "label-matched")
LABEL_POLICIES = ("zeros", "ones", "ignore")
TIE_RULES = ("random", "optimistic", "pessimistic")
FALLBACKS = ("none", "nearest-label")
DATASET_NAMES = ("mimic-cxr", "chexpert-plus", "openi", "covid", "manifest")
MODEL_ADAPTERS = ("clip-vit-b-32", "open-clip", "biomedclip", "hf-clip", "chexzero", "biovil", "biovil-t",
                  "reference", "precomputed")
PRECISIONS = ("fp32", "bf16", "fp16")
LOSSES = ("public-bank", "in-batch")
INITS = ("original", "public")
IMAGE_ENCODERS = ("randconv", "histdct")

ENGINES = ("local", "ray")
SEED_MAX = 2**32 - 1

SCHEMA: dict[str, dict[str, Key]] = {
    "run": {
        "out": Key("path", _REQUIRED, "Output folder: results.json, report.html, provenance.json, embeddings/.",
                   cli=("demo --out", "embed --out", "mitigate --out")),
        "cache_dir": Key("path", None, "Encoder feature cache of the demo (default: OUT/cache).",
                         cli=("demo --cache-dir",)),
        "seed": Key("int", 0, "Seed of splits, head fitting, public DP choices, bootstraps and Monte Carlo pools.",
                    minimum=0, maximum=SEED_MAX, cli=("demo --seed", "audit --seed", "mitigate --seed")),
        "n_boot": Key("int", 1000, "Patient-bootstrap resamples per interval (count).", minimum=1,
                      cli=("demo --n-boot", "audit --n-boot", "mitigate --n-boot")),
        "device": Key("str", "cpu", "Torch device of forward passes and score matmuls: cpu, cuda, cuda:1, mps.",
                      cli=("audit --device", "embed --device")),
        "allow_download": Key("bool", False, "Let Hugging Face libraries fetch missing model files (default: offline).",
                              cli=("embed --allow-download",)),
        "engine": Key("str", "local", "Where embedding and rank counting run: local (this process) or ray "
                      "(a Ray cluster; extra linkrisk[ray]).", choices=ENGINES, cli=("embed --engine", "audit --engine")),
        "address": Key("str", None, "Ray cluster with engine = ray: local (start one for the run; default), auto "
                       "(the cluster `ray start` started) or ray://HOST:PORT.",
                       cli=("embed --address", "audit --address")),
        "quiet": Key("bool", False, "Log warnings only; no progress bars.",
                     cli=("demo --quiet", "embed --quiet", "mitigate --quiet", "data describe --quiet",
                          "audit --quiet", "report --quiet", "run --quiet")),
        "log_file": Key("path", None, "Append the full log (INFO and above) to this file, created owner-only.",
                        cli=("demo --log-file", "embed --log-file", "mitigate --log-file",
                             "data describe --log-file", "audit --log-file", "report --log-file",
                             "run --log-file")),
    },
    "demo": {
        "data": Key("path", _REQUIRED, "Folder holding covid-chestxray/ and openi/.", cli=("demo --data",)),
        "image_encoder": Key("str", "randconv", "Frozen image encoder of the reference model.",
                             choices=IMAGE_ENCODERS, cli=("demo --image-encoder",)),
        "text_weights": Key("path", None, "Folder with WordLlama weights/ and tokenizers/ (default: the installed "
                            "wordllama package).", cli=("demo --text-weights",)),
        "epsilon": Key("epsilon", 0.34, "Target ε of the DP heads, per patient (or \"inf\": no DP).",
                       minimum=0.0, maximum=100.0, cli=("demo --epsilon",)),
        "delta": Key("float", None, "Target δ (default: 6e-6, or 0.1/n when smaller).", minimum=0.0, maximum=1.0,
                     cli=("demo --delta",)),
        "dp_noise_seed": Key("int", None, "Seed of DP sampling and noise; makes runs repeatable, and ε is then no "
                             "formal guarantee (default: fresh OS entropy).", minimum=0, maximum=2**62,
                             cli=("demo --dp-noise-seed",)),
        "secure_mode": Key("bool", False, "Draw DP noise from a cryptographically secure generator "
                           "(needs torchcsprng).", cli=("demo --secure-mode",)),
    },
    "cohorts": {
        "name": Key("str", _REQUIRED, "Cohort name used by [audit], [mitigation] and [probe] and in the report."),
        "dataset": Key("str", _REQUIRED, "Dataset loader.", choices=DATASET_NAMES,
                       cli=("embed --dataset", "data describe SPEC")),
        "path": Key("path", _REQUIRED, "Dataset folder (or manifest file).", cli=("embed --dataset",
                                                                                    "data describe SPEC")),
        "split": Key("str", "all", "Official split part to keep (for example test), or all."),
        "text_policy": Key("str", None, "Report sections forming the text, e.g. findings+impression or "
                           "impression,fallback=full (default: the dataset's own).",
                           cli=("embed --text-policy", "data describe --text-policy")),
        "label_policy": Key("str", "zeros", "With label-matched negatives: uncertain and blank labels as zeros, "
                            "ones (uncertain only) or ignore.", choices=LABEL_POLICIES,
                            cli=("audit --label-policy",)),
    },
    "models": {
        "name": Key("str", _REQUIRED, "Model name used in [mitigation] and in the report."),
        "adapter": Key("str", _REQUIRED, "Model adapter (see docs/models.md).", choices=MODEL_ADAPTERS,
                       cli=("embed --model",)),
        "weights": Key("str", _REQUIRED, "Local weights file or folder; hf-hub:ORG/REPO only with "
                       "run.allow_download.", cli=("embed --weights",)),
        "precision": Key("str", "fp32", "fp32, or bf16 / fp16 autocast on a GPU.", choices=PRECISIONS,
                         cli=("embed --precision",)),
        "batch_size": Key("int", 32, "Images per forward pass (count).", minimum=1, cli=("embed --batch-size",)),
        "text_batch_size": Key("int", 64, "Reports per forward pass (count).", minimum=1,
                               cli=("embed --text-batch-size",)),
        "chunk_size": Key("int", 512, "Images (and reports) per cache chunk; a killed run recomputes at most one.",
                          minimum=1, cli=("embed --chunk-size",)),
        "workers": Key("int", 2, "DataLoader worker processes decoding images (0: main process).", minimum=0,
                       cli=("embed --workers",)),
        "fast_decode": Key("bool", False, "Decode JPEGs at reduced scale (faster; pixels differ slightly).",
                           cli=("embed --fast-decode",)),
        "actors": Key("int", 0, "With run.engine = ray: encoder actors (count; 0: one per GPU, or half the "
                      "cluster's CPUs without GPUs).", minimum=0, cli=("embed --actors",)),
    },
    "audit": {
        "cohorts": Key("list:str", None, "Cohorts to audit with every model (default: all)."),
        "pools": Key("list:pool", [10, 100, 1000, "full"], "Candidate pool sizes N; \"full\" is the whole set.",
                     cli=("audit --pools",)),
        "ks": Key("list:int", [1, 5, 10], "Recall cut-offs K.", minimum=1, cli=("audit --ks",)),
        "directions": Key("list:str", ["image-to-report"], "Query directions.", choices=DIRECTIONS,
                          cli=("audit --direction",)),
        "levels": Key("list:str", ["study"], "Hit levels: study (own study only) or patient (any study of the "
                      "patient; pools of patients).", choices=LEVELS, cli=("audit --level",)),
        "image_levels": Key("list:str", ["image"], "Image side: each image, or the mean embedding of a study.",
                            choices=IMAGE_LEVELS, cli=("audit --image-level",)),
        "negatives": Key("list:str", ["random", "label-matched"], "Pool negatives: uniform, or with the true "
                         "report's label vector (cohorts without labels get random only).", choices=NEGATIVES,
                         cli=("audit --negatives",)),
        "ties": Key("str", "random", "Tie rule of reported values.", choices=TIE_RULES, cli=("audit --ties",)),
        "fallback": Key("str", "none", "With label-matched: cap small groups (none) or fill pools by label "
                        "distance.", choices=FALLBACKS, cli=("audit --fallback",)),
        "merge_identical": Key("bool", False, "Merge identical report texts into one candidate.",
                               cli=("audit --merge-identical",)),
        "monte_carlo": Key("int", 0, "Explicit pools sampled per query and pool size beside the closed form "
                           "(count; 0: off).", minimum=0, cli=("audit --monte-carlo",)),
        "permutations": Key("int", 999, "Patient permutations of the test of no linkage, per audit with random "
                            "negatives (count; 0: off).", minimum=0, cli=("audit --permutations",)),
        "match": Key("list:str", [], "Attributes of attribute-matched pools and of the attribute oracle in the main "
                     "audit: images.parquet or reports.parquet columns, or labels (empty: the oracle uses view, sex, "
                     "age_band and labels where present).", cli=("audit --match",)),
        "split_audit": Key("bool", False, "Also fit fresh heads on a patient-disjoint and a source-disjoint split "
                           "of each audited cohort (source-disjoint where images.parquet has a source column) and "
                           "audit the held-out part."),
        "precision": Key("str", "fp32", "Score matmul precision: fp32, or bf16 / fp16 with near-ties re-scored in "
                         "float64 (same counts as exact scores).", choices=PRECISIONS, cli=("audit --precision",)),
        "block_size": Key("int", None, "Queries scored per matmul (count; default: from 128 MiB on CPU or half the "
                          "free GPU memory).", minimum=1, cli=("audit --block-size",)),
    },
    "mitigation": {
        "model": Key("str", None, "Model whose heads are retrained (default: the first model)."),
        "train": Key("str", _REQUIRED, "Private training cohort.", cli=("mitigate --train",)),
        "public": Key("str", _REQUIRED, "Cohort treated as public: negative bank, and start with init = public.",
                      cli=("mitigate --public",)),
        "targets": Key("list:str", [], "Other cohorts audited and probed with each set of heads.",
                       cli=("mitigate --target",)),
        "holdout": Key("float", 0.0, "Fraction of training patients kept out and audited as held-out patients.",
                       minimum=0.0, maximum=0.9, cli=("mitigate --holdout",)),
        "epsilons": Key("list:epsilon", [0.1, 0.34, 1.0, 3.0, 10.0, "inf"], "Target ε values; \"inf\" trains "
                        "without DP.", minimum=0.0, maximum=100.0, cli=("mitigate --epsilons",)),
        "delta": Key("float", None, "Target δ (default: 6e-6, or 0.1/n when smaller).", minimum=0.0, maximum=1.0,
                     cli=("mitigate --delta",)),
        "loss": Key("str", "public-bank", "public-bank (sound for DP) or in-batch (ε then no formal guarantee).",
                    choices=LOSSES, cli=("mitigate --loss",)),
        "init": Key("str", "original", "Start from the model's heads (original) or fresh heads from public "
                    "features (public).", choices=INITS, cli=("mitigate --init",)),
        "epochs": Key("int", 20, "Passes over the training patients (count).", minimum=1, cli=("mitigate --epochs",)),
        "batch_size": Key("int", 64, "Expected patients per step (sampling rate = batch size / patients).",
                          minimum=1, cli=("mitigate --batch-size",)),
        "sample_rate": Key("float", None, "Poisson sampling rate per step; overrides batch_size.", minimum=0.0,
                           maximum=1.0, cli=("mitigate --sample-rate",)),
        "max_grad_norm": Key("float", 1.0, "Per-patient gradient clipping norm C.", minimum=0.0,
                             cli=("mitigate --max-grad-norm",)),
        "lr": Key("float", 0.05, "SGD learning rate (momentum 0.9).", minimum=0.0, cli=("mitigate --lr",)),
        "dp_noise_seed": Key("int", None, "Seed of DP sampling and noise; makes runs repeatable, and ε is then no "
                             "formal guarantee.", minimum=0, maximum=2**62, cli=("mitigate --dp-noise-seed",)),
        "secure_mode": Key("bool", False, "Cryptographically secure noise (needs torchcsprng).",
                           cli=("mitigate --secure-mode",)),
        "refit_aux": Key("str", None, "Cohort of the attacker's auxiliary pairs for the refit attack.",
                         cli=("mitigate --refit-aux",)),
        "refit_ks": Key("list:refit_k", [50, 200, "all"], "Auxiliary pair counts k of the refit attacker.",
                        cli=("mitigate --refit-ks",)),
    },
    "probe": {
        "cohorts": Key("list:str", [], "Cohorts probed with every model's original heads, each split "
                       "patient-disjointly into probe training and test patients."),
        "test_fraction": Key("float", 0.5, "Share of a cohort's patients in the probe's test split.",
                             minimum=0.0, maximum=1.0),
    },
}

# Sections written as arrays of tables (``[[cohorts]]``); the others are plain tables.
TABLE_ARRAYS = ("cohorts", "models")

# CLI options that set no configuration key, with the reason.
NOT_CONFIG_KEYS = {
    "audit EMBEDDINGS": "a config run audits the folders it embeds itself",
    "audit --json": "a config run writes results.json",
    "data describe --json": "a config run writes each cohort's summary into results.json",
    "report RUN_DIR": "the report command reads a finished run's folder",
    "report --out": "the report command's own output path",
    "run CONFIG": "the configuration file itself",
    "config check CONFIG": "the configuration file itself",
    "config init --out": "where the template is written",
    "config init --demo": "which template is written",
    "config init --force": "overwriting an existing template",
}


def _type_error(where: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{where}: invalid value {value!r}; expected {expected}")


def _check_number(where: str, value: Any, key: Key, integer: bool) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise _type_error(where, value, "an integer" if integer else "a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise _type_error(where, value, "a finite number")
    if key.minimum is not None and value < key.minimum:
        raise ConfigError(f"{where}: {value} is below the minimum {key.minimum:g}")
    if key.maximum is not None and value > key.maximum:
        raise ConfigError(f"{where}: {value} is above the maximum {key.maximum:g}")
    return value if integer else float(value)


def _check_item(where: str, value: Any, kind: str, key: Key, base: Path) -> Any:
    """Check one scalar value of ``kind``; return it normalised (paths resolved, epsilons as floats)."""
    if kind in ("str", "path"):
        if not isinstance(value, str) or not value.strip():
            raise _type_error(where, value, "a non-empty string")
        if key.choices and value not in key.choices:
            raise ConfigError(f"{where}: invalid value {value!r}; allowed values: {', '.join(key.choices)}")
        if kind == "path":
            path = Path(value).expanduser()
            return str(path if path.is_absolute() else (base / path).resolve())
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise _type_error(where, value, "true or false")
        return value
    if kind in ("int", "float"):
        return _check_number(where, value, key, integer=kind == "int")
    if kind == "epsilon":
        if value == "inf":
            return "inf"
        number = _check_number(where, value, key, integer=False)
        if number <= 0:
            raise ConfigError(f"{where}: ε must be positive, got {value}")
        return number
    if kind == "pool":
        if value == "full" or (isinstance(value, int) and not isinstance(value, bool) and value >= 2):
            return value
        raise _type_error(where, value, "an integer of at least 2 or \"full\"")
    if kind == "refit_k":
        if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value >= 2):
            return value
        raise _type_error(where, value, "an integer of at least 2 or \"all\"")
    raise AssertionError(f"unknown key kind {kind}")


def _check_value(where: str, value: Any, key: Key, base: Path) -> Any:
    if not key.kind.startswith("list:"):
        return _check_item(where, value, key.kind, key, base)
    if not isinstance(value, list):
        raise _type_error(where, value, "a list, for example [1, 5, 10]")
    kind = key.kind.removeprefix("list:")
    return [_check_item(f"{where}[{i}]", item, kind, key, base) for i, item in enumerate(value)]


def _resolve_table(where: str, table: Any, keys: dict[str, Key], base: Path) -> dict[str, Any]:
    """Check one table against ``keys``; return it with defaults filled in."""
    if not isinstance(table, dict):
        raise _type_error(where, table, "a table")
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(keys)}")
    resolved = {}
    for name, key in keys.items():
        if name in table:
            resolved[name] = _check_value(f"{where}.{name}", table[name], key, base)
        elif key.default is _REQUIRED:
            raise ConfigError(f"{where}: missing key {name!r} ({key.help})")
        else:
            resolved[name] = key.default
    return resolved


def resolve(raw: dict[str, Any], base: Path = Path(".")) -> dict[str, Any]:
    """Check a parsed configuration and return it resolved: defaults filled in, paths absolute from ``base``.

    Raises:
        ConfigError: an unknown section or key, a missing required key, a value of the wrong type or
            outside its allowed values, a reference to an undefined cohort or model, or a file that
            mixes ``[demo]`` with ``[[cohorts]]`` / ``[[models]]``.
    """
    unknown = sorted(set(raw) - set(SCHEMA))
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}]; valid sections: {', '.join(SCHEMA)}")
    config: dict[str, Any] = {"run": _resolve_table("run", raw.get("run", {}), SCHEMA["run"], base)}

    if "demo" in raw:
        if any(name in raw for name in ("cohorts", "models", "audit", "mitigation", "probe")):
            raise ConfigError("[demo] runs its own cohorts, model, audits, mitigation and probes; remove "
                              "[[cohorts]], [[models]], [audit], [mitigation] and [probe], or remove [demo]")
        config["demo"] = _resolve_table("demo", raw["demo"], SCHEMA["demo"], base)
        return config

    for section in TABLE_ARRAYS:
        tables = raw.get(section)
        if not isinstance(tables, list) or not tables:
            raise ConfigError(f"no [[{section}]] table; a run needs at least one (or a [demo] table instead)")
        config[section] = [_resolve_table(f"{section}[{i}]", table, SCHEMA[section], base)
                           for i, table in enumerate(tables)]
        names = [table["name"] for table in config[section]]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(f"[[{section}]] name {duplicates[0]!r} is used twice; give each a distinct name")

    config["audit"] = _resolve_table("audit", raw.get("audit", {}), SCHEMA["audit"], base)
    config["probe"] = _resolve_table("probe", raw.get("probe", {}), SCHEMA["probe"], base)
    if "mitigation" in raw:
        config["mitigation"] = _resolve_table("mitigation", raw["mitigation"], SCHEMA["mitigation"], base)
    _check_references(config)
    if config["run"]["engine"] == "local" and config["run"]["address"] not in (None, "", "local"):
        raise ConfigError(f"run.address is {config['run']['address']!r} but run.engine is \"local\"; set "
                          "run.engine = \"ray\" to use a Ray cluster, or remove run.address")
    return config


def _check_references(config: dict[str, Any]) -> None:
    """Check that every cohort and model named elsewhere is defined."""
    cohorts = [table["name"] for table in config["cohorts"]]
    models = [table["name"] for table in config["models"]]

    def check(where: str, name: str | None, valid: list[str], kind: str) -> None:
        if name is not None and name not in valid:
            raise ConfigError(f"{where}: unknown {kind} {name!r}; defined {kind}s: {', '.join(valid)}")

    if config["audit"]["cohorts"] is None:
        config["audit"]["cohorts"] = list(cohorts)
    for i, name in enumerate(config["audit"]["cohorts"]):
        check(f"audit.cohorts[{i}]", name, cohorts, "cohort")
    for i, name in enumerate(config["probe"]["cohorts"]):
        check(f"probe.cohorts[{i}]", name, cohorts, "cohort")
    mitigation = config.get("mitigation")
    if mitigation:
        if mitigation["model"] is None:
            mitigation["model"] = models[0]
        check("mitigation.model", mitigation["model"], models, "model")
        for field in ("train", "public", "refit_aux"):
            check(f"mitigation.{field}", mitigation[field], cohorts, "cohort")
        for i, name in enumerate(mitigation["targets"]):
            check(f"mitigation.targets[{i}]", name, cohorts, "cohort")
        if mitigation["train"] == mitigation["public"]:
            raise ConfigError("mitigation.public names the training cohort; the public cohort must hold other "
                              "patients")


def load_config(path: str | Path) -> dict[str, Any]:
    """Read and check a TOML configuration file; return the resolved configuration (see :func:`resolve`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: configuration file not found; write one with: linkrisk config init") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML ({err})") from err
    try:
        return resolve(raw, path.resolve().parent)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def epsilon_value(value: float | str) -> float:
    """Return a resolved ε (a float or ``"inf"``) as a float."""
    return math.inf if value == "inf" else float(value)


def cli_option_keys() -> dict[str, str]:
    """Map each ``"COMMAND --option"`` to the configuration key (``section.key``) that sets the same value."""
    mapping = {}
    for section, keys in SCHEMA.items():
        for name, key in keys.items():
            for option in key.cli:
                mapping.setdefault(option, f"{section}.{name}")
    return mapping


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return repr(value)


def _template_table(header: str, keys: dict[str, Key], values: dict[str, Any]) -> list[str]:
    lines = [header]
    for name, key in keys.items():
        comment = key.help + (f" Allowed: {', '.join(key.choices)}." if key.choices else "")
        lines.append(f"# {comment}")
        value = values.get(name, key.default)
        if value is _REQUIRED or value is None:
            lines.append(f"# {name} = ...")
        else:
            lines.append(f"{name} = {_toml_value(value)}")
    return lines + [""]


def template(demo: bool = False, data_dir: str = "../shared/data") -> str:
    """Return the commented starting configuration of ``linkrisk config init``.

    With ``demo``, the file reproduces the end-to-end demo with a fixed DP
    noise seed, so that two runs write identical ``results.json`` files
    apart from their timing fields. Otherwise it audits Open-i with
    CheXzero weights from a local file as an example to edit.
    """
    lines = ["# linkrisk run configuration (TOML). Run with: linkrisk run THIS_FILE",
             "# Relative paths are read from this file's folder. Every key is listed with its default;",
             "# a commented-out key stays unset.", ""]
    if demo:
        lines += _template_table("[run]", SCHEMA["run"], {"out": "runs/demo-config"})
        lines += _template_table("[demo]", SCHEMA["demo"], {"data": data_dir, "dp_noise_seed": 0})
        return "\n".join(lines)
    lines += _template_table("[run]", SCHEMA["run"], {"out": "runs/audit"})
    lines += _template_table("[[cohorts]]", SCHEMA["cohorts"],
                             {"name": "openi", "dataset": "openi", "path": f"{data_dir}/openi"})
    lines += _template_table("[[cohorts]]", SCHEMA["cohorts"],
                             {"name": "covid", "dataset": "covid", "path": f"{data_dir}/covid-chestxray"})
    lines += _template_table("[[models]]", SCHEMA["models"],
                             {"name": "chexzero", "adapter": "chexzero", "weights": "models/chexzero.pt"})
    lines += _template_table("[audit]", SCHEMA["audit"], {})
    lines += ["# Optional: retrain the heads with DP and audit them again (remove the table to skip)."]
    lines += _template_table("[mitigation]", SCHEMA["mitigation"],
                             {"train": "covid", "public": "openi", "holdout": 0.25})
    lines += _template_table("[probe]", SCHEMA["probe"], {"cohorts": ["openi"]})
    return "\n".join(lines)




def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


def _bounds(key: Key) -> str:
    if key.minimum is not None and key.maximum is not None:
        return f"{_number(key.minimum)} to {_number(key.maximum)}"
    if key.minimum is not None:
        return f"≥ {_number(key.minimum)}"
    return f"≤ {_number(key.maximum)}" if key.maximum is not None else ""


def reference_markdown() -> str:
    """Return the key reference of docs/config.md: one table per section (a test keeps the file equal to it)."""
    lines = ["# Configuration keys", "",
             "Generated from `linkrisk.config.SCHEMA`; `linkrisk config init` writes the same keys with comments.",
             "A configuration has `[run]` and either `[demo]` or `[[cohorts]]` plus `[[models]]` (with optional",
             "`[audit]`, `[mitigation]` and `[probe]`). Relative paths are read from the file's folder.", ""]
    for section, keys in SCHEMA.items():
        header = f"[[{section}]]" if section in TABLE_ARRAYS else f"[{section}]"
        lines += [f"## `{header}`", "", "| key | type | default | allowed | CLI option | meaning |",
                  "|---|---|---|---|---|---|"]
        for name, key in keys.items():
            if key.default is _REQUIRED:
                default = "required"
            elif key.default is None:
                default = "unset"
            else:
                default = f"`{_toml_value(key.default)}`"
            allowed = ", ".join(key.choices) if key.choices else _bounds(key)
            options = ", ".join(f"`{option}`" for option in key.cli)
            lines.append(f"| `{name}` | {key.kind} | {default} | {allowed} | {options} | {key.help} |")
        lines.append("")
    return "\n".join(lines)


__all__ = ["Key", "NOT_CONFIG_KEYS", "SCHEMA", "cli_option_keys", "epsilon_value", "load_config",
           "reference_markdown", "resolve", "template"]
