"""README's figures table agrees with docs/evidence/*.json (bench/readme_figures.py renders it)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def figures() -> Iterator[ModuleType]:
    """bench/readme_figures.py, loaded from its path (bench/ is not a package)."""
    name = "_har_bench_readme_figures"
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / "readme_figures.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


def test_readme_table_is_what_the_evidence_renders_to(figures: ModuleType) -> None:
    readme = (REPO / "README.md").read_text()
    assert figures.table_in(readme) == figures.render(REPO / "docs" / "evidence"), (
        "README.md's figures differ from docs/evidence: python bench/readme_figures.py --write"
    )


def test_every_row_names_an_existing_evidence_file_and_a_command(figures: ModuleType) -> None:
    table = figures.render(REPO / "docs" / "evidence")
    for row in figures.ROWS:
        assert (REPO / "docs" / "evidence" / row.evidence).is_file()
        assert f"(docs/evidence/{row.evidence})" in table
        assert row.command.split()[1].startswith("bench/")
        assert (REPO / row.command.split()[1]).is_file()


def test_a_changed_evidence_value_changes_the_table(figures: ModuleType, tmp_path: Path) -> None:
    evidence = tmp_path / "evidence"
    shutil.copytree(REPO / "docs" / "evidence", evidence)
    fleet = json.loads((evidence / "fleet.json").read_text())
    largest = max(fleet["medians"], key=lambda m: m["devices"])
    largest["new_version_on_all_devices_s"] = 9.87
    (evidence / "fleet.json").write_text(json.dumps(fleet))

    table = figures.render(evidence)
    assert "9.9 s**" in table
    assert table != figures.render(REPO / "docs" / "evidence")

    readme = tmp_path / "README.md"
    readme.write_text((REPO / "README.md").read_text())
    args = ["--readme", str(readme), "--evidence-dir", str(evidence)]
    assert figures.main(["--check", *args]) == 1
    assert figures.main(["--write", *args]) == 0
    assert figures.main(["--check", *args]) == 0
    assert "9.9 s**" in readme.read_text()


def test_percentages_round_halves_up(figures: ModuleType) -> None:
    assert figures._pct(0.4105) == "41.1 %"
    assert figures._pct(0.9499) == "95.0 %"
