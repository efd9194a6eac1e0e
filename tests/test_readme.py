"""The README points into the code as `name` (`file.py:N`): each such place must still hold the
definition of `name` (a def, a class or an assignment), so the guide cannot drift from the code."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = re.compile(r"`([\w.]+)`(?:,\s*|\s*\()`([\w/]+\.py):(\d+)`")     # `name` (`f.py:N`) or `name`, `f.py:N`


def test_readme_references_point_at_their_definitions():
    text = open(os.path.join(ROOT, "README.md")).read()
    refs = REF.findall(text)
    assert len(refs) >= 30, f"only {len(refs)} references found: has the README's format changed?"
    wrong = []
    for name, path, line in refs:
        name = name.split(".")[-1]                               # Sampler.generate: generate
        lines = open(os.path.join(ROOT, path)).read().split("\n")
        at = lines[int(line) - 1] if int(line) <= len(lines) else ""
        if not re.match(rf"\s*(def|class)\s+{name}\b|{name}\s*=", at):
            wrong.append(f"{name} ({path}:{line}): that line is {at.strip()[:60]!r}")
    assert not wrong, "README references that moved:\n" + "\n".join(wrong)


def test_readme_stage_table_is_the_code_s():
    """Each row of the README's stage table reads and writes what train.STAGES says."""
    import train
    text = open(os.path.join(ROOT, "README.md")).read()
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \| .+? \| (.+?) \|$", text, re.M)
    assert [r[0] for r in rows] == train.DEFAULT_STAGES
    for name, reads, writes in rows:
        _, want_reads, want_writes = train.STAGES[name]
        cell = lambda names: ", ".join(names) or "-"
        assert (reads.replace("`", ""), writes.replace("`", "")) == (cell(want_reads), cell(want_writes)), name


def test_no_file_names_documents_outside_the_repository():
    """A fork has this repository only: the code and docs cite papers, not notes kept elsewhere.
    Every Markdown file they name is one of the repository's or one a run writes (results.md), and
    no path climbs out of the repository."""
    skip = {".git", ".venv", "runs", "out", "__pycache__", ".pytest_cache"}
    walk = [(d, files) for d, _, files in os.walk(ROOT) if not set(os.path.relpath(d, ROOT).split(os.sep)) & skip]
    ours = {f for _, files in walk for f in files if f.endswith(".md")} | {"results.md"}
    for d, files in walk:
        for f in files:
            path = os.path.join(d, f)
            text_file = f.endswith((".py", ".md", ".txt", ".toml", ".json", ".sh")) or f in ("Makefile", "run")
            if not text_file or os.path.getsize(path) > 1 << 20:
                continue
            text = open(path, encoding="utf-8", errors="replace").read()
            named = set(re.findall(r"[A-Za-z_][\w.-]*\.md\b", text)) - ours
            assert not named and not re.search(r"\.\./\w", text), f"{path} cites a document outside the repository"


def test_no_module_of_ours_shadows_an_installed_one():
    """Our flat modules are imported by bare name with the repository first on the path, so a file named
    like an installed package (as kernels.py was, once transformers began importing `kernels`) would
    replace that package in every process that imports both."""
    import importlib.machinery
    import sys
    elsewhere = [p for p in sys.path if p and os.path.abspath(p) != ROOT]
    ours = [f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")]
    assert len(ours) >= 20, f"only {len(ours)} modules found"
    clashes = [f"{m}.py shadows {spec.origin}" for m in ours
               if (spec := importlib.machinery.PathFinder.find_spec(m, elsewhere)) is not None]
    assert not clashes, "\n".join(clashes)
