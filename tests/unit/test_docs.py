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


SCRIPT = re.compile(r"^(launch|data_tools)/[a-z_]+\.py$")
SUBCOMMANDS = {"launch/bench.py", "launch/sweep.py", "launch/wheelhouse.py"}


def documented_flags() -> dict:
    """{(script, subcommand or ''): {flag: "page:line"}} of every command line in a ```bash block of the README and
    the docs pages that runs a launch/ or data_tools/ script (continuation lines joined; what follows # dropped)."""
    out = {}
    for page in pages():
        text = open(page, encoding="utf-8").read()
        for block in re.finditer(r"```bash\n(.*?)```", text, flags=re.S):
            first_line = text[:block.start()].count("\n") + 2
            for n, line in enumerate(block.group(1).replace("\\\n", " \n").split("\n")):
                words = line.split("#")[0].replace("[", " ").replace("]", " ").split()
                at = next((i for i, w in enumerate(words) if SCRIPT.match(w)), None)
                if at is None:
                    continue
                script, rest = words[at], words[at + 1:]
                sub = rest[0] if script in SUBCOMMANDS and rest and not rest[0].startswith("-") else ""
                where = f"{os.path.relpath(page, ROOT)}:{first_line + n}"
                for w in rest:
                    if w.startswith("--"):
                        out.setdefault((script, sub), {}).setdefault(w.split("=")[0], where)
    return out


def test_every_flag_a_documented_command_uses_exists():
    """A flag renamed or removed in a script but still shown in the docs would fail for every reader who copies the
    line: each flag of each documented command is in that script's (or subcommand's) --help."""
    import subprocess
    import sys
    flags = documented_flags()
    assert ("launch/train.py", "") in flags or any(s == "launch/evaluate.py" for s, _ in flags), flags
    unknown = []
    for (script, sub), used in sorted(flags.items()):
        proc = subprocess.run([sys.executable, script, *([sub] if sub else []), "--help"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{script} {sub} --help: {proc.stderr[-2000:]}"
        known = set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", proc.stdout))
        unknown += [f"{where}: {script} {sub} {flag}".replace("  ", " ") for flag, where in used.items()
                    if flag not in known]
    assert not unknown, "documented flags the scripts do not have:\n" + "\n".join(unknown)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (word characters, spaces and hyphens stay),
    spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: str) -> set:
    text = re.sub(r"^```.*?^```", "", open(path, encoding="utf-8").read(), flags=re.S | re.M)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def test_every_anchor_of_a_link_is_a_heading_of_its_page():
    assert slug("Does the model draw its classes? `launch/probe.py`") == \
        "does-the-model-draw-its-classes-launchprobepy"
    assert slug("μP coordinate check") == "μp-coordinate-check" and slug("Fréchet distance") == "fréchet-distance"
    broken, seen = [], 0
    for page in pages():
        for target in LINK.findall(prose(open(page, encoding="utf-8").read())):
            if "#" not in target or re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue
            file, anchor = target.split("#", 1)
            path = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
            if path.endswith(".md") and os.path.exists(path):
                seen += 1
                if anchor not in anchors(path):
                    broken.append(f"{os.path.relpath(page, ROOT)} -> {target}")
    assert seen >= 20, seen
    assert not broken, "links to headings that do not exist:\n" + "\n".join(broken)
