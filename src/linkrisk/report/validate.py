"""Structure checks of a results dict before the report is rendered from it.

Only the fields the report indexes directly are checked: keys that group
or place a figure (cohort, heads, pool, K, batch size, bins). Numbers
that are missing or not numeric print as "n/a" and are left out of plots.
"""

from __future__ import annotations

from linkrisk.errors import InputError

SUPPORTED_MAJOR = "1"
FIX = "Rewrite it by rerunning the audit, or restore the file written by linkrisk"


def _fail(source: str, where: str, problem: str) -> None:
    raise InputError(f"{source}: {where} {problem}. {FIX}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _list_of_objects(value, source: str, where: str) -> list[dict]:
    if not isinstance(value, list):
        _fail(source, where, f"must be a list, got {type(value).__name__}")
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            _fail(source, f"{where}[{index}]", f"must be an object, got {type(item).__name__}")
    return value


def _require_str(item: dict, key: str, source: str, where: str) -> None:
    if not isinstance(item.get(key), str):
        _fail(source, f"{where}.{key}", f"must be a string, got {item.get(key)!r}")


def _require_pool(item: dict, source: str, where: str) -> None:
    pool = item.get("pool")
    if pool != "full" and not (_is_int(pool) and pool >= 1):
        _fail(source, f"{where}.pool", f"must be a positive integer or \"full\", got {pool!r}")


def _check_run(run: dict, source: str, where: str) -> None:
    _require_str(run, "cohort", source, where)
    _require_str(run, "heads", source, where)
    for index, entry in enumerate(_list_of_objects(run.get("recall", []), source, f"{where}.recall")):
        _require_pool(entry, source, f"{where}.recall[{index}]")
        if not (_is_int(entry.get("k")) and entry["k"] >= 1):
            _fail(source, f"{where}.recall[{index}].k", f"must be a positive integer, got {entry.get('k')!r}")
    for index, point in enumerate(_list_of_objects(run.get("recall_at_1_curve") or [], source,
                                                   f"{where}.recall_at_1_curve")):
        if not (_is_int(point.get("pool")) and point["pool"] >= 1):
            _fail(source, f"{where}.recall_at_1_curve[{index}].pool", f"must be a positive integer, got "
                  f"{point.get('pool')!r}")
        if not isinstance(point.get("ci95"), list) or len(point["ci95"]) != 2:
            _fail(source, f"{where}.recall_at_1_curve[{index}].ci95", "must be a [low, high] list")
    for index, entry in enumerate(_list_of_objects(run.get("assignment") or [], source, f"{where}.assignment")):
        if not (_is_int(entry.get("batch_size")) and entry["batch_size"] >= 1):
            _fail(source, f"{where}.assignment[{index}].batch_size",
                  f"must be a positive integer, got {entry.get('batch_size')!r}")
    if run.get("rank_histogram") is not None:
        _check_histogram(run["rank_histogram"], source, f"{where}.rank_histogram")
    # Optional fields of the evidence section: each is a list of entries placed by pool.
    for key in ("power", "upper_bounds", "oracle_comparison", "file_metadata_comparison"):
        for index, entry in enumerate(_list_of_objects(run.get(key) or [], source, f"{where}.{key}")):
            _require_pool(entry, source, f"{where}.{key}[{index}]")


def _check_histogram(histogram, source: str, where: str) -> None:
    if not isinstance(histogram, dict):
        _fail(source, where, f"must be an object, got {type(histogram).__name__}")
    edges, counts = histogram.get("bin_edges"), histogram.get("counts")
    if not isinstance(edges, list) or len(edges) < 2 or not all(_is_int(e) for e in edges) or edges != sorted(edges):
        _fail(source, f"{where}.bin_edges", "must be an increasing list of at least 2 integers")
    if (not isinstance(counts, list) or len(counts) != len(edges) - 1
            or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in counts)):
        _fail(source, f"{where}.counts", f"must be a list of {len(edges) - 1} numbers, one per bin")
    for key in ("n_queries", "n_candidates"):
        if not (_is_int(histogram.get(key)) and histogram[key] >= 0):
            _fail(source, f"{where}.{key}", f"must be a non-negative integer, got {histogram.get(key)!r}")
    if histogram["n_candidates"] < 1:
        _fail(source, f"{where}.n_candidates", "must be at least 1")


