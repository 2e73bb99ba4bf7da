"""The integration grid of a fit: checked, and refined if need be, at the fitted point.

A fit plans its grid before it starts, over the prior population
(:func:`bayescal.hierarchy.plan_integration`). The fitted specimens can sit where that grid
is too coarse, so at the MAP the error is estimated again (:func:`replan_at_map`, which
returns a hierarchy on a finer grid when needed) and reported with the posterior
(:func:`integration_report`).
"""

from __future__ import annotations

import torch

from bayescal.card import ModelSpec
from bayescal.hierarchy import Hierarchy, plan_integration, take_columns
from bayescal.inference.draws import posterior_draws
from bayescal.integrate import estimate_error

#: ``fit`` warns when the estimated integration error exceeds this share of the noise sd.
INTEGRATION_WARNING_SHARE = 0.2


def integration_report(h: Hierarchy, values: dict[str, torch.Tensor], noise_sd: float,
                       at: str) -> dict:
    """The estimated integration error (step doubling, MPa) of ``h``'s grid at physical
    parameters ``values`` (``(specimen,)`` tensors), as attributes, with a plain-word
    warning (``warnings``, a list) when its largest value exceeds
    :data:`INTEGRATION_WARNING_SHARE` times the noise sd."""
    exp = h.experiments
    valid = error_at(h, values)[exp.mask]
    worst = float(valid.nan_to_num(nan=torch.inf).max()) if valid.numel() else 0.0
    rms = float(valid.square().mean().sqrt()) if valid.numel() else 0.0
    attrs = {"integration_error_at": at, "integration_error_rms": rms,
             "integration_error_max": worst, "warnings": []}
    if worst > INTEGRATION_WARNING_SHARE * noise_sd:
        attrs["warnings"].append(
            f"the estimated integration error at the {at} reaches {worst:.3g} MPa, more than "
            f"{INTEGRATION_WARNING_SHARE:g} x the fitted noise sd ({noise_sd:.3g} MPa): the "
            f"solver's error may bias the fit; lower [solver] tolerance (or raise substeps) "
            f"in the card and fit again")
    return attrs


def error_at(h: Hierarchy, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """Step-doubling estimate of the stress error ``(step, specimen)`` (MPa) of ``h``'s grid
    at physical parameters ``values`` (``(specimen,)`` tensors; fixed ones from the card)."""
    exp = h.experiments
    params = {**fixed_values(h.spec, exp.n_specimens), **values}
    if h.shard is None:
        return estimate_error(h.model, params, exp.time, exp.strain, h.substeps, h.options,
                              exp.temperature, exp.mask)
    # several ranks: each estimates its shard's specimens, and every rank gets them all
    mine = h.shard.index
    time, strain, temperature, mask = (take_columns(x, mine) for x in (
        exp.time, exp.strain, exp.temperature, exp.mask))
    local = estimate_error(h.model, take_columns(params, mine), time, strain, h.substeps,
                           h.options, temperature, mask)
    return h.shard.gather(local, dim=-1)


def map_parameters(h: Hierarchy, map_values: dict) -> dict[str, torch.Tensor]:
    """Physical parameters ``(specimen,)`` at a point of latent values."""
    draws = posterior_draws(h, {k: v[None] for k, v in map_values.items()}, unique=True)
    return {k: v[0] for k, v in draws.parameters.items()}


def replan_at_map(h: Hierarchy, map_values: dict) -> Hierarchy | None:
    """A hierarchy on a grid that also meets the tolerance at the MAP, or None when ``h``'s
    does. The grid planned before the fit (at the prior population) can be too coarse for
    the specimens' fitted values, e.g. where a low yield stress moves the onset of yield
    into a long step; the new grid takes, interval by interval, the larger of the two
    plans' step counts."""
    exp = h.experiments
    values = map_parameters(h, map_values)
    if float(error_at(h, values).nan_to_num(nan=torch.inf).max()) <= h.options.tolerance:
        return None
    plan = plan_integration(h.spec, h.model, exp, h.options, values=values, comm=h.comm)
    return h.with_grid(torch.maximum(h.substeps, plan.substeps))


def fixed_values(spec: ModelSpec, n: int) -> dict[str, torch.Tensor]:
    """The card's fixed parameters as ``(n,)`` tensors."""
    return {k: torch.full((n,), float(p.value), dtype=torch.float64)
            for k, p in spec.parameters.items() if p.is_fixed}
