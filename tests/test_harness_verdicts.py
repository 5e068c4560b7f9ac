"""How ``make bench`` words a target (met, or missed by how much) and keeps RESULTS.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.__main__ import SECTIONS, record
from benchmarks.harness import _verdict, peer_of


@pytest.mark.parametrize(
    ("got", "target", "verdict"),
    [
        (5.0, 5, "met"),
        (6.2, 5, "met"),
        (3.2, 5, "MISSED by 36%"),
        (2.991, 3, "MISSED by less than 1%"),  # once printed as "3.0x ... MISSED by 0%"
        (2.97, 3, "MISSED by 1%"),
    ],
)
def test_a_target_is_met_or_missed_by_a_stated_share(
    got: float, target: float, verdict: str
) -> None:
    assert _verdict(got, target) == verdict


def test_each_asynccas_configuration_is_set_against_the_matching_buildgrid() -> None:
    assert peer_of("asynccas (memory)") == "BuildGrid 0.4.4 (memory)"
    for disk in ("asynccas (disk + SQLite index)", "asynccas (disk + Redis index)"):
        assert peer_of(disk) == "BuildGrid 0.4.4 (disk + Redis index)"


def test_results_keep_one_section_per_benchmark_under_the_page_they_head(tmp_path: Path) -> None:
    """RESULTS.md is one page: a new run replaces its benchmark's section, the text above the
    sections stays, and no run is appended below an older one of the same benchmark."""
    results = tmp_path / "RESULTS.md"
    results.write_text(
        f"# Benchmark results\n\nHeadline figures.\n\n{SECTIONS}\n\n"
        "### Load harness: x\n\nold harness\n\n### FindMissingBlobs, 1000 digests\n\nold fmb\n"
    )
    record("### FindMissingBlobs, 1000 digests (half present), concurrency 8\n\nnew fmb\n", results)
    record("### Bazel's traffic: asynccas vs BuildGrid\n\nfirst\n", results)
    record("### Bazel's traffic: asynccas vs BuildGrid\n\nsecond\n", results)
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nHeadline figures.\n")
    assert "old fmb" not in text
    assert "first" not in text
    assert text.count("### ") == 3
    assert text.index("old harness") < text.index("new fmb") < text.index("second")
