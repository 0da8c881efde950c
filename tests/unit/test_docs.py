"""The documentation holds together: the README stays short, every relative link and image of the README and the
docs pages points to a file that exists, and every file docs/architecture.md's concept → file map names exists."""
import glob
import os
import re

from tiny import ROOT

DOCS = os.path.join(ROOT, "docs")
PACKAGE = os.path.join(ROOT, "dit_scale")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def pages() -> list:
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(DOCS, "*.md")))


def prose(text: str) -> str:
    """`text` without its fenced code blocks and inline code (a link shown as code is not a link)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def relative_links(path: str) -> list:
    """The targets of every relative link and image of a Markdown file, without their #anchors."""
    out = []
    for target in LINK.findall(prose(open(path, encoding="utf-8").read())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue                                     # https:, mailto:, a heading of the same page
        out.append(target.split("#")[0])
    return out


def test_the_readme_fits_on_a_few_screens():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move the details to a docs/ page"


def test_every_relative_link_and_image_exists():
    missing = []
    for page in pages():
        for target in relative_links(page):
            if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(page), target))):
                missing.append(f"{os.path.relpath(page, ROOT)} -> {target}")
    assert not missing, "links to files that do not exist:\n" + "\n".join(missing)


def test_the_docs_link_checker_sees_links():
    readme = relative_links(os.path.join(ROOT, "README.md"))
    assert "docs/quickstart_samples.png" in readme and "docs/architecture.md" in readme, readme


def concept_map_files() -> list:
    """The paths the `## Concept → file` table of docs/architecture.md names in its file column."""
    text = open(os.path.join(DOCS, "architecture.md"), encoding="utf-8").read()
    table = text[text.index("## Concept → file"):]
    table = table[:table.index("\n## ", 1)] if "\n## " in table[1:] else table
    out = []
    for row in table.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) < 2 or not row.startswith("|") or set(cells[1]) <= set("-: "):
            continue
        for code in re.findall(r"`([^`]+)`", cells[-1]):
            word = code.split()[0]
            if "/" in word or word.endswith(".py"):
                out.append(word)
    return out


def test_every_file_of_the_concept_map_exists():
    files = concept_map_files()
    assert len(files) >= 30, files                       # the table was found and read
    missing = [f for f in files if not any(os.path.exists(os.path.join(base, f)) for base in (PACKAGE, ROOT))]
    assert not missing, f"docs/architecture.md's concept → file map names files that do not exist: {missing}"


def layout_files() -> list:
    """The paths the `## Layout` tree of docs/architecture.md names (a `.py` file or a `folder/`), relative to the
    repository root: entries indented under `dit_scale/` (or another folder) are inside it."""
    text = open(os.path.join(DOCS, "architecture.md"), encoding="utf-8").read()
    tree = text[text.index("## Layout"):]
    tree = tree[tree.index("```\n") + 4:]
    tree = tree[:tree.index("```")]
    out, parents = [], []                                # parents: (indent, folder) of the enclosing folders
    for line in tree.splitlines():
        m = re.match(r"^( *)(\S+)", line)
        if not m or not (m.group(2).endswith(".py") or m.group(2).endswith("/")):
            continue
        indent, name = len(m.group(1)), m.group(2)
        parents = [(i, p) for i, p in parents if i < indent]
        path = "".join(p for _, p in parents) + name
        out.append(path)
        if name.endswith("/"):
            parents.append((indent, name))
    return out


def test_every_file_of_the_layout_exists():
    files = layout_files()
    assert "dit_scale/models/moe.py" in files and "launch/" in files, files
    missing = [f for f in files if not os.path.exists(os.path.join(ROOT, f))]
    assert not missing, f"docs/architecture.md's layout names files that do not exist: {missing}"
