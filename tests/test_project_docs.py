"""The project's own docs: nothing points outside the repository, and every docs/ page cited exists."""

import re
import subprocess
from pathlib import Path

from tests.support import ROOT

THIS = Path(__file__).resolve()
# Text a user of a fresh clone cannot follow: references to a sibling folder of the repository.
OUTSIDE = re.compile(r"\.\./shared|shared/docs")
CITED = re.compile(r"\bdocs/([A-Za-z0-9_]+\.md)")


def project_files() -> list[Path]:
    """Every file git tracks or would track (untracked but not ignored) in the repository."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    files = [ROOT / f for f in out if f]
    return [f for f in files if f.is_file() and f.resolve() != THIS]


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""


def test_no_project_file_points_outside_the_repository():
    files = project_files()
    assert len(files) > 50  # the scan really saw the repository
    offenders = [f"{f.relative_to(ROOT)}:{i + 1}: {line.strip()}"
                 for f in files for i, line in enumerate(_text(f).splitlines()) if OUTSIDE.search(line)]
    assert offenders == []


def test_cited_docs_pages_exist():
    cited = {m.group(1) for f in project_files() for m in CITED.finditer(_text(f))}
    assert {"method.md", "protocols.md", "interfaces.md"} <= cited
    assert sorted(p for p in cited if not (ROOT / "docs" / p).is_file()) == []


def test_report_cites_the_project_docs():
    from orchestrator.report import export, reference

    for module in (export, reference):
        source = Path(module.__file__).read_text()
        assert "docs/protocols.md" in source and not OUTSIDE.search(source)
    protocols = (ROOT / "docs" / "protocols.md").read_text()
    # The reference rows the report prints are the ones the protocols page publishes.
    for row, (b, n, h) in reference.BASE2NEW_AVERAGE.items():
        assert re.search(rf"\| {re.escape(row)} \| {b:.2f} \| {n:.2f} \| {h:.2f} \|", protocols), row
