"""How ``make bench`` words a target: met, or missed by how much."""

from __future__ import annotations

import pytest

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
