"""The HTML splicer: what it finds, what it leaves, and that it never damages."""

from __future__ import annotations

import html as stdlib_html
from typing import NamedTuple

from hypothesis import given, settings
from hypothesis import strategies as st

from relay import html

HOST = "t.example.net"


def click(position: int, url: str) -> str:
    return f"https://{HOST}/c/L{position}"


class Rewritten(NamedTuple):
    text: str
    edits: list[html.Edit]
    links: list[str]
    scan: html.Scan


def rewrite(text: str, pixel: str | None = None) -> Rewritten:
    """What relay/rewrite.py does with an HTML part, on a str: ``html.scan``
    when planning, ``html.edits_for`` with every tracked link when rendering."""
    found = html.scan(text, HOST)
    links = [h.url for h in found.tracked]
    edits = html.edits_for(found, [click(i, url) for i, url in enumerate(links, 1)], pixel)
    return Rewritten(_apply(text, edits), edits, links, found)


def _apply(text: str, edits: list[html.Edit]) -> str:
    out, pos = [], 0
    for edit in edits:
        out += [text[pos : edit.start], edit.new]
        pos = edit.end
    return "".join([*out, text[pos:]])


def test_attribute_decoding_follows_html5_not_html_unescape() -> None:
    value = "https://x.example/?a=1&region=eu&copy=2&amp;b=3&lt&notit;&#x41;&#128;"
    assert stdlib_html.unescape(value) != html.decode_attribute(value)
    assert html.decode_attribute(value) == (
        "https://x.example/?a=1&region=eu&copy=2&b=3<&notit;A\u20ac"
    )
    assert html.decode_attribute("&amp") == "&"
    assert html.decode_attribute("&#0;&#xD800;&#1114112;") == "\ufffd" * 3


def test_region_parameter_survives() -> None:
    out = rewrite('<a href="https://shop.example/p?id=1&region=eu">x</a>')
    assert out.links == ["https://shop.example/p?id=1&region=eu"]
    assert out.text == f'<a href="https://{HOST}/c/L1">x</a>'


def test_only_href_values_change() -> None:
    text = (
        "<!DOCTYPE html><HTML><Body>\n"
        "<A HREF='https://a.example/1' class=x>one</A>\n"
        "<area shape=rect href=https://a.example/2 alt=''>\n"
        '<link rel=stylesheet href="https://a.example/style.css">\n'
        '<base href="https://a.example/">\n'
        '<img src="https://a.example/i.png">\n'
        '<div style="background:url(https://a.example/bg.png)"></div>\n'
        "</Body></HTML>"
    )
    out = rewrite(text)
    assert out.links == ["https://a.example/1", "https://a.example/2"]
    assert f"<A HREF='https://{HOST}/c/L1' class=x>" in out.text
    assert f"<area shape=rect href=https://{HOST}/c/L2 alt=''>" in out.text
    assert (
        out.text.replace(f"https://{HOST}/c/L1", "https://a.example/1").replace(
            f"https://{HOST}/c/L2", "https://a.example/2"
        )
        == text
    )


def test_skip_rules() -> None:
    hrefs = [
        "mailto:a@b.example",
        "tel:+1555",
        "sms:+1555",
        "#top",
        "javascript:void(0)",
        "data:text/html,x",
        "/relative/path",
        "//proto.example/relative",
        "https://x.example/{{ url }}",
        "https://x.example/*|ID|*",
        "https://x.example/%%link%%",
        "https://x.example/${id}",
        f"https://{HOST}/stop",
        "https://x.example/unsubscribe?u=1",
        "https://x.example/account/password-reset?t=1",
        "https://bucket.example/f?X-Amz-Signature=abc",
        "https://x.example/d?signature=abc",
        "https://x.example/d?expires=1700000000",
        "http:no-host",
    ]
    text = "".join(f'<a href="{h}">x</a>' for h in hrefs)
    out = rewrite(text, pixel="https://p.example/o.gif")
    assert out.links == []
    assert out.text == text + html.pixel_tag("https://p.example/o.gif")


def test_same_url_twice_gets_two_positions() -> None:
    out = rewrite('<a href="https://a.example/">1</a><a href="https://a.example/">2</a>')
    assert out.links == ["https://a.example/", "https://a.example/"]
    assert "/c/L1" in out.text
    assert "/c/L2" in out.text


def test_opt_out_markers_are_removed_and_link_kept() -> None:
    text = (
        '<a data-notrack href="https://a.example/1">1</a>'
        '<a href="https://a.example/2" clicktracking=off>2</a>'
        '<a ses:no-track href="https://a.example/3">3</a>'
        '<a href="https://a.example/4" disable-tracking="true">4</a>'
        '<a href="https://a.example/5" clicktracking="on">5</a>'
    )
    out = rewrite(text)
    assert out.links == ["https://a.example/5"]
    assert out.text == (
        '<a href="https://a.example/1">1</a>'
        '<a href="https://a.example/2">2</a>'
        '<a href="https://a.example/3">3</a>'
        '<a href="https://a.example/4">4</a>'
        f'<a href="https://{HOST}/c/L1" clicktracking="on">5</a>'
    )


def test_no_tracked_link_means_markers_stay_and_only_the_pixel_goes_in() -> None:
    text = '<a data-notrack href="https://a.example/1">1</a><a href="mailto:a@b.example">m</a>'
    out = rewrite(text, "https://p.example/o.gif")
    assert out.links == []
    assert out.text == text + html.pixel_tag("https://p.example/o.gif")