def _check_split_audit(entries, source: str) -> None:
    for index, entry in enumerate(_list_of_objects(entries, source, "split_audit")):
        for position, split in enumerate(_list_of_objects(entry.get("splits"), source,
                                                           f"split_audit[{index}].splits")):
            audit = split.get("audit")
            if not isinstance(audit, dict):
                _fail(source, f"split_audit[{index}].splits[{position}].audit",
                      f"must be an object, got {type(audit).__name__}")
            where = f"split_audit[{index}].splits[{position}].audit.recall"
            for number, recall in enumerate(_list_of_objects(audit.get("recall", []), source, where)):
                _require_pool(recall, source, f"{where}[{number}]")


def _check_probe(probe: dict, source: str, where: str) -> None:
    _require_str(probe, "cohort", source, where)
    _require_str(probe, "heads", source, where)
    for key in ("labels", "skipped_labels"):
        for index, label in enumerate(_list_of_objects(probe.get(key) or [], source, f"{where}.{key}")):
            if "name" not in label:
                _fail(source, f"{where}.{key}[{index}]", "has no name")


def _check_sweep_rows(rows: list[dict], source: str, where: str) -> None:
    for index, row in enumerate(rows):
        _require_str(row, "cohort", source, f"{where}[{index}]")
        entries = _list_of_objects(row.get("recall_at_1"), source, f"{where}[{index}].recall_at_1")
        for position, entry in enumerate(entries):
            _require_pool(entry, source, f"{where}[{index}].recall_at_1[{position}]")


def _check_sweep(sweep, source: str) -> None:
    if not isinstance(sweep, dict):
        _fail(source, "sweep", f"must be an object, got {type(sweep).__name__}")
    original = _list_of_objects(sweep.get("original"), source, "sweep.original")
    _check_sweep_rows(original, source, "sweep.original")
    for index, row in enumerate(original):
        if not row["recall_at_1"]:
            _fail(source, f"sweep.original[{index}].recall_at_1", "is empty")
    for index, point in enumerate(_list_of_objects(sweep.get("points"), source, "sweep.points")):
        epsilon = point.get("epsilon")
        if epsilon != "inf" and not (isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool)
                                     and epsilon > 0):
            _fail(source, f"sweep.points[{index}].epsilon", f"must be a positive number or \"inf\", got {epsilon!r}")
        _check_sweep_rows(_list_of_objects(point.get("targets"), source, f"sweep.points[{index}].targets"),
                          source, f"sweep.points[{index}].targets")


def _check_refit(refits, source: str) -> None:
    for index, entry in enumerate(_list_of_objects(refits, source, "refit")):
        _require_str(entry, "target", source, f"refit[{index}]")
        for position, row in enumerate(_list_of_objects(entry.get("table", []), source, f"refit[{index}].table")):
            where = f"refit[{index}].table[{position}]"
            _require_str(row, "method", source, where)
            if not (_is_int(row.get("n_aux_pairs")) and row["n_aux_pairs"] >= 1):
                _fail(source, f"{where}.n_aux_pairs", f"must be a positive integer, got {row.get('n_aux_pairs')!r}")
            _require_pool(row, source, where)


def check_results(results, source: str) -> None:
    """Raise ``InputError`` naming ``source`` and the field when ``results`` lacks the structure of ``results.json``."""
    if not isinstance(results, dict):
        raise InputError(f"{source}: expected a JSON object with the results of a linkrisk run, got "
                         f"{type(results).__name__}. {FIX}")
    version = results.get("schema_version")
    if not isinstance(version, str) or version.split(".")[0] != SUPPORTED_MAJOR:
        raise InputError(f"{source}: schema_version {version!r} is not supported because this linkrisk reads version "
                         f"{SUPPORTED_MAJOR}.x. {FIX}")
    if results.get("runs") is not None:
        for index, run in enumerate(_list_of_objects(results["runs"], source, "runs")):
            _check_run(run, source, f"runs[{index}]")
    if results.get("probe") is not None:
        for index, probe in enumerate(_list_of_objects(results["probe"], source, "probe")):
            _check_probe(probe, source, f"probe[{index}]")
    if results.get("sweep") is not None:
        _check_sweep(results["sweep"], source)
    if results.get("refit") is not None:
        _check_refit(results["refit"], source)
    if results.get("split_audit") is not None:
        _check_split_audit(results["split_audit"], source)
    for key in ("mitigation", "config", "machine"):
        if results.get(key) is not None and not isinstance(results[key], dict):
            _fail(source, key, f"must be an object, got {type(results[key]).__name__}")
