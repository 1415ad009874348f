"""The end-to-end demo: train, audit, mitigate, re-audit and probe on real cohorts.

Stages, in order, each logged when it starts and ends:

1. load the COVID-19 collection and Open-i into paired cohorts;
2. encode images and reports once (frozen encoders, cached features);
3. split COVID patient-disjointly into train and test;
4. fit the original heads (InfoNCE) on COVID train;
5. train DP heads on COVID train, with Open-i as the public cohort;
6. audit image-to-report linkage with both heads on COVID test, COVID
   train and Open-i (external, no retraining), then refit the heads on a
   patient-disjoint and a source-disjoint split of COVID and audit each
   held-out part;
7. probe utility (macro AUROC) with both heads;
8. write ``results.json``, the embeddings and ``report.html``.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import platform
from pathlib import Path

import numpy as np
import pandas as pd

from linkrisk import __version__
from linkrisk._io import write_json, write_npy, atomic_write
from linkrisk._logging import logger, stage
from linkrisk.audit.design import AuditDesign, build_design
from linkrisk.audit.extras import main_audit_extras, oracle_audits
from linkrisk.audit.run import run_audit, run_audits
from linkrisk.audit.splits import split_audits
from linkrisk.audit.verdict import verdict_line
from linkrisk.data import PairedCohort, load_covid, load_openi, split_by_patient
from linkrisk.data.file_metadata import image_attribute_table
from linkrisk.errors import InputError
from linkrisk.mitigate import DPConfig, train_dp_heads
from linkrisk.mitigate.run import refit_on_targets
from linkrisk.mitigate.sweep import epsilon_sweep
from linkrisk.models.features import embed_images, embed_texts
from linkrisk.models.heads import DualHeads, plain_head, save_heads
from linkrisk.models.precomputed import FeatureCohort
from linkrisk.models.image_encoders import create_image_encoder
from linkrisk.models.text_encoders import WordLlamaTextEncoder
from linkrisk.models.train import FitConfig, fit_heads
from linkrisk.probe import probe_macro_auroc
from linkrisk.report.html import write_html_report

SCHEMA_VERSION = "1.0"


@dataclasses.dataclass
class DemoConfig:
    """Options of :func:`run_demo`; all of them are written to ``results.json``."""

    data_dir: Path
    out_dir: Path
    cache_dir: Path | None = None
    image_encoder: str = "randconv"
    text_weights: Path | None = None
    test_fraction: float = 0.25
    pools: tuple = (10, 100, 1000, "full")
    ks: tuple = (1, 5, 10)
    n_boot: int = 1000
    seed: int = 0
    epsilons: tuple = (0.1, 0.34, 1.0, 3.0, 10.0, math.inf)
    refit_ks: tuple = (50, 200, "all")
    permutations: int = 999
    fit: FitConfig = dataclasses.field(default_factory=FitConfig)
    dp: DPConfig = dataclasses.field(default_factory=DPConfig)
    progress: bool = True


@dataclasses.dataclass
class Features:
    """A cohort with its frozen-encoder features, rows aligned to its tables."""

    cohort: PairedCohort
    image: np.ndarray
    report: np.ndarray

    @property
    def report_row(self) -> np.ndarray:
        """``[n_images]`` row of each image's true report in ``report``."""
        position = pd.Series(np.arange(self.cohort.n_reports), index=self.cohort.reports["report_id"].values)
        return position.loc[self.cohort.images["report_id"].values].to_numpy()

    @property
    def patient_ids(self) -> np.ndarray:
        return self.cohort.images["patient_id"].to_numpy()

    def part(self, sub: PairedCohort) -> "Features":
        """Features of a sub-cohort (for example one side of a split)."""
        image_pos = pd.Series(np.arange(self.cohort.n_images), index=self.cohort.images["image_id"].values)
        report_pos = pd.Series(np.arange(self.cohort.n_reports), index=self.cohort.reports["report_id"].values)
        return Features(sub, self.image[image_pos.loc[sub.images["image_id"].values].to_numpy()],
                        self.report[report_pos.loc[sub.reports["report_id"].values].to_numpy()])