def test_vml_button_in_conditional_comment() -> None:
    text = (
        "<body><!--[if mso]>\n"
        '<v:roundrect xmlns:v="urn:schemas-microsoft-com:vml" href="https://a.example/b?x=1&amp;y=2"'
        ' style="height:40px"><w:anchorlock/><center>Go</center></v:roundrect>\n'
        "<![endif]--><!--[if !mso]><!-->"
        '<a href="https://a.example/b?x=1&amp;y=2">Go</a><!--<![endif]-->'
        '<!-- a plain comment <a href="https://a.example/hidden">no</a> --></body>'
    )
    out = rewrite(text)
    assert out.links == ["https://a.example/b?x=1&y=2", "https://a.example/b?x=1&y=2"]
    assert f'href="https://{HOST}/c/L1"' in out.text.split("<![endif]-->")[0]
    assert "https://a.example/hidden" in out.text


def test_script_style_and_textarea_are_not_markup() -> None:
    text = (
        "<script>var s = '<a href=\"https://a.example/js\">';</script>"
        "<style>a[href^='<a href=x>'] {}</style>"
        "<textarea><a href='https://a.example/ta'></textarea>"
        "<title><a href=https://a.example/t></title>"
        '<a href="https://a.example/real">r</a>'
    )
    assert rewrite(text).links == ["https://a.example/real"]


def test_pixel_goes_before_the_last_body_then_html_then_end() -> None:
    pixel = html.pixel_tag("https://p.example/o.gif")
    text = "<body>a</body><!-- </body> --></BODY >tail"
    assert rewrite(text, "https://p.example/o.gif").text == (
        f"<body>a</body><!-- </body> -->{pixel}</BODY >tail"
    )
    assert rewrite("<p>x</p></html>", "https://p.example/o.gif").text == f"<p>x</p>{pixel}</html>"
    assert rewrite("<p>x", "https://p.example/o.gif").text == f"<p>x{pixel}"
    assert pixel.startswith('<img src="https://p.example/o.gif" width="1" height="1" alt=""')
    assert 'border="0"' in pixel


def test_whitespace_in_href_is_what_browsers_strip() -> None:
    out = rewrite('<a href="  https://a.example/x\n/y  ">x</a>')
    assert out.links == ["https://a.example/x/y"]


def test_disagreement_with_the_parser_leaves_links_alone() -> None:
    # an unterminated quoted attribute: HTML5 drops the tag at EOF, the splicer
    # reads a different href; selectolax notices and links stay untouched.
    text = '<p><a href="https://a.example/ok">ok</a><template><a href="https://a.example/t">'
    text += "t</a></template></p></body>"
    out = rewrite(text, "https://p.example/o.gif")
    assert not out.scan.agreed
    assert out.links == []
    assert out.text == text.replace(
        "</body>", html.pixel_tag("https://p.example/o.gif") + "</body>"
    )


def test_duplicate_href_attribute_first_wins() -> None:
    out = rewrite('<a href="https://a.example/1" href="https://a.example/2">x</a>')
    assert out.links == ["https://a.example/1"]


# --- properties ---------------------------------------------------------------------

_pieces = st.sampled_from(
    [
        "<a href=",
        "<a href='https://a.example/x'>",
        '<a href="https://a.example/?a=1&region=2">',
        "<area href=https://b.example/>",
        "<!--",
        "-->",
        "<!--[if mso]>",
        "<![endif]-->",
        '<v:roundrect href="https://c.example/v">',
        "<script>",
        "</script>",
        "</body>",
        "</html>",
        "<",
        ">",
        '"',
        "'",
        "&amp;",
        "&",
        " data-notrack ",
        "</a>",
        "<p>",
        "text",
    ]
)
_documents = st.lists(st.one_of(_pieces, st.text(max_size=8)), max_size=30).map("".join)


def _outside(text: str, spans: list[tuple[int, int]]) -> str:
    pieces, pos = [], 0
    for start, end in spans:
        pieces.append(text[pos:start])
        pos = end
    return "".join([*pieces, text[pos:]])


def _check_only_hrefs_and_pixel(text: str, out: Rewritten, pixel: str) -> None:
    """Output minus the new spans == input minus the old spans, and every edit
    is a tracked href, the pixel, or a removed opt-out marker."""
    old_spans, new_spans, pos_shift = [], [], 0
    tracked = iter(out.links)
    for edit in out.edits:
        old_spans.append((edit.start, edit.end))
        start = edit.start + pos_shift
        new_spans.append((start, start + len(edit.new)))
        pos_shift += len(edit.new) - (edit.end - edit.start)
        old = text[edit.start : edit.end]
        if edit.new == pixel:
            assert old == ""
        elif edit.new == "":
            assert old.strip(" \t\n\f\r/").lower().startswith(html._OPT_OUT)
        else:
            assert edit.new.startswith(f"https://{HOST}/c/L")
            assert html.clean_url(html.decode_attribute(old)) == next(tracked)
        assert out.text[new_spans[-1][0] : new_spans[-1][1]] == edit.new
    assert next(tracked, None) is None
    assert _outside(out.text, new_spans) == _outside(text, old_spans)
    assert out.text.count(pixel) == text.count(pixel) + 1


@settings(max_examples=300, deadline=None)
@given(_documents)
def test_splicer_never_raises_and_changes_only_hrefs_and_pixel(text: str) -> None:
    out = rewrite(text, "https://p.example/o.gif")
    _check_only_hrefs_and_pixel(text, out, html.pixel_tag("https://p.example/o.gif"))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_splicer_never_raises_on_any_text(text: str) -> None:
    out = rewrite(text, "https://p.example/o.gif")
    _check_only_hrefs_and_pixel(text, out, html.pixel_tag("https://p.example/o.gif"))
