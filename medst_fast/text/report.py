"""Report text cleaning exactly as Med-ST/MGCA prepare it (docs/method.md §4.3).

impression first, then findings; split into sentences on "N." enumerations and on "."; each sentence is
lowercased and reduced to its \\w+ tokens; one-token sentences are dropped; non-ASCII characters are
removed; sentences are joined with a single space (sentence boundaries are lost, as in the official code).
"""
from __future__ import annotations

import re
from typing import Optional, Tuple

_ENUM = re.compile(r"[0-9]+\.")
_WORD = re.compile(r"\w+")
MIN_TOKENS = 3  # the official preprocessing keeps a study only if its report has >= 3 tokens


def _clean_sentences(text: str, joiner: str = " ") -> Tuple[str, int]:
    text = text.replace("\n", " ")
    out, count = [], 0
    for chunk in _ENUM.split(text):
        for sent in chunk.split("."):
            if not sent:
                continue
            sent = sent.replace("\ufffd\ufffd", " ")
            tokens = _WORD.findall(sent.lower())
            if len(tokens) <= 1:
                continue
            kept = [t.encode("ascii", "ignore").decode("ascii") for t in tokens]
            kept = [t for t in kept if t]
            out.append(" ".join(kept))
            count += len(kept)
    return joiner.join(out), count


def clean_report(impression: Optional[str], findings: Optional[str] = None, joiner: str = " ") -> Tuple[str, int]:
    """Return (cleaned text, token count).

    ``joiner=""`` replicates the official evaluation bug (docs/method.md §6.2.3)."""
    parts = [p for p in (impression, findings) if isinstance(p, str) and p.strip()]
    return _clean_sentences(" ".join(parts), joiner=joiner)


_SECTION = re.compile(r"^\s*([A-Z][A-Z /&()-]+):", re.M)


def split_sections(report: str) -> dict:
    """Split a MIMIC-CXR free-text report into its upper-case sections ("FINDINGS", "IMPRESSION", ...).

    Text before the first heading goes under "PREAMBLE". Keys are upper-case, values stripped.
    """
    sections, last, name = {}, 0, "PREAMBLE"
    for m in _SECTION.finditer(report):
        body = report[last:m.start()].strip()
        if body:
            sections[name] = (sections.get(name, "") + " " + body).strip()
        name, last = m.group(1).strip().upper(), m.end()
    body = report[last:].strip()
    if body:
        sections[name] = (sections.get(name, "") + " " + body).strip()
    return sections