def _encode(cohort: PairedCohort, image_encoder, text_encoder, cache_dir: Path, progress: bool) -> Features:
    image, cohort = embed_images(cohort, image_encoder, cache_dir, progress=progress)
    report = embed_texts(cohort.reports["text"].tolist(), text_encoder, cache_dir, cohort.name, progress=progress)
    if cohort.n_images == 0:
        raise InputError(f"cohort {cohort.name!r} ({cohort.source}) has no readable image with a report")
    return Features(cohort, image, report)


def _save_embeddings(folder: Path, features: Features, image_emb: np.ndarray, report_emb: np.ndarray,
                     attributes: pd.DataFrame) -> None:
    write_npy(folder / "image.npy", image_emb.astype(np.float32))
    write_npy(folder / "report.npy", report_emb.astype(np.float32))
    pairs = pd.DataFrame({"image_id": features.cohort.images["image_id"].values,
                          "report_row": features.report_row.astype(np.int64),
                          "patient_id": features.patient_ids.astype(str)})
    atomic_write(folder / "pairs.parquet", lambda tmp: pairs.to_parquet(tmp, index=False))
    reports = features.cohort.reports[["report_id", *features.cohort.label_names]]
    atomic_write(folder / "reports.parquet", lambda tmp: reports.to_parquet(tmp, index=False))
    images = pd.concat([features.cohort.images[["image_id", "study_id", "patient_id", "report_id"]]
                        .reset_index(drop=True), attributes], axis=1)
    atomic_write(folder / "images.parquet", lambda tmp: images.to_parquet(tmp, index=False))


def _log_recall_at_1(run: dict, pools_kind: str) -> None:
    r1 = {entry["pool"]: entry for entry in run["recall"] if entry["k"] == 1}
    summary = ", ".join(f"N={p}: {e['value']:.3f} ({e['lift']:.1f}x chance)" for p, e in r1.items())
    logger.info("audit %s / %s heads, %s pools: Recall@1 %s", run["cohort"], run["heads"], pools_kind, summary)


# Other views audited on the held-out cohort, beside the main image-to-report, study-level, per-image audit.
EXTRA_VIEWS = (
    {"direction": "report_to_image", "level": "study", "image_level": "image"},
    {"direction": "image_to_report", "level": "patient", "image_level": "image"},
    {"direction": "image_to_report", "level": "study", "image_level": "study_mean"},
)


def _audit(name: str, heads_name: str, heads: DualHeads, features: Features, config: DemoConfig) -> list[dict]:
    """Embed one cohort with one pair of heads, save the embeddings, and audit with uniform and label-matched pools."""
    image_emb, report_emb = heads.embed(features.image, features.report)
    folder = config.out_dir / "embeddings" / name / heads_name
    attributes = image_attribute_table(features.cohort.images)
    _save_embeddings(folder, features, image_emb, report_emb, attributes)
    common = {"cohort": name, "heads": heads_name, "embeddings": str(folder.relative_to(config.out_dir))}
    options = {"pools": list(config.pools), "ks": list(config.ks), "n_boot": config.n_boot, "seed": config.seed}
    has_labels = bool(features.cohort.label_names)

    def design(**view) -> AuditDesign:
        return build_design(image_emb, report_emb, features.report_row, features.patient_ids,
                            image_ids=features.cohort.images["image_id"].to_numpy(),
                            report_labels=features.cohort.label_matrix() if has_labels else None, **view)

    main = design()
    # Uniform and pathology-matched pools (uncertain and blank counted as negative) from one scoring pass.
    audits = run_audits(main, **options, negatives=("random", "label_matched") if has_labels else ("random",),
                        label_policy="zeros", permutations=config.permutations)
    result = audits[0]
    extras = main_audit_extras(image_emb, report_emb, features.report_row, features.patient_ids,
                               features.cohort.images["image_id"].to_numpy(), folder, config.n_boot, config.seed,
                               progress=config.progress, pools=config.pools, ks=config.ks)
    extras.update(oracle_audits(main, attributes, features.report_row, list(config.pools), list(config.ks),
                                config.n_boot, config.seed))
    runs = [{**common, **result, **extras}]
    runs[0]["verdict"] = verdict_line(runs[0])
    _log_recall_at_1(runs[-1], "uniform")
    logger.info("verdict %s / %s heads: %s", name, heads_name, runs[0]["verdict"])

    if has_labels:
        runs.append({**common, **audits[1]})
        _log_recall_at_1(runs[-1], "pathology-matched")
    if name == "covid_test":
        for view in EXTRA_VIEWS:
            runs.append({**common, **run_audit(design(**view), **options), "view": "extra"})
            _log_recall_at_1(runs[-1], f"{view['direction']}, {view['level']} level, {view['image_level']}")
    return runs


