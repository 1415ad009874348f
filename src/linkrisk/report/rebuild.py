"""Rebuild a run's HTML report from its ``results.json`` alone: no data, models or embeddings are read."""

from __future__ import annotations

import json
from pathlib import Path

from linkrisk.errors import InputError
from linkrisk.report.html import write_report
from linkrisk.report.validate import check_results

RESULTS_NAME = "results.json"
REPORT_NAME = "report.html"


def load_results(path) -> dict:
    """Read and check a ``results.json``, raising ``InputError`` naming the file when it is missing or invalid."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: results file not found. Give the run folder that `linkrisk demo` or a config "
                         f"run wrote, which contains {RESULTS_NAME}")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err}). Restore the {RESULTS_NAME} that linkrisk wrote, or rerun "
                         "the audit") from err
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno} ({err.msg}). Restore the "
                         f"{RESULTS_NAME} that linkrisk wrote, or rerun the audit") from err
    check_results(results, str(path))
    return results


def rebuild_report(run_dir, out=None) -> Path:
    """Render ``RUN_DIR/results.json`` into ``RUN_DIR/report.html`` (or ``out``) and return the path written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: run folder not found. Give the folder that contains {RESULTS_NAME}")
    results = load_results(run_dir / RESULTS_NAME)
    return write_report(results, Path(out) if out is not None else run_dir / REPORT_NAME)
