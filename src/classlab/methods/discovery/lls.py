"""LLS (DDFA): discriminate domains, discretize, factorize, adjust.

Roberts, Mani, Garg and Lipton, "Unsupervised Learning under Latent Label Shift", NeurIPS 2022
(the DDFA procedure; details as in the authors' code, acmi-lab/Latent-Label-Shift-DDFA).

Setting (``classlab.data.latent_shift``): r domains share p(x|y) and differ in p_d(y); a sample's
only label is its domain d. Because d is independent of x given y,

    p(d|x) = sum_y p(d|y) p(y|x),     p(d|y) = p(y|d) p(d) / sum_d' p(y|d') p(d')       (1)

so the domain posterior is a linear image of the class posterior, and every x of one class maps to
the same point of the simplex. The four steps:

1. Discriminate: a domain discriminator f(x) ~ p(d|x), trained through the engine by cross-entropy
   on the domain id (the backbone and a linear head of r outputs that this method holds; the
   protocol's class head is not used). The paper fits steps 2-3 on its validation split together
   with the training set; here on every sample. With ``holdout_fraction`` > 0 a share of the samples
   (a fixed hash of the train position) is left out of the discriminator's training and steps 2-3
   are fitted on it alone, where f has not seen the domain labels.
2. Discretize: k-means on f(x) with m = ``clusters_per_class`` * k clusters (the paper: m = 3k,
   30 on CIFAR-10, 60 on CIFAR-20).
3. Factorize: the cluster-by-domain matrix Q[c, d] = p(c|d) (counts normalised per domain) is, by
   (1) discretised, Q = p(c|y) p(y|d); non-negative matrix factorisation of Q^T (scikit-learn's NMF,
   k components, as the paper's code) gives p(y|d) once the factors are rescaled so that every
   column of p(c|y) and of p(y|d) sums to 1. ``nmf_restarts`` random initialisations are fitted and
   the smallest reconstruction error kept (the paper fits one).
4. Adjust: the class posterior in domain d,

       p_d(y|x) = p(y|x) p(d|y) / p(d|x)  ∝  p(y|x) p_d(y) / p(y)                        (2)

   with p(y|x) = pinv([p(d|y)]) f(x) solved from (1) (``adjust: pinv``, the paper's method;
   the least-squares solution is clipped at 0, a projection the paper does not make, which changes
   nothing where the solve already gives a distribution), or from the sample's cluster c,
   p_d(y|c) ∝ p(c|y) p_d(y) (``adjust: cluster``, the paper's "naive" ablation).

``predict_in_domain(x, d)`` returns p_d(y|x) (2); ``predict(x)`` the domain-free p(y|x). The
cluster ids are the NMF components, matched to classes by the protocol's Hungarian step.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from classlab.methods.discovery_learner import DiscoveryLearner, as_numpy
from classlab.methods.registry import register_method

_HASH_MULTIPLIER = 2654435761  # Knuth's multiplicative hash: positions spread evenly over [0, 1)


def heldout_mask(positions: torch.Tensor, fraction: float) -> torch.Tensor:
    """True for the train positions left out of the discriminator's training: a fixed hash of the
    position, so the choice is independent of class and domain and the same in every batch."""
    if fraction <= 0:
        return torch.zeros(positions.shape, dtype=torch.bool, device=positions.device)
    h = (positions.long() * _HASH_MULTIPLIER) % (1 << 32)
    return h.double() / float(1 << 32) < fraction


def cluster_domain_matrix(clusters: np.ndarray, domains: np.ndarray, num_clusters: int, num_domains: int) -> np.ndarray:
    """Q[c, d] = p(c|d): the share of domain d's samples in cluster c (each column sums to 1)."""
    counts = np.zeros((num_clusters, num_domains))
    np.add.at(counts, (clusters, domains), 1.0)
    return counts / np.maximum(counts.sum(0, keepdims=True), 1.0)


def successive_projection(x: np.ndarray, k: int) -> list[int]:
    """The successive projection algorithm for separable NMF (Gillis and Vavasis, 2014): k column indices
    of ``x`` whose columns span the cone of all of them, when such anchor columns exist. Each pick is
    the column of largest residual norm; the residual is then projected off it."""
    residual = x / np.maximum(x.sum(0, keepdims=True), 1e-12)  # columns on the simplex
    picked: list[int] = []
    for _ in range(k):
        norms = (residual ** 2).sum(0)
        norms[picked] = -1.0
        j = int(np.argmax(norms))
        picked.append(j)
        u = residual[:, j] / max(np.linalg.norm(residual[:, j]), 1e-12)
        residual = residual - np.outer(u, u @ residual)
    return picked