def _probe(name: str, heads_name: str, heads: DualHeads, train: Features, test: Features, config: DemoConfig) -> dict:
    train_emb, _ = heads.embed(train.image)
    test_emb, _ = heads.embed(test.image)
    labels = list(train.cohort.label_names)
    result = probe_macro_auroc(train_emb, train.cohort.label_matrix(train.cohort.images["report_id"]),
                               test_emb, test.cohort.label_matrix(test.cohort.images["report_id"]),
                               test.patient_ids, labels, n_boot=config.n_boot, seed=config.seed)
    return {"cohort": name, "heads": heads_name, "n_train_images": int(len(train_emb)),
            "n_test_images": int(len(test_emb)), **result}


def run_demo(config: DemoConfig, extra: dict | None = None) -> dict:
    """Run every stage on the real cohorts under ``config.data_dir``; return the results dict.

    ``extra`` contains more top-level fields for ``results.json`` (a configuration run adds its
    resolved configuration and provenance).
    """
    started = datetime.datetime.now(datetime.timezone.utc)
    out = Path(config.out_dir)
    cache_dir = Path(config.cache_dir) if config.cache_dir else out / "cache"
    data = Path(config.data_dir)

    with stage("load cohorts"):
        covid = load_covid(data / "covid-chestxray")
        openi = load_openi(data / "openi")

    with stage("encode images and reports (frozen encoders, cached)"):
        image_encoder = create_image_encoder(config.image_encoder)
        text_encoder = WordLlamaTextEncoder(config.text_weights)
        covid_features = _encode(covid, image_encoder, text_encoder, cache_dir, config.progress)
        openi_features = _encode(openi, image_encoder, text_encoder, cache_dir, config.progress)

    train_cohort, test_cohort = split_by_patient(covid_features.cohort, config.test_fraction, config.seed)
    train, test = covid_features.part(train_cohort), covid_features.part(test_cohort)
    logger.info("covid split (seed %d): %d train patients / %d images, %d test patients / %d images",
                config.seed, train_cohort.n_patients, train_cohort.n_images, test_cohort.n_patients, test_cohort.n_images)

    with stage("fit original heads (symmetric InfoNCE)"):
        fit_config = dataclasses.replace(config.fit, seed=config.seed)
        original, history = fit_heads(train.image, train.report, train.report_row, train.patient_ids, fit_config,
                                      progress=config.progress)
        encoders = {"image_encoder": image_encoder.config(), "text_encoder": text_encoder.config()}
        save_heads(original, out / "models" / "original",
                   {"kind": "original", **encoders, "fit": dataclasses.asdict(fit_config), "history": history})

    with stage("train DP heads (Opacus DP-SGD, public negative bank from Open-i)"):
        dp_config = dataclasses.replace(config.dp, seed=config.seed)
        private, mitigation = train_dp_heads(train.image, train.report, train.report_row, train.patient_ids,
                                             openi_features.image, openi_features.report, dp_config,
                                             progress=config.progress)
        save_heads(private, out / "models" / "dp", {"kind": "dp", **encoders, "mitigation": mitigation})

    # NOTE: covid_train includes the patients the original heads kept back for
    # early stopping and never fitted on, so it understates their memorisation.
    audited = {"covid_test": test, "covid_train": train, "openi": openi_features}
    runs = []
    with stage("audit image-to-report linkage"):
        for heads_name, heads in (("original", original), ("dp", private)):
            for name, features in audited.items():
                runs.extend(_audit(name, heads_name, heads, features, config))

    with stage("split audit: fresh heads on patient-disjoint and source-disjoint splits of COVID"):
        splits = split_audits(covid_features.image, covid_features.report, covid_features.report_row,
                              covid_features.patient_ids, covid_features.cohort.images["source"].to_numpy(),
                              test_fraction=config.test_fraction, seed=config.seed, fit_config=fit_config,
                              pools=config.pools, ks=config.ks, n_boot=config.n_boot,
                              permutations=config.permutations)
        split_audit = {"cohort": "covid", **splits}

    openi_train_cohort, openi_test_cohort = split_by_patient(openi_features.cohort, 0.5, config.seed)
    probes = []
    with stage("linear probes"):
        for heads_name, heads in (("original", original), ("dp", private)):
            probes.append(_probe("covid", heads_name, heads, train, test, config))
            probes.append(_probe("openi", heads_name, heads, openi_features.part(openi_train_cohort),
                                 openi_features.part(openi_test_cohort), config))

    sweep, refit = _sweep_and_refit(train, test, openi_features, original, config)

    results = {
        "schema_version": SCHEMA_VERSION,
        "linkrisk_version": __version__,
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "config": _config_record(config, cache_dir),
        "cohorts": {
            "covid": {**covid_features.cohort.describe(), "fingerprint": covid_features.cohort.fingerprint()},
            "covid_train": train_cohort.describe(),
            "covid_test": test_cohort.describe(),
            "openi": {**openi_features.cohort.describe(), "fingerprint": openi_features.cohort.fingerprint()},
        },
        "model": {"image_encoder": image_encoder.config(), "text_encoder": text_encoder.config(),
                  "original_heads": {"fit": dataclasses.asdict(fit_config), "history": history}},
        "runs": runs,
        "mitigation": mitigation,
        "probe": probes,
        "sweep": sweep,
        "refit": refit,
        "split_audit": [split_audit],
        **(extra or {}),
    }
    with stage("write results"):
        write_json(out / "results.json", results)
        write_html_report(results, out / "report.html")
    logger.info("wrote %s, %s and %s", out / "results.json", out / "report.html", out / "embeddings")
    return results


