"""A Griffe extension for the API reference: read Hugging Face-style argument lines as plain Google style.

sam_hf documents arguments the way transformers does: ``name (`type`, *optional*, defaults to X): text``. A
Google-style parser takes everything in the parentheses as the type, so the reference would show the backticks and
asterisks verbatim. Before Griffe parses a docstring, this rewrites such lines to ``name (type): text``, and lines
whose parentheses hold no type (``name (*optional*): text``) to ``name: text``. The default value is shown from the
signature, so nothing is lost. Only the text Griffe reads is changed, never the source files.

Enabled in `mkdocs.yml` under the python handler's `extensions`.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# An indented "name (spec): text" line; the spec must look HF-style (backticks or *optional*) to be rewritten.
_ITEM = re.compile(r"^(?P<indent>[ \t]+)(?P<name>\*{0,2}[A-Za-z_]\w*) \((?P<spec>[^\n]*?)\):(?P<rest>[ \t].*|)$")


def _plain_type(spec: str) -> str | None:
    """The type of an HF-style spec (`None` if it has none), or the spec unchanged if it is not HF-style."""
    if "`" not in spec and "*optional*" not in spec:
        return spec
    head = re.split(r",\s*\*optional\*|,\s*defaults to\b", spec, maxsplit=1)[0].strip()
    if head in ("", "*optional*"):
        return None
    return head.replace("`", "").replace(" or ", " | ").strip()


def rewrite(text: str) -> str:
    """Rewrite the HF-style argument lines of one docstring."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        match = _ITEM.match(line)
        if not match:
            continue
        kind = _plain_type(match["spec"])
        if kind == match["spec"]:
            continue
        annotation = f" ({kind})" if kind else ""
        lines[i] = f"{match['indent']}{match['name']}{annotation}:{match['rest']}"
    return "\n".join(lines)


class HFStyleDocstrings(griffe.Extension):
    """Rewrite HF-style argument lines of every docstring before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