def factorize_priors(q: np.ndarray, num_classes: int, seed: int, init: str = "anchors", restarts: int = 10,
                     max_iter: int = 2000) -> tuple[np.ndarray, np.ndarray, float]:
    """NMF of the cluster-by-domain matrix: Q ~ p(c|y) p(y|d), fitted as Q^T ~ W H with W [r, k] and
    H [k, m]. Returns (p(y|d) [r, k] with rows p_d(y), p(c|y) [m, k] with columns p(.|y), the Frobenius
    reconstruction error).

    An NMF is unique only up to more than permutation and scale: an exact Q may have other exact
    factorisations, and a random start lands on any of them. The paper's identifiability rests on
    anchors (clusters that hold one class only), so ``init: anchors`` starts W from the anchor
    columns of Q^T (``successive_projection``) and H from their non-negative least-squares
    coefficients, then refines by NMF; ``init: random`` is the paper's code (here the best of
    ``restarts`` random starts)."""
    from scipy.optimize import nnls
    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    x = np.asarray(q, dtype=np.float64).T  # [r, m]: domains x clusters
    fits = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if init == "anchors":
            anchors = successive_projection(x, num_classes)
            w0 = x[:, anchors] / np.maximum(x[:, anchors].sum(0, keepdims=True), 1e-12)
            h0 = np.stack([nnls(w0, x[:, c])[0] for c in range(x.shape[1])], axis=1)
            model = NMF(n_components=num_classes, init="custom", max_iter=max_iter, tol=1e-10)
            w = model.fit_transform(x, W=w0.copy(), H=h0.copy())
            fits.append((w, model.components_, float(model.reconstruction_err_)))
        elif init == "random":
            for r in range(max(int(restarts), 1)):
                model = NMF(n_components=num_classes, init="random", random_state=seed * 1009 + r, max_iter=max_iter,
                            tol=1e-8)
                w = model.fit_transform(x)
                fits.append((w, model.components_, float(model.reconstruction_err_)))
        else:
            raise ValueError(f"discovery/lls: nmf_init must be 'anchors' or 'random', got {init!r}")
    w, h, err = min(fits, key=lambda f: f[2])
    # Q^T = W H = (W diag(s)) (diag(1/s) H): rows of H rescaled to distributions p(c|y) ...
    scale = h.sum(1)
    scale = np.where(scale > 0, scale, 1.0)
    p_c_given_y = (h / scale[:, None]).T
    # ... and each domain's row of W diag(s) normalised to p_d(y) (it sums to 1 where the fit is exact)
    w = w * scale[None, :]
    p_y_given_d = w / np.maximum(w.sum(1, keepdims=True), 1e-12)
    return p_y_given_d, p_c_given_y, err


def domain_given_class(p_y_given_d: torch.Tensor, domain_prior: torch.Tensor) -> torch.Tensor:
    """[r, k] p(d|y) = p(y|d) p(d) / sum_d' p(y|d') p(d') (Bayes' rule over domains; a class no domain
    holds gets a uniform column)."""
    joint = p_y_given_d * domain_prior[:, None]
    total = joint.sum(0, keepdim=True)
    uniform = torch.full_like(joint, 1.0 / joint.shape[0])
    return torch.where(total > 0, joint / total.clamp_min(1e-12), uniform)


def class_posterior(p_d_given_x: torch.Tensor, p_d_given_y: torch.Tensor) -> torch.Tensor:
    """[B, k] p(y|x) from p(d|x) = sum_y p(d|y) p(y|x) (Eq. 1): the least-squares solve
    p(y|x) = pinv(P_{d|y}) p(d|x), clipped at 0 and renormalised."""
    p = p_d_given_x.double() @ torch.linalg.pinv(p_d_given_y.double()).T  # p(y|x) = pinv(P_{d|y}) p(d|x)
    p = p.clamp_min(0.0)
    total = p.sum(1, keepdim=True)
    uniform = torch.full_like(p, 1.0 / p.shape[1])
    return torch.where(total > 0, p / total.clamp_min(1e-300), uniform).to(p_d_given_x.dtype)


