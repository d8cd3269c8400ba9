"""Listing descriptions rendered for the website: Markdown works, every XSS payload is inert."""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from registry_server.render import render_markdown, render_text

ALLOWED_TAGS = {
    "p", "br", "strong", "em", "code", "pre", "blockquote", "ul", "ol", "li", "a", "hr",
    "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td",
}  # fmt: skip
REL = "nofollow noopener noreferrer"


class _Audit(HTMLParser):
    """Collects every tag, attribute and comment of the rendered HTML."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.comments: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_comment(self, data: str) -> None:
        self.comments.append(data)


def assert_inert(out: str) -> _Audit:
    """Only allowlisted tags; only href/title/rel on links; hrefs http(s)/mailto only."""
    lowered = out.lower()
    assert "<script" not in lowered
    assert "<img" not in lowered
    assert "<!--" not in out
    # Escaped text (and quoted, escaped attribute values) may mention a payload; no tag may.
    for tag in re.findall(r"<[^>]*>", out):
        bare = re.sub(r'"[^"]*"', '""', tag)
        assert not re.search(r"on\w+\s*=|javascript:|vbscript:|data:|style|src", bare, re.I)
    audit = _Audit()
    audit.feed(out)
    audit.close()
    assert not audit.comments
    for tag, attrs in audit.tags:
        assert tag in ALLOWED_TAGS, tag
        if tag == "a":
            assert set(attrs) <= {"href", "title", "rel"}, attrs
            assert attrs.get("rel") == REL
            href = attrs.get("href")
            if href is not None:
                assert re.match(r"(https?://|mailto:)", href), href
        else:
            assert not attrs, (tag, attrs)
    return audit


PAYLOADS = [
    "<script>alert(1)</script>",
    "<SCRIPT SRC=//127.0.0.2/x.js></SCRIPT>",
    "<img src=x onerror=alert(1)>",
    '<img src="javascript:alert(1)">',
    "<svg onload=alert(1)>",
    "<svg><script>alert(1)</script></svg>",
    '<iframe src="javascript:alert(1)"></iframe>',
    '<p style="background:url(javascript:alert(1))">x</p>',
    '<a href="#" onclick="alert(1)">x</a>',
    "<body onload=alert(1)>",
    "<!-- <script>alert(1)</script> -->",
    "<div><!--x--></div>",
    "[x](javascript:alert(1))",
    "[x](JaVaScRiPt:alert(1))",
    "[x]( javascript:alert(1) )",
    "[x](<javascript:alert(1)>)",
    "[x](vbscript:msgbox(1))",
    "[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "[x](&#106;avascript:alert(1))",
    "[x](&#x6A;&#x61;vascript&#58;alert(1))",
    "[x](java%0ascript:alert(1))",
    "[x](java\tscript:alert(1))",
    "[x](javascript&colon;alert(1))",
    "<javascript:alert(1)>",
    "<JAVASCRIPT:alert(1)>",
    "<vbscript:msgbox(1)>",
    "<data:text/html,<script>alert(1)</script>>",
    "[r]: javascript:alert(1)\n\n[click][r]",
    "[r]: javascript:alert(1)\n\n[r]",
    "[[x](javascript:alert(1))](https://127.0.0.1)",
    '[x](https://127.0.0.1 "a" onmouseover="alert(1)")',
    '[x](https://127.0.0.1 "\\" onmouseover=alert(1) x=\\"")',
    "![x](https://127.0.0.2/track.png)",
    "![x](javascript:alert(1))",
    '![x" onerror="alert(1)](https://127.0.0.2/a.png)',
    "[![x](https://127.0.0.2/a.png)](https://127.0.0.1)",
    "```\n<script>alert(1)</script>\n```",
    "`<img src=x onerror=alert(1)>`",
    "| a | b |\n|:-|-:|\n| <script>x</script> | [y](javascript:1) |",
    "[x](//127.0.0.2/)",
    "[x](/relative)",
    "<a href=javascript:alert(1)>x</a>",
    "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>",
    "\u202e<script>alert(1)</script>\u202c",
    "\x1b]8;;javascript:alert(1)\x07x\x1b]8;;\x07",
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_xss_payload_is_inert(payload: str) -> None:
    assert_inert(render_markdown(payload))


@pytest.mark.parametrize("payload", PAYLOADS)
def test_xss_payload_is_inert_inside_markdown(payload: str) -> None:
    text = f"# Title\n\n> quote {payload}\n\n- item {payload}\n\n**{payload}**"
    assert_inert(render_markdown(text))


def test_raw_html_is_shown_as_text() -> None:
    out = render_markdown("<b>bold</b>")
    assert "&lt;b&gt;bold&lt;/b&gt;" in out
    assert "<b>" not in out


def test_markdown_renders() -> None:
    text = (
        "# Title\n\n## Section\n\n###### Deep\n\nSome **bold**, *em* and `code`.\n\n"
        "- one\n- two\n\n1. first\n2. second\n\n> quoted\n\n```\nx = 1 < 2\n```\n\n---\n\n"
        "| a | b |\n|---|---|\n| 1 | 2 |\n"
    )
    out = render_markdown(text)
    audit = assert_inert(out)
    assert "<h2>Title</h2>" in out  # headings move one level down
    assert "<h3>Section</h3>" in out
    assert "<h6>Deep</h6>" in out
    assert "<h1" not in out
    assert "<strong>bold</strong>" in out and "<em>em</em>" in out
    assert "<code>code</code>" in out
    assert "<ul>" in out and "<ol>" in out and out.count("<li>") == 4
    assert "<blockquote>" in out
    assert "<pre><code>x = 1 &lt; 2\n</code></pre>" in out
    assert "<hr>" in out or "<hr />" in out
    assert {"table", "thead", "tbody", "tr", "th", "td"} <= {tag for tag, _ in audit.tags}


def test_links_get_rel_and_keep_title() -> None:
    out = render_markdown('[site](https://127.0.0.1/a?b=1&c=2 "Home") <mailto:x@localhost>')
    audit = assert_inert(out)
    links = [attrs for tag, attrs in audit.tags if tag == "a"]
    assert links == [
        {"href": "https://127.0.0.1/a?b=1&c=2", "title": "Home", "rel": REL},
        {"href": "mailto:x@localhost", "rel": REL},
    ]


def test_bare_urls_are_not_linked() -> None:
    out = render_markdown("see https://127.0.0.1 now")
    assert "<a" not in out


def test_relative_and_other_scheme_links_lose_href() -> None:
    for text in ("[x](/relative)", "[x](//127.0.0.2/)", "[x](ftp://127.0.0.1/)"):
        audit = assert_inert(render_markdown(text))
        assert [attrs for tag, attrs in audit.tags if tag == "a"] == [{"rel": REL}], text


def test_image_becomes_alt_text() -> None:
    out = render_markdown("![a <b> chart](https://127.0.0.2/x.png)")
    assert_inert(out)
    assert "127.0.0.2" not in out
    assert "a &lt;b&gt; chart" in out


def test_invisible_characters_removed() -> None:
    out = render_markdown("a\u202eb\u200bc\x1b[31md\x07")
    assert out == "<p>abcd</p>\n"


def test_too_long_refused_before_parsing() -> None:
    assert render_markdown("x" * 100, max_chars=100) == "<p>" + "x" * 100 + "</p>\n"
    with pytest.raises(ValueError):
        render_markdown("x" * 101, max_chars=100)
    with pytest.raises(ValueError):
        render_markdown("[" * 50_001)


def test_not_text_refused() -> None:
    with pytest.raises(ValueError):
        render_markdown(b"# hi")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        render_text(None)  # type: ignore[arg-type]


def test_pathological_nesting_is_bounded() -> None:
    assert_inert(render_markdown("> " * 5_000 + "x"))
    assert_inert(render_markdown("*" * 10_000 + "x" + "*" * 10_000))
    assert_inert(render_markdown("[" * 10_000 + "](javascript:1)"))


def test_render_text_escapes_and_keeps_lines() -> None:
    out = render_text('a <script>"x"</script> & b\nline\u202e two\r\nthree\x1b[2J')
    assert out == ("a &lt;script&gt;&quot;x&quot;&lt;/script&gt; &amp; b<br>line two<br>three")
    assert render_text("") == ""
    with pytest.raises(ValueError):
        render_text("x" * 11, max_chars=10)


def test_import_does_not_load_torch() -> None:
    code = "import sys, registry_server.render; assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
