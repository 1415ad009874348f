"""Report text policy: header splitting, section choice and the fallback."""

from __future__ import annotations

import pytest

from linkrisk.data.sections import TextPolicy, compose_text, split_sections
from linkrisk.errors import ConfigError

REPORT = ("FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n INDICATION:  ___ with cough\n\n"
          " FINDINGS:  Lungs are clear.\n  Heart size normal.\n\n IMPRESSION:  No acute process.\n")


def test_split_sections_reads_headers():
    sections = split_sections(REPORT)
    assert sections["preamble"] == "FINAL REPORT"
    assert sections["indication"] == "___ with cough"  # de-identification token kept
    assert sections["findings"] == "Lungs are clear.\n  Heart size normal."  # inner whitespace kept
    assert sections["impression"] == "No acute process."
    assert sections["examination"] == "CHEST (PA AND LAT)"


def test_compose_text_order_and_fallback():
    sections = split_sections(REPORT)
    assert compose_text(sections, TextPolicy()) == ("Lungs are clear.\n  Heart size normal.\nNo acute process.", False)
    assert compose_text(sections, TextPolicy(("impression", "findings")))[0].startswith("No acute process.")
    no_findings = {"impression": "  ", "indication": "cough"}
    assert compose_text(no_findings, TextPolicy()) == ("", False)
    assert compose_text(no_findings, TextPolicy(fallback="full"), "whole report") == ("whole report", True)
    only_impression = {"findings": None, "impression": "No change."}
    assert compose_text(only_impression, TextPolicy()) == ("No change.", False)


def test_split_sections_without_headers():
    assert split_sections("Lungs are clear.") == {"preamble": "Lungs are clear."}
    assert split_sections("   ") == {}
    repeated = split_sections("FINDINGS: one.\nIMPRESSION: two.\nFINDINGS: three.")
    assert repeated["findings"] == "one.\nthree."


def test_text_policy_parse_and_errors():
    assert TextPolicy.parse("impression,fallback=full") == TextPolicy(("impression",), "full")
    assert TextPolicy.parse("Findings+Impression").sections == ("findings", "impression")
    with pytest.raises(ConfigError, match="invalid report sections"):
        TextPolicy.parse("findings+summary")
    with pytest.raises(ConfigError, match="the only option is fallback"):
        TextPolicy.parse("findings,strict")
    with pytest.raises(ConfigError, match="valid values: none, full"):
        TextPolicy(fallback="other")
