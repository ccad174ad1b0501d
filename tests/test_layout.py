"""The layout's promises (``tests/layout_report.py``): no family-name comparisons, one block loop per backbone."""
from __future__ import annotations

from tests.layout_report import block_loops, family_comparisons


def test_nothing_compares_a_family_name():
    assert family_comparisons() == []


def test_one_block_loop_per_backbone_and_in_the_driver():
    loops = block_loops()
    assert set(loops) >= {"streams"}, loops
    assert all(len(where) == 1 for where in loops.values()), loops
