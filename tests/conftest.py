"""Shared test fixtures: float64 by default, thread count restored, an informative load path."""

from __future__ import annotations

import pytest
import torch

from bayescal import check


# Small-tensor work is several times slower with two intra-op threads on 2-core machines.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def float64():
    """Every test runs in float64 (the project's default precision); restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(autouse=True)
def restore_threads():
    """`bayescal.cli.main` sets one intra-op thread; put the setting back afterwards."""
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def piecewise_path(segments, points_per_segment=30, batch=1):
    """:func:`bayescal.check.piecewise_path` as ``(n_rec, batch)`` tensors."""
    time, strain = check.piecewise_path(segments, points_per_segment)
    return (time[:, None].expand(-1, batch).contiguous(),
            strain[:, None].expand(-1, batch).contiguous())


# Load at 1e-3/s to 2%, jump to 1e-1/s up to 3%, hold 100 s (relaxation), unload by 0.15%
# strain at 1e-3/s (near zero stress for the usual test parameters), reload at 1e-3/s to 4%.
INFORMATIVE_SEGMENTS = [
    (20.0, 0.02),
    (0.1, 0.03),
    (100.0, 0.03),
    (1.5, 0.0285),
    (12.0, 0.04),
]


def informative_path(points_per_segment=30, batch=1):
    """The design's informative path (rate jump, hold, unload, reload), 30 points a segment."""
    return piecewise_path(INFORMATIVE_SEGMENTS, points_per_segment, batch)
