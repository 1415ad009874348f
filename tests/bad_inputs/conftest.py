"""Tally of the bad-input corpus, printed at the end of every run that collected its cases.

Each case of ``test_corpus.py`` carries the marker
``bad_input_case(case_id, outcome)``. Only cases whose test passed are
counted, so the printed numbers are outcomes the run has checked.
"""

from __future__ import annotations

import textwrap

import pytest

from .outcomes import KINDS

# node id -> (case id, outcome) of every collected case, and the same for the cases that passed.
_collected: dict[str, tuple[str, str]] = {}
_passed: dict[str, tuple[str, str]] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "bad_input_case(case_id, outcome): a case of the bad-input corpus")


def pytest_collection_finish(session: pytest.Session) -> None:
    for item in session.items:
        marker = item.get_closest_marker("bad_input_case")
        if marker is not None:
            _collected[item.nodeid] = (marker.args[0], marker.args[1])


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.passed and report.nodeid in _collected:
        _passed[report.nodeid] = _collected[report.nodeid]


def corpus_summary() -> list[str]:
    """Return the tally line, one line of case ids per outcome, and the cases that did not pass."""
    by_kind = {kind: [case for case, outcome in _passed.values() if outcome == kind] for kind in KINDS}
    plural = {"clear error": "clear errors", "counted skip": "counted skips", "loaded correctly": "loaded correctly"}
    counts = ", ".join(f"{len(by_kind[kind])} {plural[kind]}" for kind in KINDS)
    lines = [f"bad-input corpus: {len(_passed)} cases, {counts}"]
    for kind in KINDS:
        if by_kind[kind]:
            lines += textwrap.wrap(f"{kind}: {', '.join(by_kind[kind])}", width=110, initial_indent="  ",
                                   subsequent_indent="    ")
    not_passed = [case for node, (case, _) in _collected.items() if node not in _passed]
    if not_passed:
        lines += textwrap.wrap(f"did not pass or did not run ({len(not_passed)} of {len(_collected)} collected, "
                               f"not counted): {', '.join(not_passed)}", width=110, initial_indent="  ",
                               subsequent_indent="    ")
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not _collected or config.getoption("collectonly"):
        return
    terminalreporter.write_sep("-", "bad-input corpus")
    for line in corpus_summary():
        terminalreporter.write_line(line)
