"""The uses of other packages' non-public attributes (bayescal/adapters.py), each against the
installed versions: a release that moves one fails here, not silently in a fit."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoMultivariateNormal
from pyro.infer.autoguide.initialization import init_to_mean
from pyro.infer.mcmc import MCMC, NUTS

from bayescal.adapters import nuts_transition, set_up_guide


def model():
    pyro.sample("a", dist.Normal(torch.tensor(1.0, dtype=torch.float64), 2.0))
    pyro.sample("b", dist.HalfNormal(torch.tensor(3.0, dtype=torch.float64)))


def test_set_up_guide_builds_the_parameters_without_sampling():
    guide = AutoMultivariateNormal(model, init_loc_fn=init_to_mean)
    pyro.set_rng_seed(0)
    before = torch.get_rng_state()
    set_up_guide(guide)
    assert torch.equal(torch.get_rng_state(), before)  # nothing drawn
    assert guide.loc.shape == (2,) and guide.scale_tril.shape == (2, 2)
    assert guide.get_posterior().event_shape == (2,)


def test_nuts_transition_reads_the_kernels_running_statistics():
    """On a standard normal, with a step size large enough for some divergences: the counts
    and running mean agree with what the draws imply."""
    pyro.set_rng_seed(1)
    energies, seen = [], []

    def potential(params):
        return 0.5 * (params["x"] ** 2).sum()

    def hook(kernel, params, stage, i):
        transition = nuts_transition(kernel)
        seen.append(transition)
        energies.append(float(potential(params)))

    kernel = NUTS(potential_fn=potential, step_size=0.5, adapt_step_size=False)
    mcmc = MCMC(kernel, num_samples=30, warmup_steps=5, hook_fn=hook, disable_progbar=True,
                initial_params={"x": torch.zeros(3, dtype=torch.float64)})
    mcmc.run()
    last = seen[-1]
    assert isinstance(last.divergences, int) and last.divergences >= 0
    assert 0.0 <= last.mean_accept_prob <= 1.0
    # the potential energy the kernel holds is that of the point it just returned
    assert all(math.isclose(t.potential_energy, e, rel_tol=1e-12, abs_tol=1e-12)
               for t, e in zip(seen, energies))
