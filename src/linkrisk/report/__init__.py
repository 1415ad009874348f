"""The self-contained HTML report, rendered from the results dict (``results.json``) alone."""

from linkrisk.report.html import render_report, write_html_report, write_report
from linkrisk.report.rebuild import load_results, rebuild_report

__all__ = ["load_results", "rebuild_report", "render_report", "write_html_report", "write_report"]

from linkrisk import _make_callable  # noqa: E402

# Calling the subpackage runs the API function of the same name (linkrisk.api).
_make_callable(__name__)
