"""`mctool docs`: the pages that help texts and messages cite, readable offline."""

import re
from pathlib import Path

import pytest

from mctool import manual

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted(p.stem for p in (ROOT / "docs").glob("*.md"))


def test_the_list_names_every_page_with_its_title(cli):
    r = cli.json("docs")
    assert [d["name"] for d in r["documents"]] == PAGES and r["text"] is None and r["section"] is None
    assert {d["name"]: d["title"] for d in r["documents"]}["method"] == "The method"
    assert all(Path(d["path"]) == ROOT / "docs" / f"{d['name']}.md" for d in r["documents"])
    out = cli("docs").stdout
    assert all(name in out for name in PAGES) and "Command reference" in out
    assert cli("docs", "--path").stdout.strip() == str(ROOT / "docs")


@pytest.mark.parametrize("topic", ["method.md#bn", "docs/method.md#bn", "./docs/method.md#bn", "method#bn",
                                   "Method.md#BN", "docs/METHOD#bn"])  # (case as a user may type it)
def test_a_section_as_help_texts_cite_it(cli, topic):
    r = cli.json("docs", topic)
    assert r["section"] == "bn" and [d["name"] for d in r["documents"]] == ["method"]
    assert r["text"].startswith("## 3. BatchNorm recalibration\n")
    assert "## 4." not in r["text"] and "## 2." not in r["text"] and "reset the running mean" in r["text"]
    out = cli("docs", topic).stdout
    assert "3. BatchNorm recalibration" in out and '<a id="' not in out and "4. Evaluating a curve" not in out
    assert cli("docs", topic, "--path").stdout.strip() == str(ROOT / "docs" / "method.md")


def test_a_whole_page_and_a_heading_anchor(cli):
    whole = cli.json("docs", "hessian")
    assert whole["text"] == (ROOT / "docs" / "hessian.md").read_text(encoding="utf-8") and whole["section"] is None
    # GitHub's anchor of a heading, as help texts cite some: lower case, punctuation dropped, hyphens
    r = cli.json("docs", "performance.md#many-networks-in-one-pass")
    assert r["text"].splitlines()[0].lstrip("#").strip().lower() == "many networks in one pass"


def test_every_page_and_section_the_code_cites_exists():
    """Help texts and messages say 'see docs/X.md#y': each such page and section is one `mctool docs` shows."""
    cited = set()
    for source in (ROOT / "mctool").glob("*.py"):
        cited |= set(re.findall(r"\b([a-z][a-z-]*\.md(?:#[a-z0-9-]+)?)", source.read_text(encoding="utf-8")))
    assert len(cited) > 20
    for topic in sorted(cited):
        r = manual.read_docs(topic)
        assert r.text, topic


def test_headings_in_code_blocks_are_not_sections():
    text = "# Page\n\n## One\n\n```bash\n# a shell comment\nmctool train\n```\n\nmore\n\n## Two\n\nlast\n"
    assert manual.section(text, "one", "page") == "## One\n\n```bash\n# a shell comment\nmctool train\n```\n\nmore\n"
    with pytest.raises(manual.ConfigError, match="no section 'a-shell-comment' in page.md; its sections: one, two"):
        manual.section(text, "a-shell-comment", "page")
    assert manual.slug("Training a curve (`connect`)") == "training-a-curve-connect"


@pytest.mark.parametrize("topic, message", [
    ("nope", "no page 'nope' in the documentation; the pages: align, cli,"),
    ("method.md#nope", "no section 'nope' in method.md; its sections: curves, training, bn,"),
    ("../README", "no page '../README' in the documentation"),
    ("/etc/passwd", "no page '/etc/passwd' in the documentation"),
])
def test_an_unknown_page_or_section_is_one_error_line(cli, topic, message):
    assert message in cli.error("docs", topic)


def test_fences_and_headings_as_commonmark_reads_them():
    """A fence closes only with a run of its own character as long as its opening and nothing after it (a
    ```` block may show ``` lines; a ```bash line inside a block is text); headings may be indented by up to 3
    spaces; a closing run of #s follows a space; indented code (4 spaces) holds no heading."""
    text = ("# Page\n\n## One\n\n````markdown\n```bash\n# in the example\n```\n````\n\n```\ncode\n```bash\n"
            "# still code\n```\n\n   ## Two ##\n\n    # indented code\n\n### C#\n")
    heads = manual._headings(text)
    assert [(level, heading) for _, (level, heading, _) in heads] == [(1, "Page"), (2, "One"), (2, "Two"), (3, "C#")]
    assert manual.section(text, "one", "page").endswith("# still code\n```\n")
    assert manual.section(text, "c", "page") == "### C#\n"


def test_a_repeated_heading_has_githubs_numbered_anchor():
    text = "# Page\n\n## Example\n\none\n\n## Example\n\ntwo\n\n## Example\n\nthree\n"
    assert manual.section(text, "example", "page") == "## Example\n\none\n"
    assert manual.section(text, "example-1", "page") == "## Example\n\ntwo\n"
    assert manual.section(text, "example-2", "page") == "## Example\n\nthree\n"


def test_a_table_cell_folds_a_word_too_long_for_its_column(cli):
    """Rich cut such a word with an ellipsis (11 of them in `mctool docs cli` at 80 columns: option values,
    file names); the reader needs it whole."""
    import io

    from rich.console import Console

    from mctool.manual import terminal_markdown

    word = "synthetic:size=32,channels=3,classes=10,train=50000,test=10000"
    out = io.StringIO()
    Console(file=out, width=40, color_system=None).print(
        terminal_markdown(f"| option | meaning |\n|---|---|\n| `--dataset` | {word} |\n"))
    text = out.getvalue()
    assert "…" not in text and word in "".join(text.split()), text
    assert "…" not in cli("docs", "cli").stdout
