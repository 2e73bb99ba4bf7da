"""An independent reference for the built-in models: the contract's rate equations
(design.md) written out in numpy and integrated by scipy's Radau method at a tight tolerance.

Nothing here shares code with :mod:`bayescal.material` or the pyzag solver, so the tests and
``benchmarks/accuracy.py`` can measure bayescal's integration error against it. The strain
path is piecewise linear; the integration restarts at every change of strain rate, where the
solution's derivative jumps.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.integrate import solve_ivp


def contract_rhs(name: str, P: dict[str, float], strain_rate: float):
    """``dy/dt`` of model ``name`` at constant total strain rate (state: stress first)."""
    E = P["E"]

    def perzyna(f):
        return (f / P["eta"]) ** P["n"] if f > 0.0 else 0.0

    if name == "perzyna-voce":
        def rhs(t, y):
            s, R = y
            pdot = perzyna(abs(s) - (P["sy"] + R))
            return [E * (strain_rate - pdot * np.sign(s)), P["d"] * (P["Rinf"] - R) * pdot]
    elif name == "chaboche":
        def rhs(t, y):
            s, R, X = y
            pdot = perzyna(abs(s - X) - (P["sy"] + R))
            direction = np.sign(s - X)
            return [E * (strain_rate - pdot * direction), P["d"] * (P["Rinf"] - R) * pdot,
                    P["C"] * pdot * direction - P["g"] * X * pdot]
    elif name == "voce-jc":
        def rhs(t, y):
            s, R = y
            f = abs(s) / (P["sy"] + R) - 1.0
            pdot = P["eps0"] * math.expm1(min(f / P["C"], 700.0)) if f > 0.0 else 0.0
            return [E * (strain_rate - pdot * np.sign(s)), P["d"] * (P["Rinf"] - R) * pdot]
    else:
        raise ValueError(f"no reference equations for model {name!r}")
    return rhs


def radau_stress(name: str, P: dict[str, float], time, strain, tol: float = 1e-10
                 ) -> np.ndarray:
    """Stress at the points ``time`` (s), ``strain`` (1-D) of a piecewise-linear strain path,
    from a zero state, to about ``tol``."""
    time, strain = np.asarray(time, float), np.asarray(strain, float)
    rates = np.diff(strain) / np.diff(time)
    y = np.zeros(3 if name == "chaboche" else 2)
    out = [y[0]]
    k = 0
    while k < len(rates):
        j = k
        while j + 1 < len(rates) and abs(rates[j + 1] - rates[k]) <= 1e-9 * abs(rates[k]):
            j += 1
        sol = solve_ivp(contract_rhs(name, P, rates[k]), (time[k], time[j + 1]), y,
                        method="Radau", t_eval=time[k + 1 : j + 2], rtol=tol, atol=tol)
        if not sol.success:
            raise RuntimeError(f"reference integration failed: {sol.message}")
        out.extend(sol.y[0])
        y = sol.y[:, -1].copy()
        k = j + 1
    return np.array(out)
