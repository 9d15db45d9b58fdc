"""The seed notebook's own algorithm, reproduced as written (baseline for timing and
for its known failure): RMSprop on a single-draw Monte Carlo ELBO, with the notebook's
KL (including its ``+1`` where ``-1`` belongs), random initialisation of the PIPs and
slab means unless ``init`` is given. Only used by ``sanity_checks.py``."""

import torch


class SpikeSlab(torch.nn.Module):
    def __init__(self, p, k):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn([p, k]))
        self.mean = torch.nn.Parameter(torch.randn([p, k]))
        self.log_prec = torch.nn.Parameter(torch.zeros([p, k]))
        self.prior_logodds = torch.nn.Parameter(torch.randn([1, k]))
        self.log_prior_prec = torch.nn.Parameter(torch.full([1, k], 1.0))

    def forward(self):
        finfo = torch.finfo(self.logits.dtype)
        pip = torch.clamp(torch.sigmoid(self.logits), finfo.tiny, 1 - finfo.eps)
        prec = torch.exp(self.log_prec)
        kl = (
            pip * torch.log(pip / torch.sigmoid(self.prior_logodds))
            + (1 - pip) * torch.log((1 - pip) / torch.sigmoid(-self.prior_logodds))
            + 0.5
            * pip
            * (
                1
                + self.log_prec
                - self.log_prior_prec
                + torch.exp(self.log_prior_prec) * (self.mean**2 + 1 / prec)
            )
        ).sum()
        pm = pip * self.mean
        pv = pip / prec + pip * (1 - pip) * self.mean**2
        return pm, pv, kl


class NotebookModel(torch.nn.Module):
    """The notebook's ``SFA`` (Gaussian, unit noise) or ``SPFA`` (Poisson, softplus)."""

    def __init__(self, n, p, k, poisson):
        super().__init__()
        self.l = SpikeSlab(n, k)
        self.f = SpikeSlab(p, k)
        self.poisson = poisson

    def forward(self, x, s):
        pm_l, pv_l, kl_l = self.l()
        pm_f, pv_f, kl_f = self.f()
        eta_mean = pm_l @ pm_f.T
        eta_scale = torch.sqrt(pv_l @ pv_f.T + (pm_l**2) @ pv_f.T + pv_l @ (pm_f.T**2))
        eta = torch.distributions.Normal(eta_mean, eta_scale).rsample()
        if self.poisson:
            rate = s * torch.nn.functional.softplus(eta)
            err = torch.distributions.Poisson(rate).log_prob(x).sum()
        else:
            err = torch.distributions.Normal(eta, 1).log_prob(x).sum()
        return -(err - kl_l - kl_f)

    def fit(self, x, s, init=None, n_epochs=4000):
        if init is not None:
            self.l.mean.data = init[0]
            self.f.mean.data = init[1]
        opt = torch.optim.RMSprop(self.parameters())
        for _ in range(n_epochs):
            opt.zero_grad()
            loss = self.forward(x, s)
            if torch.isnan(loss):
                raise RuntimeError("nan loss")
            loss.backward()
            opt.step()
        return self

    def fitted_mean(self):
        with torch.no_grad():
            eta = self.l()[0] @ self.f()[0].T
            return torch.nn.functional.softplus(eta) if self.poisson else eta
