"""A listing's text made safe to show on the registry website.

A description is Markdown its host wrote: it is parsed as CommonMark (plus tables) with raw
HTML off, then the HTML is cleaned again by an allowlist sanitizer, so a parser slip cannot
reach the page. Images are not rendered (their alt text is kept): a page must not fetch
anything a listing names. Links keep only absolute ``http``, ``https`` and ``mailto`` URLs
and get ``rel="nofollow noopener noreferrer"``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import nh3
from markdown_it import MarkdownIt
from markdown_it.token import Token

from duet_p2p.text import printable

MAX_CHARS = 50_000
_TAGS = frozenset(
    {"p", "br", "strong", "em", "code", "pre", "blockquote", "ul", "ol", "li", "a", "hr"}
    | {"h2", "h3", "h4", "h5", "h6"}
    | {"table", "thead", "tbody", "tr", "th", "td"}
)
_ATTRIBUTES = {"a": {"href", "title"}}
_URL_SCHEMES = frozenset({"http", "https", "mailto"})
_LINK_REL = "nofollow noopener noreferrer"
_HEADINGS = {f"h{level}": f"h{min(level + 1, 6)}" for level in range(1, 7)}


def _image_as_text(renderer: Any, tokens: Sequence[Token], idx: int, options: Any, env: Any) -> str:
    """An image becomes its alt text (escaped): the page fetches nothing."""
    return html.escape(tokens[idx].content)


def _parser() -> MarkdownIt:
    """CommonMark with tables; no raw HTML, no linkify, no typographer."""
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    md.enable("table")
    md.add_render_rule("image", _image_as_text)
    return md


_MARKDOWN = _parser()


def render_markdown(text: str, *, max_chars: int = MAX_CHARS) -> str:
    """A Markdown ``text`` as sanitized HTML; ``ValueError`` if not a str or too long.

    Control, bidi and invisible characters are removed first; headings move one level down
    (``#`` becomes ``h2``) so a listing cannot outrank the page's own title.
    """
    if not isinstance(text, str):
        raise ValueError("a description must be text")
    if len(text) > max_chars:
        raise ValueError(f"a description is at most {max_chars} characters")
    cleaned = printable(text, max(1, len(text)), multiline=True)
    tokens = _MARKDOWN.parse(cleaned)
    for token in tokens:
        if token.type in ("heading_open", "heading_close"):
            token.tag = _HEADINGS.get(token.tag, "h6")
    rendered = _MARKDOWN.renderer.render(tokens, _MARKDOWN.options, {})
    return nh3.clean(
        rendered,
        tags=set(_TAGS),
        attributes={tag: set(names) for tag, names in _ATTRIBUTES.items()},
        url_schemes=set(_URL_SCHEMES),
        url_relative="deny",
        link_rel=_LINK_REL,
        strip_comments=True,
    )


def render_text(text: str, *, max_chars: int = MAX_CHARS) -> str:
    """Plain ``text`` as HTML: invisible characters removed, escaped, lines joined by ``<br>``."""
    if not isinstance(text, str):
        raise ValueError("text must be a str")
    if len(text) > max_chars:
        raise ValueError(f"text is at most {max_chars} characters")
    if not text:
        return ""
    cleaned = printable(text, len(text), multiline=True)
    return "<br>".join(html.escape(line) for line in cleaned.split("\n"))
