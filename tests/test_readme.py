"""The README is a user's guide that stays true: short, its links, configs, make targets and fastkd commands
exist, and every number in its results tables comes from the results file linked beside it.

Reads text only (no torch): fast, and runs anywhere.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
RESULTS = ROOT / "benchmarks" / "results"
PAGES = [README, *DOCS]
MAX_README_LINES = 300

FENCE = re.compile(r"^(```|~~~)([^\n]*)\n.*?^\1[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
MACHINE_PATHS = re.compile(r"(?<![\w.])/(?:work|root|tmp)/")
NUMBER = re.compile(r"(?<![\w.])\d+\.\d+(?![\d])")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose(text: str) -> str:
    """The text without its fenced code blocks (links and headings there are code, not Markdown)."""
    return FENCE.sub("", text)


def code_lines(text: str):
    """Inline code spans and the lines of fenced blocks that are not Python: where commands are written."""
    for m in FENCE.finditer(text):
        if m.group(2).strip().lower() not in ("python", "py"):
            yield from m.group(0).splitlines()[1:-1]
    for m in INLINE_CODE.finditer(prose(text)):
        yield m.group(1)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", lambda m: "_" if m.group(0) == "_" else "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set:
    text = prose(page.read_text())
    seen: dict = {}
    out = set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        s = slug(h)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines, at most {MAX_README_LINES}: move detail to docs/"


def test_docs_exist_and_readme_links_each():
    assert DOCS, "docs/ has no .md page"
    linked = {(README.parent / t.split("#")[0]).resolve() for t in LINK.findall(prose(README.read_text()))}
    unlinked = [rel(p) for p in DOCS if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link {unlinked}"


@pytest.mark.parametrize("page", PAGES + sorted(RESULTS.glob("*.md")), ids=rel)
def test_relative_links_resolve(page):
    bad = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):          # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no heading #{anchor} in {rel(dest)})")
    assert not bad, f"{rel(page)}: broken links: {bad}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_named_configs_exist(page):
    text = page.read_text()
    missing = [p for p in set(re.findall(r"configs/[\w./-]+?\.(?:yaml|json|example)\b", text))
               if not (ROOT / p).is_file()]
    shipped = {p.name for p in (ROOT / "configs").rglob("*") if p.is_file()}
    missing += [n for n in set(re.findall(r"`([a-z0-9][\w.-]*\.yaml)`", text)) if n not in shipped]
    assert not missing, f"{rel(page)} names configs that do not exist: {sorted(missing)}"


def make_targets() -> set:
    text = (ROOT / "Makefile").read_text()
    return {t for t in re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_named_make_targets_exist(page):
    targets = make_targets()
    assert {"demo", "test", "setup"} <= targets, f"Makefile targets not parsed: {sorted(targets)}"
    named = {m.group(1) for line in code_lines(page.read_text())
             for m in re.finditer(r"(?:^|[;&|(]\s*)\s*make\s+([a-z][\w.-]*)", line)
             if "=" not in m.group(1)}
    assert named <= targets, f"{rel(page)} names make targets the Makefile lacks: {sorted(named - targets)}"


def cli_subcommands() -> set:
    """The names given to add_parser on fastkd's top-level subparsers: in fastkd/cli.py, and in every
    `add_parser(subparsers)` hook a package contributes (the data CLI's)."""
    names = set()
    for path in (ROOT / "fastkd").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        receivers = set()
        if path.name == "cli.py" and path.parent.name == "fastkd":
            for node in ast.walk(tree):
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) \
                        and getattr(node.value.func, "attr", None) == "add_subparsers" \
                        and isinstance(node.value.func.value, ast.Name) and node.value.func.value.id == "p":
                    receivers |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef) and fn.name == "add_parser" and fn.args.args:
                receivers.add(fn.args.args[0].arg)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_parser" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in receivers \
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_named_fastkd_commands_exist(page):
    subs = cli_subcommands()
    assert {"train", "eval", "demo", "data"} <= subs, f"fastkd subcommands not parsed: {sorted(subs)}"
    named = set()
    for line in code_lines(page.read_text()):
        named |= set(re.findall(r"(?:^|[;&|(]\s*|\s\$\s*)\s*fastkd\s+([a-z][\w-]*)", line))
        named |= set(re.findall(r"--module\s+fastkd\.cli\s+([a-z][\w-]*)", line))
    assert named <= subs, f"{rel(page)} names fastkd commands cli.py lacks: {sorted(named - subs)}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_no_machine_specific_paths(page):
    hits = [line.strip() for line in page.read_text().splitlines() if MACHINE_PATHS.search(line)]
    assert not hits, f"{rel(page)} names paths of one machine: {hits}"


def results_rows():
    """Every row of a README table that holds a decimal number (a measured value), with its line number."""
    for i, line in enumerate(README.read_text().splitlines(), 1):
        if line.lstrip().startswith("|") and not re.fullmatch(r"[\s|:-]+", line):
            cells = line.strip().strip("|").split("|")
            if any(NUMBER.search(LINK.sub("", c)) for c in cells):
                yield i, line


def test_readme_has_results_tables():
    rows = list(results_rows())
    sources = {t for _, line in rows for t in LINK.findall(line) if t.startswith("benchmarks/results/")}
    assert len(rows) >= 12 and len(sources) >= 3, \
        f"README.md: expected the three demos' results tables, found {len(rows)} rows from {sorted(sources)}"


def test_every_number_in_a_results_table_comes_from_its_linked_file():
    bad = []
    for i, line in results_rows():
        sources = [t.split("#")[0] for t in LINK.findall(line) if t.startswith("benchmarks/results/")]
        if not sources:
            bad.append(f"line {i}: no link to a benchmarks/results/ file: {line.strip()}")
            continue
        text = "\n".join((ROOT / s).read_text() for s in sources if (ROOT / s).is_file())
        for number in NUMBER.findall(LINK.sub("", line)):
            if not re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", text):
                bad.append(f"line {i}: {number} is not in {sources}")
    assert not bad, "README.md results tables:\n" + "\n".join(bad)
