"""Report text policy: which sections of a radiology report form the text that is embedded.

Reports come either as free text with section headers (MIMIC-CXR's
``FINDINGS:`` and ``IMPRESSION:``) or with sections already split
(Open-i's XML, CheXpert Plus's ``section_*`` columns). Both go through
:func:`compose_text`, so every loader applies one rule:

- the chosen sections (default findings, then impression) are joined with
  a newline, in the policy's order, leaving out missing and empty ones;
- when none of them has text, ``fallback`` decides. With ``none`` (the
  default) the text is empty, and loaders count and skip the report. With
  ``full`` the whole report is used, and loaders count each such report;
- text is kept as written: whitespace inside a section and
  de-identification tokens (``___``, ``XXXX``) are not touched, only the
  ends of each section are stripped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from linkrisk.errors import ConfigError

SECTION_NAMES = ("findings", "impression", "indication", "comparison", "history", "technique")
FALLBACKS = ("none", "full")

# A header is a line that starts with an upper-case section name and a colon, as MIMIC-CXR reports write them.
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z /&]+?)[ \t]*:", re.MULTILINE)
# Header spellings mapped to section names; others end the previous section without starting a chosen one.
_HEADER_NAMES = {
    "FINDINGS": "findings",
    "FINDING": "findings",
    "IMPRESSION": "impression",
    "IMPRESSIONS": "impression",
    "CONCLUSION": "impression",
    "INDICATION": "indication",
    "INDICATIONS": "indication",
    "COMPARISON": "comparison",
    "COMPARISONS": "comparison",
    "HISTORY": "history",
    "CLINICAL HISTORY": "history",
    "TECHNIQUE": "technique",
}


@dataclass(frozen=True)
class TextPolicy:
    """Sections joined into the report text, and what to do when none has text."""

    sections: tuple[str, ...] = ("findings", "impression")
    fallback: str = "none"

    def __post_init__(self) -> None:
        unknown = [s for s in self.sections if s not in SECTION_NAMES]
        if unknown or not self.sections:
            raise ConfigError(f"invalid report sections {list(self.sections)}; choose from {', '.join(SECTION_NAMES)}")
        if self.fallback not in FALLBACKS:
            raise ConfigError(f"invalid section fallback {self.fallback!r}; valid values: {', '.join(FALLBACKS)}")

    @classmethod
    def parse(cls, text: str) -> "TextPolicy":
        """Read ``findings+impression`` or ``findings+impression,fallback=full`` (the CLI form)."""
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise ConfigError("empty report text policy; use for example findings+impression")
        options = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
        extra = [p for p in parts[1:] if "=" not in p or p.split("=", 1)[0] != "fallback"]
        if extra:
            raise ConfigError(f"invalid report text policy option(s) {extra}; the only option is fallback=none|full")
        return cls(tuple(s.strip().lower() for s in parts[0].split("+")), options.get("fallback", "none"))

    def describe(self) -> str:
        return "+".join(self.sections) + (f", fallback={self.fallback}" if self.fallback != "none" else "")


def split_sections(report: str) -> dict[str, str]:
    """Split a free-text report at its ``NAME:`` header lines into ``{section name: text}``.

    Text before the first header is stored under ``preamble``. A repeated
    section keeps its parts, joined by a newline. Header names outside the
    known list end the previous section and are kept under their lower-case
    name.
    """
    sections: dict[str, list[str]] = {}
    matches = list(_HEADER.finditer(report))
    if not matches:
        return {"preamble": report.strip()} if report.strip() else {}
    if report[:matches[0].start()].strip():
        sections["preamble"] = [report[:matches[0].start()].strip()]
    for match, following in zip(matches, [*matches[1:], None]):
        header = " ".join(match.group(1).split())
        name = _HEADER_NAMES.get(header, header.lower())
        body = report[match.end():following.start() if following else len(report)].strip()
        sections.setdefault(name, []).append(body)
    return {name: "\n".join(part for part in parts if part) for name, parts in sections.items()}


def compose_text(sections: dict[str, str | None], policy: TextPolicy, full_text: str | None = None) -> tuple[str, bool]:
    """Join the policy's sections into one text.

    Args:
        sections: section name to text (missing, None and empty are alike).
        policy: the text policy.
        full_text: the whole report, used by ``fallback="full"`` when no
            chosen section has text.

    Returns:
        ``(text, used_fallback)``; ``text`` is empty when nothing applies.
    """
    parts = []
    for name in policy.sections:
        value = sections.get(name)
        if isinstance(value, str) and value.strip():
            parts.append(value.strip())
    if parts:
        return "\n".join(parts), False
    if policy.fallback == "full" and isinstance(full_text, str) and full_text.strip():
        return full_text.strip(), True
    return "", False
