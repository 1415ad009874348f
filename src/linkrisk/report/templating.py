"""The Jinja environment of the report templates, with the shared number formats as filters."""

from __future__ import annotations

import functools

import jinja2

from linkrisk.report import format as fmt


@functools.cache
def environment() -> jinja2.Environment:
    """Return the environment for ``report/templates``: HTML autoescaping, undefined names raise."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("linkrisk", "report/templates"),
                             autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined)
    env.filters.update({
        "pct": fmt.fmt_pct, "num": fmt.fmt_num, "lift": fmt.fmt_lift, "count": fmt.fmt_count, "sci": fmt.fmt_sci,
        "epsilon": fmt.fmt_epsilon, "pool": fmt.fmt_pool, "interval": fmt.fmt_interval,
        "cohort_title": fmt.cohort_title, "heads_title": fmt.heads_title,
    })
    env.globals.update({"fmt_pct": fmt.fmt_pct, "fmt_num": fmt.fmt_num})
    return env
