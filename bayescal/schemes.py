"""Implicit one-step time discretisations of the built-in models, as Butcher tableaus.

Every scheme here is **stiffly accurate** (the last row of ``a`` is the weights ``b`` and
``c[-1] = 1``), so the end-of-step state is the last stage: the residual needs no separate
update, and the stage values are the whole state that pyzag carries from step to step. All
are L-stable, which viscoplastic relaxation needs (the trapezoidal rule, A- but not L-stable,
rings on it).

``radau-iia`` (2 stages, order 3) is the default (chosen by ``benchmarks/accuracy.py``);
``backward-euler`` (1 stage, order 1) is what bayescal used before and stays available.

Plain data only (no torch), so that reading a model card stays cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Tableau:
    """A stiffly accurate implicit Runge-Kutta scheme: ``a`` (stages x stages), ``c`` (stage
    times as fractions of the step) and its classical ``order`` (the order of the error
    estimate by step doubling)."""

    name: str
    a: tuple[tuple[float, ...], ...]
    c: tuple[float, ...]
    order: int

    @property
    def stages(self) -> int:
        return len(self.c)

    def __post_init__(self) -> None:
        if any(len(row) != len(self.c) for row in self.a) or len(self.a) != len(self.c):
            raise ValueError(f"scheme {self.name!r}: a must be {len(self.c)} x {len(self.c)}")
        if abs(self.c[-1] - 1.0) > 1e-15:
            raise ValueError(f"scheme {self.name!r} is not stiffly accurate (c[-1] != 1)")
        for i, row in enumerate(self.a):
            if abs(sum(row) - self.c[i]) > 1e-14:
                raise ValueError(f"scheme {self.name!r}: row {i} of a does not sum to c[{i}]")


_S6 = math.sqrt(6.0)
_GAMMA = 1.0 - 1.0 / math.sqrt(2.0)

SCHEMES: dict[str, Tableau] = {
    scheme.name: scheme
    for scheme in (
        Tableau("backward-euler", ((1.0,),), (1.0,), 1),
        # Alexander's two-stage SDIRK: L-stable, stage order 1
        Tableau("sdirk2", ((_GAMMA, 0.0), (1.0 - _GAMMA, _GAMMA)), (_GAMMA, 1.0), 2),
        # Radau IIA, two stages: L-stable, stage order 2
        Tableau("radau-iia", ((5.0 / 12.0, -1.0 / 12.0), (3.0 / 4.0, 1.0 / 4.0)),
                (1.0 / 3.0, 1.0), 3),
        # Radau IIA, three stages
        Tableau(
            "radau-iia5",
            (
                ((88.0 - 7.0 * _S6) / 360.0, (296.0 - 169.0 * _S6) / 1800.0,
                 (-2.0 + 3.0 * _S6) / 225.0),
                ((296.0 + 169.0 * _S6) / 1800.0, (88.0 + 7.0 * _S6) / 360.0,
                 (-2.0 - 3.0 * _S6) / 225.0),
                ((16.0 - _S6) / 36.0, (16.0 + _S6) / 36.0, 1.0 / 9.0),
            ),
            ((4.0 - _S6) / 10.0, (4.0 + _S6) / 10.0, 1.0),
            5,
        ),
    )
}

DEFAULT_SCHEME = "radau-iia"
