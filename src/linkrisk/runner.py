"""Run everything a configuration file describes and write one output folder.

Stages of a cohorts-and-models run, each logged when it starts and ends:

1. load each ``[[cohorts]]`` entry (official split part when given);
2. embed every cohort each model needs (resumable cache per output folder);
3. audit each model on each ``audit.cohorts`` entry, for every direction,
   level, image level and kind of negatives asked for;
4. with ``[mitigation]``, run the ε sweep and the refit attacker for one model;
5. probe each model's original heads on each ``probe.cohorts`` entry;
6. write ``results.json``, ``provenance.json``, ``config.json`` (resolved),
   ``config.toml`` (the file as given) and ``report.html``.

A ``[demo]`` configuration runs :func:`linkrisk.pipeline.run_demo` instead,
with the same provenance files. Folders written by earlier runs are reused:
embedding chunks and sweep points resume where a killed run stopped.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import time
from pathlib import Path
from typing import Any

import pandas as pd

from linkrisk import __version__
from linkrisk._io import make_private_dirs, write_json, write_text
from linkrisk._logging import logger, stage
from linkrisk.audit.verdict import verdict_line
from linkrisk.config import epsilon_value
from linkrisk.errors import ConfigError
from linkrisk.provenance import provenance

SCHEMA_VERSION = "1.0"


def run_config(config: dict[str, Any], config_text: str | None = None) -> dict[str, Any]:
    """Run a resolved configuration (:func:`linkrisk.config.load_config`); return the results dict.

    ``config_text`` is the configuration file as written; it is copied to ``OUT/config.toml``.
    """
    out = Path(config["run"]["out"])
    make_private_dirs(out)
    write_json(out / "config.json", config)
    if config_text is not None:
        write_text(out / "config.toml", config_text)
    if "demo" in config:
        return _run_demo(config)
    return _run_cohorts_and_models(config)


def _timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _run_demo(config: dict[str, Any]) -> dict[str, Any]:
    from linkrisk.mitigate import DPConfig
    from linkrisk.pipeline import DemoConfig, run_demo
    from linkrisk.report import write_report

    run, demo = config["run"], config["demo"]
    clock = time.perf_counter()
    demo_config = DemoConfig(
        data_dir=Path(demo["data"]), out_dir=Path(run["out"]),
        cache_dir=Path(run["cache_dir"]) if run["cache_dir"] else None, image_encoder=demo["image_encoder"],
        text_weights=Path(demo["text_weights"]) if demo["text_weights"] else None, seed=run["seed"],
        n_boot=run["n_boot"], progress=not run["quiet"],
        dp=DPConfig(epsilon=epsilon_value(demo["epsilon"]), delta=demo["delta"], noise_seed=demo["dp_noise_seed"],
                    secure_mode=demo["secure_mode"]))
    results = run_demo(demo_config, extra={"run_config": config})

    inputs = {name: {"images": entry["images"], "reports": entry["reports"], "fingerprint": entry["fingerprint"]}
              for name, entry in results["cohorts"].items() if "fingerprint" in entry}
    models = {"reference": {"image_encoder": results["model"]["image_encoder"],
                            "text_encoder": results["model"]["text_encoder"]}}
    results["provenance"] = provenance(config, inputs, models)
    results["seconds"] = round(time.perf_counter() - clock, 1)
    _write_outputs(Path(run["out"]), results, write_report)
    return results


def _write_outputs(out: Path, results: dict[str, Any], write_report) -> None:
    with stage("write results.json, provenance.json and report.html"):
        write_json(out / "results.json", results)
        write_json(out / "provenance.json", {**results["provenance"], "started": results["started"],
                                             "finished": results["finished"], "seconds": results["seconds"]})
        write_report(results, out / "report.html")
    logger.info("wrote %s, %s and %s", out / "results.json", out / "provenance.json", out / "report.html")


def _load_cohorts(config: dict[str, Any]) -> dict[str, Any]:
    from linkrisk.data.cohort import official_split
    from linkrisk.data.registry import load_dataset
    from linkrisk.data.sections import TextPolicy

    cohorts = {}
    for table in config["cohorts"]:
        with stage(f"load cohort {table['name']} ({table['dataset']})"):
            policy = TextPolicy.parse(table["text_policy"]) if table["text_policy"] else None
            cohort = load_dataset(f"{table['dataset']}:{table['path']}", policy)
            if table["split"] != "all":
                cohort = official_split(cohort, table["split"])
            cohorts[table["name"]] = dataclasses.replace(cohort, name=table["name"])
        logger.info("cohort %s: %d images, %d reports, %d patients", table["name"], cohorts[table["name"]].n_images,
                    cohorts[table["name"]].n_reports, cohorts[table["name"]].n_patients)
    return cohorts


def _cohorts_needed(config: dict[str, Any], model: str) -> list[str]:
    """Return the cohorts ``model`` must embed, in the order of ``[[cohorts]]``."""
    needed = set(config["audit"]["cohorts"]) | set(config["probe"]["cohorts"])
    mitigation = config.get("mitigation")
    if mitigation and mitigation["model"] == model:
        needed |= {mitigation["train"], mitigation["public"], *mitigation["targets"]}
        if mitigation["refit_aux"]:
            needed.add(mitigation["refit_aux"])
    return [table["name"] for table in config["cohorts"] if table["name"] in needed]


def _embed_all(config: dict[str, Any], cohorts: dict[str, Any], out: Path) -> dict[str, Any]:
    """Embed every cohort each model needs; return per model its record and its embed folders."""
    from linkrisk.models.adapters import load_adapter
    from linkrisk.models.embed import EmbedConfig, embed_cohort, hash_weights

    run = config["run"]
    models = {}
    for table in config["models"]:
        name = table["name"]
        with stage(f"load model {name} ({table['adapter']})"):
            adapter = load_adapter(table["adapter"], table["weights"], allow_download=run["allow_download"])
            sha256 = hash_weights(getattr(adapter, "weights_path", table["weights"]))
        embed_config = EmbedConfig(batch_size=table["batch_size"], text_batch_size=table["text_batch_size"],
                                   chunk_size=table["chunk_size"], workers=table["workers"], device=run["device"],
                                   precision=table["precision"], fast_decode=table["fast_decode"],
                                   progress=not run["quiet"], engine=run["engine"], address=run["address"],
                                   actors=table["actors"]).validate()
        folders = {}
        for cohort_name in _cohorts_needed(config, name):
            folder = out / "embeddings" / name / cohort_name
            with stage(f"embed {cohort_name} with {name}"):
                summary = embed_cohort(adapter, cohorts[cohort_name], folder, embed_config,
                                       {"model": table["adapter"], "weights": table["weights"],
                                        "weights_sha256": sha256})
            folders[cohort_name] = folder
        record = {key: summary["model"][key] for key in ("adapter", "name", "cache_key", "preprocess",
                                                          "context_length", "image_feature_shape",
                                                          "text_feature_dim", "embed_dim")} if folders else {}
        models[name] = {"record": {"adapter": table["adapter"], "weights": table["weights"],
                                   "weights_sha256": sha256, **record}, "folders": folders}
    return models


def _views(audit: dict[str, Any]) -> list[dict[str, str]]:
    return [{"direction": d.replace("-", "_"), "level": level, "image_level": image_level.replace("-", "_")}
            for d, level, image_level in itertools.product(audit["directions"], audit["levels"],
                                                           audit["image_levels"])]


MAIN_VIEW = {"direction": "image_to_report", "level": "study", "image_level": "image"}


def _audit_one(model: str, cohort: str, folder: Path, cohort_table: dict[str, Any], config: dict[str, Any],
               out: Path, engine=None) -> list[dict[str, Any]]:
    """Audit one embed folder under every view and kind of negatives the configuration requests."""
    from linkrisk.audit.embeddings import audit_folder, load_embeddings
    from linkrisk.audit.extras import folder_oracle_audits, main_audit_extras
    from linkrisk.models.precomputed import load_feature_cohort

    audit, run = config["audit"], config["run"]
    has_labels = bool(load_feature_cohort(folder, cohort).label_names)
    common = {"model": model, "cohort": cohort, "heads": "original",
              "embeddings": str(folder.relative_to(out))}
    runs = []
    for view in _views(audit):
        for negatives in audit["negatives"]:
            if negatives == "label-matched" and not has_labels:
                logger.info("audit %s / %s: skipped label-matched negatives (the cohort has no labels)", model,
                            cohort)
                continue
            result = audit_folder(
                folder, audit["pools"], audit["ks"], n_boot=run["n_boot"], seed=run["seed"], negatives=negatives,
                label_policy=cohort_table["label_policy"], merge_identical=audit["merge_identical"],
                ties=audit["ties"], fallback=None if audit["fallback"] == "none" else audit["fallback"].replace("-", "_"),
                monte_carlo_pools=audit["monte_carlo"] if negatives == "random" else 0,
                permutations=audit["permutations"], device=run["device"], precision=audit["precision"],
                block_size=audit["block_size"], engine=engine,
                match=audit["match"] if view == MAIN_VIEW and negatives == "random" and audit["match"] else None,
                **view)
            entry = {**common, **result}
            if view != MAIN_VIEW:
                entry["view"] = "extra"
            elif negatives == "random":
                image, report, pairs = load_embeddings(folder)
                entry.update(main_audit_extras(image, report, pairs["report_row"].to_numpy(),
                                               pairs["patient_id"].astype(str).to_numpy(),
                                               pairs["image_id"].to_numpy(), folder, run["n_boot"], run["seed"],
                                               progress=not run["quiet"]))
                oracles = folder_oracle_audits(folder, audit["pools"], audit["ks"], run["n_boot"], run["seed"],
                                               cohort_table["label_policy"])
                # Attributes chosen with [audit] match replace the default oracle's; the metadata oracle stays.
                chosen = ("attribute_matched", "attribute_oracle", "oracle_comparison", "attribute_oracle_skipped")
                entry.update({key: value for key, value in oracles.items()
                              if not (audit["match"] and key in chosen)})
                entry["verdict"] = verdict_line(entry)
            runs.append(entry)
            r1 = {e["pool"]: e["value"] for e in result["recall"] if e["k"] == 1}
            logger.info("audit %s / %s (%s, %s level, %s, %s negatives): Recall@1 %s", model, cohort,
                        view["direction"], view["level"], view["image_level"], negatives,
                        ", ".join(f"N={pool}: {value:.3f}" for pool, value in r1.items()))
    return runs


def _split_audit_one(model: str, cohort: str, folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Refit heads on the patient-disjoint and, where images.parquet has a source column, source-disjoint split."""
    from linkrisk.audit.embeddings import load_images_table
    from linkrisk.audit.splits import split_audits
    from linkrisk.models.precomputed import load_feature_cohort

    audit, run = config["audit"], config["run"]
    features = load_feature_cohort(folder, cohort)
    images = load_images_table(folder, pd.read_parquet(folder / "pairs.parquet"))
    sources = images["source"].to_numpy(dtype=object) if images is not None and "source" in images.columns else None
    splits = split_audits(features.image_features, features.report_features, features.report_row,
                          features.patient_ids, sources, seed=run["seed"], pools=audit["pools"], ks=audit["ks"],
                          n_boot=run["n_boot"], permutations=audit["permutations"], progress=not run["quiet"])
    return {"model": model, "cohort": cohort, **splits}


