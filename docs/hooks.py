"""MkDocs hook: the *Spec reference* page is generated from the spec's pydantic models
(``search.spec.reference``) at every build, so it cannot drift from what ``search run`` loads."""

from __future__ import annotations

from typing import Any


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if page.file.src_uri == "spec-reference.md":
        from search.spec.reference import spec_reference

        return spec_reference()
    return markdown