def _feature_cohort(name: str, source: str, features: Features, heads: DualHeads) -> FeatureCohort:
    cohort = features.cohort
    labels = cohort.label_matrix(cohort.images["report_id"]) if cohort.label_names else np.zeros((cohort.n_images, 0))
    return FeatureCohort(name, source, features.image, features.report, features.report_row, features.patient_ids,
                         labels, list(cohort.label_names), plain_head(heads.image_head), plain_head(heads.text_head))


def _sweep_and_refit(train: Features, test: Features, openi: Features, original: DualHeads,
                     config: DemoConfig) -> tuple[dict, list[dict]]:
    """Run the ε sweep on COVID training patients and the refit attacker against the held-out patients."""
    train_cohort = _feature_cohort("covid_train", "covid", train, original)
    test_cohort = _feature_cohort("covid_test", "covid", test, original)
    openi_cohort = _feature_cohort("openi", "openi", openi, original)
    # The demo's original heads were fitted on the training patients, so DP heads start from public features.
    sweep_config = dataclasses.replace(config.dp, init="public", seed=config.seed)
    with stage(f"epsilon sweep ({', '.join(f'{e:g}' for e in config.epsilons)})"):
        sweep = epsilon_sweep(train_cohort, openi_cohort, [test_cohort, train_cohort, openi_cohort],
                              list(config.epsilons), sweep_config, n_boot=config.n_boot, seed=config.seed,
                              checkpoint_dir=config.out_dir / "models" / "sweep", progress=config.progress)
    with stage("refit attacker: COVID training pairs against the held-out patients"):
        refit = refit_on_targets(train_cohort, [test_cohort], list(config.refit_ks), config.n_boot, config.seed,
                                 progress=config.progress)
    return sweep, refit


def _config_record(config: DemoConfig, cache_dir: Path) -> dict:
    record = dataclasses.asdict(config)
    record["data_dir"] = str(config.data_dir)
    record["out_dir"] = str(config.out_dir)
    record["cache_dir"] = str(cache_dir)
    record["text_weights"] = str(config.text_weights) if config.text_weights else None
    record["pools"] = list(config.pools)
    record["ks"] = list(config.ks)
    record["epsilons"] = [e if math.isfinite(e) else "inf" for e in config.epsilons]
    record["refit_ks"] = list(config.refit_ks)
    return record