def _probe_one(model: str, cohort: str, folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Probe a model's original heads on one cohort split patient-disjointly into probe train and test."""
    from linkrisk.mitigate.sweep import probe_with_heads
    from linkrisk.models.precomputed import load_feature_cohort
    from linkrisk.probe.split import probe_split

    run = config["run"]
    features = load_feature_cohort(folder, cohort)
    train_rows, test_rows = probe_split(features.patient_ids, config["probe"]["test_fraction"], run["seed"])
    train = features.subset(set(features.patient_ids[train_rows]), f"{cohort}_probe_train")
    test = features.subset(set(features.patient_ids[test_rows]), f"{cohort}_probe_test")
    result = probe_with_heads(features.image_head, train, test, run["n_boot"], run["seed"])
    return {"model": model, "cohort": cohort, "heads": "original", "n_train_images": int(len(train.patient_ids)),
            "n_test_images": int(len(test.patient_ids)), **result}


def _mitigate(config: dict[str, Any], models: dict[str, Any], out: Path) -> dict[str, Any]:
    from linkrisk.mitigate import DPConfig
    from linkrisk.mitigate.run import run_mitigation

    mitigation, run = config["mitigation"], config["run"]
    folders = models[mitigation["model"]]["folders"]
    dp = DPConfig(delta=mitigation["delta"], epochs=mitigation["epochs"], batch_size=mitigation["batch_size"],
                  sample_rate=mitigation["sample_rate"], max_grad_norm=mitigation["max_grad_norm"],
                  lr=mitigation["lr"], loss=mitigation["loss"].replace("-", "_"), init=mitigation["init"],
                  noise_seed=mitigation["dp_noise_seed"], secure_mode=mitigation["secure_mode"], seed=run["seed"])
    epsilons = [epsilon_value(value) for value in mitigation["epsilons"]]
    for value in epsilons:
        dataclasses.replace(dp, epsilon=value).validate()
    with stage(f"mitigation of {mitigation['model']}: ε sweep on {mitigation['train']}"):
        return run_mitigation(folders[mitigation["train"]], folders[mitigation["public"]],
                              [folders[name] for name in mitigation["targets"]], out / "mitigation", epsilons, dp,
                              refit_aux=folders[mitigation["refit_aux"]] if mitigation["refit_aux"] else None,
                              refit_ks=mitigation["refit_ks"], holdout=mitigation["holdout"], n_boot=run["n_boot"],
                              seed=run["seed"], progress=not run["quiet"])


def _run_cohorts_and_models(config: dict[str, Any]) -> dict[str, Any]:
    from linkrisk.audit.distributed import counting_engine
    from linkrisk.report import write_report

    started = _timestamp()
    clock = time.perf_counter()
    out = Path(config["run"]["out"])
    cohorts = _load_cohorts(config)
    tables = {table["name"]: table for table in config["cohorts"]}
    runs = []
    # With run.engine = ray, one cluster serves the embedding and the rank counting.
    with counting_engine(config["run"]["engine"], config["run"]["address"]) as engine:
        models = _embed_all(config, cohorts, out)
        with stage("audits"):
            for model, entry in models.items():
                for cohort in config["audit"]["cohorts"]:
                    runs += _audit_one(model, cohort, entry["folders"][cohort], tables[cohort], config, out, engine)

    split_audit = []
    if config["audit"]["split_audit"]:
        with stage("split audits: fresh heads on patient-disjoint and source-disjoint splits"):
            for model, entry in models.items():
                for cohort in config["audit"]["cohorts"]:
                    split_audit.append(_split_audit_one(model, cohort, entry["folders"][cohort], config))

    mitigation = _mitigate(config, models, out) if config.get("mitigation") else None

    probes = []
    if config["probe"]["cohorts"]:
        with stage("linear probes of the original heads"):
            for model, entry in models.items():
                for cohort in config["probe"]["cohorts"]:
                    probes.append(_probe_one(model, cohort, entry["folders"][cohort], config))

    inputs = {name: {"images": cohort.n_images, "reports": cohort.n_reports, "patients": cohort.n_patients,
                     "fingerprint": cohort.fingerprint()} for name, cohort in cohorts.items()}
    model_records = {name: entry["record"] for name, entry in models.items()}
    results = {
        "schema_version": SCHEMA_VERSION,
        "linkrisk_version": __version__,
        "kind": "config",
        "started": started,
        "config": config,
        "cohorts": {name: {**cohort.describe(), "fingerprint": cohort.fingerprint()}
                    for name, cohort in cohorts.items()},
        "models": model_records,
        "runs": runs,
        "probe": probes,
    }
    if split_audit:
        results["split_audit"] = split_audit
    if mitigation:
        results["mitigation_run"] = {key: mitigation[key] for key in ("inputs", "epsilons", "config")}
        results["sweep"] = mitigation["sweep"]
        results["refit"] = mitigation["refit"]
    results["provenance"] = provenance(config, inputs, model_records)
    results["finished"] = _timestamp()
    results["seconds"] = round(time.perf_counter() - clock, 1)
    _write_outputs(out, results, write_report)
    return results


def check_output_folder(out: Path) -> None:
    """Raise :class:`ConfigError` when ``out`` exists and is not a folder."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run.out {out} exists and is not a folder; choose another output folder")


__all__ = ["SCHEMA_VERSION", "check_output_folder", "run_config"]
