"""How well the data identify a dense factor's prior inclusion: the ELBO over ``pi``.

The sanity designs' first factor is dense (90 % of the entries of ``L`` and ``F``
non-zero) with small effects (slab sd 0.5 on each side). PIP calibration on them
hinges on its learned inclusion ``pi``: its entries' PIPs sit near ``pi``, and
90 % of them are truly non-zero. This script fits a design with the defaults
(the simulator's link), then, for each ``pi`` on a grid, holds that factor's
prior inclusion on one side at ``pi`` (its entries' log-odds shifted with it),
trains the rest on (1,500 passes at most) and reports the ELBO (512 Monte Carlo
draws, common random numbers) and the mean PIP of the truly non-zero and zero
entries. A flat ELBO means the data do not choose ``pi``; close PIPs of the two
groups mean the PIPs carry little about which entries are non-zero.

    python -m simulations.pip_profile [--design poisson] [--seed 1] [--side factors]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses

import numpy as np
import torch
from scipy.special import logit

GRID = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)


def profile(design: str, seed: int, side: str, grid=GRID, max_iter: int = 1500) -> dict:
    from simulations.peers import fit_spfa
    from simulations.sanity_checks import DESIGNS, K
    from spfa import fitting
    from spfa.evaluation import match_factors
    from spfa.simulate import simulate

    spec = DESIGNS[design]
    sim = simulate(seed=seed, **spec)
    fit = fit_spfa(sim.x, K, spec["likelihood"], sim.size_factors, seed)
    est = fit.estimator
    k0 = int(match_factors(fit.loadings, fit.factors, sim.loadings, sim.factors).order[0])
    settings = est._settings(est.device_)
    likelihood = est._make_likelihood()
    X, s = est._data(sim.x, sim.size_factors, likelihood=likelihood)
    data = settings.batches(X, s, likelihood, seed=0)
    truth = (sim.factors if side == "factors" else sim.loadings)[:, 0] != 0

    def elbo(model) -> float:
        with torch.no_grad():
            terms = data.total_terms(model, settings.rule(512), settings.generator(0))
        return float(terms.elbo)

    base = est.get_model()
    learned = float(torch.sigmoid(getattr(base, side).prior_logit[k0].detach()))
    rows = []
    for pi in grid:
        model = copy.deepcopy(base)
        family = getattr(model, side)
        with torch.no_grad():
            shift = logit(pi) - float(family.prior_logit[k0])
            family.prior_logit[k0] += shift
            family.logits[:, k0] += shift
        hold = torch.ones_like(family.prior_logit)
        hold[k0] = 0.0
        family.prior_logit.register_hook(lambda g, hold=hold: g * hold)
        gen = settings.generator(1)

        def objective(model=model, gen=gen):
            return data.step_terms(model, settings.rule(), gen)

        fitting._train(model, objective, data, dataclasses.replace(settings, max_iter=max_iter))
        pip = torch.sigmoid(family.logits[:, k0]).detach().numpy()
        rows.append(
            {
                "pi": pi,
                "elbo": elbo(model),
                "pip_nonzero": float(pip[truth].mean()),
                "pip_zero": float(pip[~truth].mean()),
            }
        )
    return {
        "design": design,
        "seed": seed,
        "side": side,
        "learned_pi": learned,
        "fitted_elbo": elbo(base),
        "true_fraction_nonzero": float(truth.mean()),
        "rows": rows,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--design", default="poisson")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--side", default="factors", choices=["loadings", "factors"])
    args = parser.parse_args(argv)
    out = profile(args.design, args.seed, args.side)
    print(
        f"{out['design']}, seed {out['seed']}, the dense factor's {out['side']}: learned pi "
        f"{out['learned_pi']:.3f} (ELBO {out['fitted_elbo']:.1f}); truly non-zero "
        f"{out['true_fraction_nonzero']:.2f}"
    )
    print(f"{'pi held at':>10} {'ELBO':>12} {'mean PIP, non-zero':>19} {'zero':>6}")
    for r in out["rows"]:
        print(f"{r['pi']:10.2f} {r['elbo']:12.1f} {r['pip_nonzero']:19.3f} {r['pip_zero']:6.3f}")
    best = max(r["elbo"] for r in out["rows"])
    flat = [r["pi"] for r in out["rows"] if r["elbo"] >= best - 3.0]
    print(f"pi within 3 nats of the best: {min(flat):.2f} to {max(flat):.2f}")
    return out


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
