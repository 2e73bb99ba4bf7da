"""What the built-in models are called and what they take, as plain data.

The model classes in :mod:`bayescal.material` read their names, parameters, state variables
and summaries from here (:func:`bayescal.material.catalogued`), so this is the one place they
are written down; ``bayescal models`` reads it without importing torch, and answers at once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelEntry:
    """A built-in model: its name in cards, parameters (in card order), state variables and
    a one-line summary."""

    name: str
    parameters: tuple[str, ...]
    state_names: tuple[str, ...]
    summary: str


CATALOGUE: dict[str, ModelEntry] = {entry.name: entry for entry in (
    ModelEntry("perzyna-voce", ("E", "sy", "Rinf", "d", "eta", "n"), ("stress", "R"),
               "Perzyna overstress flow, Voce isotropic hardening"),
    ModelEntry("chaboche", ("E", "sy", "Rinf", "d", "C", "g", "eta", "n"), ("stress", "R", "X"),
               "Perzyna flow, Voce isotropic + Armstrong-Frederick kinematic hardening"),
    ModelEntry("voce-jc", ("E", "sy", "Rinf", "d", "C", "eps0"), ("stress", "R"),
               "Johnson-Cook-type logarithmic rate sensitivity, Voce isotropic hardening"),
    ModelEntry("voce-jc-thermal",
               ("E", "sy", "Rinf", "d", "C", "eps0", "Tref", "Tmelt", "m",
                "beta", "rho_c", "rate_ad", "T0"),
               ("stress", "R", "heating"),
               "voce-jc with temperature: Johnson-Cook (or piecewise-linear) thermal softening, "
               "Taylor-Quinney heating"),
)}