def adjust_to_domain(p_y_given_x: torch.Tensor, p_d_given_y: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
    """[B, k] p_d(y|x) ∝ p(y|x) p(d|y) (Eq. 2; equal to p(y|x) p_d(y) / p(y) up to a factor of x and d)."""
    p = p_y_given_x * p_d_given_y[domain]  # row b: p(y|x_b) p(d_b|y)
    total = p.sum(1, keepdim=True)
    return torch.where(total > 0, p / total.clamp_min(1e-30), p_y_given_x)


@register_method("discovery", "lls")
class LatentLabelShift(DiscoveryLearner):
    num_views = 1

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        hp = self.hparams
        self.holdout_fraction = float(hp.get("holdout_fraction", 0.0))
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"discovery/lls: holdout_fraction must lie in [0, 1), got {self.holdout_fraction}")
        self.adjust = str(hp.get("adjust", "pinv"))
        if self.adjust not in ("pinv", "cluster"):
            raise ValueError(f"discovery/lls: adjust must be 'pinv' or 'cluster', got {self.adjust!r}")
        self.nmf_init = str(hp.get("nmf_init", "anchors"))
        if self.nmf_init not in ("anchors", "random"):
            raise ValueError(f"discovery/lls: nmf_init must be 'anchors' or 'random', got {self.nmf_init!r}")
        self.num_clusters_m = max(int(hp.get("clusters_per_class", 3)), 1) * num_classes
        domains = int(hp.get("num_domains", 0) or 0)  # 0: from the split (the domain ids the protocol shows)
        self.domain_head = nn.Linear(model.num_features, max(domains, 1))
        self._size_state(max(domains, 1))

    # --- state sized by the number of domains ------------------------------------------------
    def _size_state(self, num_domains: int) -> None:
        k, m = self.num_classes, self.num_clusters_m
        self.register_buffer("p_y_given_d", torch.full((num_domains, k), 1.0 / k))   # rows p_d(y)
        self.register_buffer("domain_prior", torch.full((num_domains,), 1.0 / num_domains))  # p(d)
        self.register_buffer("p_c_given_y", torch.full((m, k), 1.0 / m))             # columns p(.|y)
        self.register_buffer("centres", torch.zeros(m, num_domains))                 # k-means on p(d|x)
        self.register_buffer("active_clusters", torch.tensor(m, dtype=torch.long))  # m, or fewer for tiny pools
        self.register_buffer("fitted", torch.tensor(False))

    def _resize(self, num_domains: int) -> None:
        device = self.domain_head.weight.device
        self.domain_head = nn.Linear(self.model.num_features, num_domains).to(device)
        self._size_state(num_domains)
        for name in ("p_y_given_d", "domain_prior", "p_c_given_y", "centres", "active_clusters", "fitted"):
            setattr(self, name, getattr(self, name).to(device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "domain_head.weight"
        if key in state_dict and state_dict[key].shape[0] != self.domain_head.out_features:
            self._resize(int(state_dict[key].shape[0]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def begin_task(self, task_id, info):
        super().begin_task(task_id, info)
        declared = int(self.hparams.get("num_domains", 0) or 0)
        shown = int(info.num_label_indices)  # latent_shift: the domain ids 0..r-1 are the visible labels
        if declared and shown and declared != shown:
            raise ValueError(f"discovery/lls: num_domains is {declared} but the split has {shown} domains "
                             f"(set num_domains: 0 to take it from the split)")
        if shown and shown != self.domain_head.out_features:
            self._resize(shown)  # the runner reseeded torch before begin_task: the same head on resume

    @property
    def num_domains(self) -> int:
        return int(self.domain_head.out_features)

    # --- step 1: the domain discriminator ----------------------------------------------------
    def param_groups(self):
        return [{"params": [p for p in self.model.backbone.parameters() if p.requires_grad]
                 + list(self.domain_head.parameters())}]

    def domain_posterior(self, x: torch.Tensor) -> torch.Tensor:
        """f(x) ~ p(d|x), [B, r]."""
        return F.softmax(self.domain_head(self.model.features(x)).float(), dim=1)

    def training_step(self, batch):
        logits = self.domain_head(self.model.features(batch["x"]))
        domain = batch["y"]
        train = (domain >= 0) & ~heldout_mask(batch["index"], self.holdout_fraction)
        if not bool(train.any()):
            return logits.sum() * 0.0, {}
        # min_f  E[-log f_d(x)]: cross-entropy on the domain id, so that f(x) -> p(d|x)
        loss = F.cross_entropy(logits[train].float(), domain[train])
        acc = (logits[train].argmax(1) == domain[train]).float().mean()
        return loss, {"domain_acc": acc.detach()}

    # --- steps 2 and 3: discretize and factorize ---------------------------------------------
    def end_task(self, task_id, context):
        from sklearn.cluster import KMeans

        if context.domains is None:
            raise ValueError("discovery/lls runs on latent_shift splits only (the context has no domain ids)")
        pool = context.unlabelled
        domains_all = context.domains[pool]
        fit = pool[heldout_mask(pool, self.holdout_fraction)] if self.holdout_fraction > 0 else pool
        if len(fit) < self.num_classes:
            fit = pool  # too few held-out samples to factorize: use every sample
        features = context.embed(fit).to(self.domain_head.weight.device)
        self.eval()
        with torch.no_grad():
            p_d_x = F.softmax(self.domain_head(features).float(), dim=1)
        p_d_x = as_numpy(p_d_x).astype(np.float64)
        r, k = self.num_domains, self.num_classes
        m = min(self.num_clusters_m, len(fit))
        km = KMeans(n_clusters=m, n_init=int(self.hparams.get("n_init", 5)), random_state=context.seed).fit(p_d_x)
        q = cluster_domain_matrix(km.labels_, as_numpy(context.domains[fit]).astype(np.int64), m, r)
        p_y_d, p_c_y, _ = factorize_priors(q, k, context.seed, self.nmf_init, int(self.hparams.get("nmf_restarts", 10)))
        counts = torch.bincount(domains_all.long(), minlength=r).float()
        dev = self.p_y_given_d.device
        self.p_y_given_d.copy_(torch.from_numpy(p_y_d).float().to(dev))
        self.domain_prior.copy_((counts / counts.sum()).to(dev))
        self.p_c_given_y.zero_()
        self.p_c_given_y[:m] = torch.from_numpy(p_c_y).float().to(dev)
        self.centres.zero_()
        self.centres[:m] = torch.from_numpy(km.cluster_centers_).float().to(dev)
        self.active_clusters.fill_(m)
        self.fitted.fill_(True)

    # --- step 4: adjust ----------------------------------------------------------------------
    def _nearest_cluster(self, p_d_x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(p_d_x, self.centres[:int(self.active_clusters)]).argmin(1)

    def predict(self, x):
        """The domain-free p(y|x) (pinv), or p(y|c) ∝ p(c|y) p(y) (cluster)."""
        if not bool(self.fitted):
            return torch.full((len(x), self.num_classes), 1.0 / self.num_classes, device=x.device)
        p_d_x = self.domain_posterior(x)
        p_d_y = domain_given_class(self.p_y_given_d, self.domain_prior)
        if self.adjust == "cluster":
            p_y = self.domain_prior @ self.p_y_given_d  # p(y) = sum_d p(d) p_d(y)
            p = self.p_c_given_y[self._nearest_cluster(p_d_x)] * p_y
            return p / p.sum(1, keepdim=True).clamp_min(1e-30)
        return class_posterior(p_d_x, p_d_y)

    def predict_in_domain(self, x, domain):
        """p_d(y|x) (Eq. 2) for samples of ``domain``."""
        if not bool(self.fitted):
            return self.predict(x)
        domain = domain.long().to(self.p_y_given_d.device)
        if self.adjust == "cluster":
            # p_d(y|c) ∝ p(c|y) p_d(y): the naive ablation, on the sample's cluster of p(d|x)
            p = self.p_c_given_y[self._nearest_cluster(self.domain_posterior(x))] * self.p_y_given_d[domain]
            return p / p.sum(1, keepdim=True).clamp_min(1e-30)
        p_d_y = domain_given_class(self.p_y_given_d, self.domain_prior)
        return adjust_to_domain(class_posterior(self.domain_posterior(x), p_d_y), p_d_y, domain)
