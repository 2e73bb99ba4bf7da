"""Guides for SVI: Pyro's autoguides, the Gaussian ones started at the Laplace approximation.

The full-rank and low-rank Gaussians live in the coordinates whitened by the Laplace
approximation, ``u = u_map + L w`` with ``L L^T`` the Laplace covariance, starting at
``w ~ N(0, I)`` (the Laplace approximation itself). Adam moves every guide parameter by
about its learning rate per step whatever the gradient's size. On Pyro's plain
parameterisations of a strongly correlated posterior that random walk leaks variance into
directions the data pin down, and the noise sd grows to explain the extra misfit (see
benchmarks/README.md, SVI). In whitened coordinates all directions have unit scale and the
same steps are harmless.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.infer.autoguide import (AutoDelta, AutoLowRankMultivariateNormal,
                                  AutoMultivariateNormal, AutoNormal)
from pyro.infer.autoguide.initialization import init_to_median, init_to_value

from bayescal.adapters import set_up_guide
from bayescal.hierarchy import Hierarchy
from bayescal.inference.packing import Packing

GUIDES = ("delta", "normal", "lowrank", "mvn")


class _Whitened:
    """Mixin for a Gaussian autoguide in the whitened coordinates (see the module's
    docstring); ``_whitened_root`` gives its location and a square root of its covariance
    in ``w``."""

    def __init__(self, model, u_map: torch.Tensor, laplace_tril: torch.Tensor, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.centre = u_map.detach()
        self.whiten = laplace_tril.detach()

    def start_at_laplace(self) -> None:
        """``w ~ N(0, I)``: zero location, unit scale (after the parameters are built)."""
        self.loc = torch.nn.Parameter(torch.zeros_like(self.loc))
        self.scale = torch.ones_like(self.loc)

    def to_model(self, loc: torch.Tensor, root: torch.Tensor):
        """Location and square root of the covariance in the model's coordinates."""
        return self.centre + self.whiten @ loc, self.whiten @ root


class LaplaceMultivariateNormal(_Whitened, AutoMultivariateNormal):
    """Full-rank Gaussian guide, whitened: ``w = loc + scale * T eps``, ``T`` unit lower
    triangular."""

    def _whitened_root(self):
        return self.loc, self.scale[..., None] * self.scale_tril

    def get_transform(self, *args, **kwargs):
        return dist.transforms.LowerCholeskyAffine(*self.to_model(*self._whitened_root()))

    def get_posterior(self, *args, **kwargs):
        loc, tril = self.to_model(*self._whitened_root())
        return dist.MultivariateNormal(loc, scale_tril=tril)


class LaplaceLowRankMultivariateNormal(_Whitened, AutoLowRankMultivariateNormal):
    """Rank-r plus diagonal Gaussian in the whitened coordinates:
    ``w = loc + scale * (W eps_r + eps_d)``; it starts with ``W`` near 0."""

    def start_at_laplace(self) -> None:
        super().start_at_laplace()
        self.cov_factor = torch.nn.Parameter(0.01 * self.cov_factor.detach())

    def _whitened_root(self):
        factor = torch.cat([self.cov_factor, torch.eye(self.latent_dim, dtype=self.loc.dtype)],
                           -1)
        return self.loc, self.scale[..., None] * factor

    def get_posterior(self, *args, **kwargs):
        whitened = super().get_posterior(*args, **kwargs)
        return dist.TransformedDistribution(
            whitened, [dist.transforms.LowerCholeskyAffine(self.centre, self.whiten)])


def make_guide(h: Hierarchy, kind: str, packing: Packing, u_map: torch.Tensor,
               covariance: torch.Tensor | None):
    """A guide of the given kind located at the MAP point, with the Laplace covariance as
    its initial scale (mvn and lowrank in the coordinates it whitens; its diagonal for
    normal)."""
    map_values = packing.point(u_map)
    loc_fn = init_to_value(values=map_values, fallback=init_to_median)
    if kind == "delta":
        guide = AutoDelta(h, init_loc_fn=loc_fn)
    elif kind == "normal":
        guide = AutoNormal(h, init_loc_fn=loc_fn)
    elif kind in ("lowrank", "mvn"):
        whitened = LaplaceLowRankMultivariateNormal if kind == "lowrank" else \
            LaplaceMultivariateNormal
        guide = whitened(h, u_map, torch.linalg.cholesky(covariance), init_loc_fn=loc_fn)
    else:
        raise ValueError(f"unknown guide {kind!r}; choose one of {', '.join(GUIDES)}")
    set_up_guide(guide)
    with torch.no_grad():
        if kind in ("lowrank", "mvn"):
            guide.start_at_laplace()
        if kind == "normal":
            sd = packing.unpack(covariance.diagonal().sqrt()[None])
            for site in packing.sites:
                setattr(guide.scales, site.name, sd[site.name].reshape(site.shape))
    return guide
