"""Latent-label-shift splits: domains that share p(x|y) and differ in their class priors p_d(y).

The setting of Roberts, Mani, Garg and Lipton, "Unsupervised Learning under Latent Label Shift",
NeurIPS 2022: no sample carries a class label; each carries the id of the domain it was drawn from,
and the domains differ only in how often each class occurs,

    p_d(x, y) = p(x | y) p_d(y)      (the same class-conditional in every domain).

Construction (the paper's, from its code): the prior of each domain is a Dirichlet draw,

    p_d(y) ~ Dir(concentration / k * 1_k),   d = 1..r,

redrawn until the r x k matrix [p_d(y)] (domains of equal size, as in the paper) has a condition number of at most
``max_condition_number`` (the paper caps it so that p(y|d) can be recovered: the method needs the
matrix to have full rank k, which is also why a split needs ``num_domains >= k``). Each domain
holds ``samples_per_domain`` training samples, ``round(p_d(y) * n)`` of class y (largest-remainder
rounding, so every domain has exactly n). The samples of a class are dealt from one seeded
permutation of that class's pool without replacement (domain 0 first), so the domains share
p(x|y) and no sample is in two domains. ``samples_per_domain = 0`` takes the largest n the pools
allow, as the paper's builder scales its domains to the scarcest class. The test split is built
the same way from the test pools (``test_samples_per_domain``), and every test sample records the
domain it was drawn for (``test_domains``): evaluation scores it with that domain's p_d(y|x).

The misleading split (the claim "LLS beats k-means where feature similarity misleads"): the
classes are chosen to look alike, so that clusters of image features mix them while the
domains' priors still tell them apart. On Fashion-MNIST the four upper-body garments,
``classes: [0, 2, 4, 6]`` (T-shirt/top, pullover, coat, shirt), are its best-known confusion group
(most errors of Fashion-MNIST classifiers fall among them); k-means there must separate them by
appearance alone,
while the domain discriminator of LLS is trained on a signal (the domain) whose distribution
differs by class. This changes no image, so it is the honest option for the data layer as it
stands (it stores images, not transformations of them). A stronger construction, a nuisance
transformation applied to a seeded half of every class's images (independent of class and
domain) that dominates pixel similarity, needs the loader to apply it and is not built here.

Manifest fields: kind ``latent_shift``, dataset, seed, num_classes, params, class_order (the
shared seeded permutation of all classes, as in the other discovery kinds), known_classes ``[]``
(no class is labelled), novel_classes (the classes used, sorted), labelled ``[]``, unlabelled (the
sorted union of the domains), domains (one sorted list of train positions per domain), test (sorted
test positions), test_domains (the domain of each entry of ``test``), domain_priors (r x k: row d
is p_d(y) over ``novel_classes`` in that order), domain_class_counts and test_domain_class_counts
(r x k: the realised counts).

Random streams: ``class_order`` is ``np.random.default_rng(seed).permutation(num_classes)``; the
priors use ``default_rng([seed, 11])``; the permutation of class c's train pool
``default_rng([seed, 12, c])`` and of its test pool ``default_rng([seed, 13, c])``.
"""
from __future__ import annotations

import numbers

import numpy as np

from classlab.data.discovery_split import (SplitError, as_float, as_int, check_field,
                                          checked_common_fields, fail_field)

KIND = "latent_shift"
_PRIORS, _TRAIN_POOL, _TEST_POOL = 11, 12, 13
MAX_PRIOR_DRAWS = 10000  # Dirichlet redraws allowed to meet max_condition_number


def largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to ``weights`` (summing to 1) that sum to ``total``: the floors, then one
    more for the largest remainders (ties: the lower index)."""
    exact = np.asarray(weights, dtype=np.float64) * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:short]] += 1
    return counts


def draw_domain_priors(num_domains: int, num_used: int, concentration: float, max_condition_number: float,
                       seed: int) -> tuple[np.ndarray, float]:
    """The paper's priors: rows p_d(y) ~ Dir(concentration / k * 1_k), redrawn until cond([p_d(y)]) is at
    most ``max_condition_number`` (0: no cap). Returns (priors [r, k], condition number)."""
    rng = np.random.default_rng([seed, _PRIORS])
    alpha = np.full(num_used, concentration / num_used)
    for _ in range(MAX_PRIOR_DRAWS):
        priors = rng.dirichlet(alpha, size=num_domains)
        priors = np.where(priors < 1e-7, 0.0, priors)  # as the paper's code: dust to zero, then renormalise
        priors = priors / priors.sum(1, keepdims=True)
        cond = float(np.linalg.cond(priors))
        if max_condition_number <= 0 or cond <= max_condition_number:
            return priors, cond
    fail_field("max_condition_number", f"{MAX_PRIOR_DRAWS} Dirichlet draws (concentration {concentration}, "
                                  f"{num_domains} domains x {num_used} classes) all had a condition number above "
                                  f"{max_condition_number}; raise it, add domains or change the concentration")


def _counts(priors: np.ndarray, per_domain: int) -> np.ndarray:
    return np.stack([largest_remainder(p, per_domain) for p in priors])


def _fit_per_domain(priors: np.ndarray, pool_sizes: np.ndarray, used: list[int], requested: int, field_name: str,
                    split: str) -> int:
    """``requested`` samples per domain if every class pool holds its share, else a SplitError; 0: the
    largest number the pools allow."""
    if requested > 0:
        need = _counts(priors, requested).sum(0)
        short = np.flatnonzero(need > pool_sizes)
        if len(short):
            j = int(short[0])
            fail_field(field_name, f"{requested} {split} samples per domain need {int(need[j])} samples of class {used[j]} "
                              f"but its {split} pool holds {int(pool_sizes[j])}; lower "
                              f"{field_name} (0: as many as fit)")
        return requested
    demand = priors.sum(0)  # samples of each class per unit of samples_per_domain
    n = int(min(pool_sizes[y] / demand[y] for y in range(len(demand)) if demand[y] > 0))
    while n > 0 and (_counts(priors, n).sum(0) > pool_sizes).any():  # rounding may overshoot by a few
        n -= 1
    check_field(n >= 1, field_name, f"the {split} pools of the chosen classes cannot fill one sample per domain")
    return n


def _deal(labels: np.ndarray, used: list[int], counts: np.ndarray, seed: int, stream: int) -> list[np.ndarray]:
    """Domain d gets ``counts[d, j]`` samples of class ``used[j]``, dealt in domain order from one seeded
    permutation of the class's pool (no sample twice)."""
    domains = [[] for _ in range(counts.shape[0])]
    for j, c in enumerate(used):
        pool = np.random.default_rng([seed, stream, c]).permutation(np.flatnonzero(labels == c))
        start = 0
        for d in range(counts.shape[0]):
            domains[d].append(pool[start:start + counts[d, j]])
            start += counts[d, j]
    return [np.sort(np.concatenate(parts)).astype(np.int64) for parts in domains]


def build_split(dataset: str, train_labels, num_classes: int, seed: int, *, test_labels=None,
                num_domains: int = 4, classes=None, samples_per_domain: int = 0, concentration: float = 3.0,
                max_condition_number: float = 10.0, test_samples_per_domain: int = 0, **unknown) -> dict:
    """Build and validate a ``latent_shift`` manifest (plain JSON types). Positions index
    ``train_labels`` (``domains``, ``unlabelled``) and ``test_labels`` (``test``). Raises
    ``SplitError`` naming the field for any input that does not fit; nothing is written here."""
    if unknown:
        name = next(iter(unknown))
        fail_field(name, f"does not apply to kind {KIND!r} (its parameters: num_domains, classes, samples_per_domain, "
                    f"concentration, max_condition_number, test_samples_per_domain)")
    num_classes, seed, train, test = checked_common_fields(dataset, num_classes, seed, train_labels, test_labels)

    if classes is None:
        used = list(range(num_classes))
    else:
        check_field(isinstance(classes, (list, tuple)) and all(isinstance(c, numbers.Integral) and not isinstance(c, bool)
                                                          for c in classes), "classes",
               f"must be a list of class ids, got {classes!r}")
        used = sorted(int(c) for c in classes)
        check_field(len(set(used)) == len(used), "classes", f"repeats a class: {list(classes)}")
        check_field(all(0 <= c < num_classes for c in used), "classes",
               f"class ids must lie in [0, {num_classes}) for {dataset}, got {used}")
    check_field(len(used) >= 2, "classes", f"needs at least 2 classes to discover, got {used}")
    num_domains = as_int(num_domains, "num_domains")
    check_field(num_domains >= len(used), "num_domains",
           f"{num_domains} domains for {len(used)} classes: p(y|d) must have rank k, so LLS needs at least as many "
           f"domains as classes")
    samples_per_domain = as_int(samples_per_domain, "samples_per_domain")
    check_field(samples_per_domain >= 0, "samples_per_domain", f"must be >= 0 (0: as many as fit), got {samples_per_domain}")
    test_samples_per_domain = as_int(test_samples_per_domain, "test_samples_per_domain")
    check_field(test_samples_per_domain >= 0, "test_samples_per_domain",
           f"must be >= 0 (0: as many as fit), got {test_samples_per_domain}")
    concentration = as_float(concentration, "concentration")
    check_field(concentration > 0, "concentration", f"the Dirichlet concentration must be > 0, got {concentration}")
    max_condition_number = as_float(max_condition_number, "max_condition_number")
    check_field(max_condition_number == 0 or max_condition_number >= 1, "max_condition_number",
           f"a condition number is at least 1 (0: no cap), got {max_condition_number}")

    pools = np.array([int((train == c).sum()) for c in used])
    check_field(bool((pools > 0).all()), "classes",
           f"class {used[int(np.argmin(pools))]} has no training sample in {dataset}")
    priors, cond = draw_domain_priors(num_domains, len(used), concentration, max_condition_number, seed)
    per_domain = _fit_per_domain(priors, pools, used, samples_per_domain, "samples_per_domain", "training")
    counts = _counts(priors, per_domain)
    domains = _deal(train, used, counts, seed, _TRAIN_POOL)

    test_positions, test_domains, test_counts = [], [], np.zeros_like(counts)
    test_per_domain = 0
    if test is not None:
        test_pools = np.array([int((test == c).sum()) for c in used])
        check_field(bool((test_pools > 0).all()), "classes",
               f"class {used[int(np.argmin(test_pools))]} has no test sample in {dataset}")
        test_per_domain = _fit_per_domain(priors, test_pools, used, test_samples_per_domain,
                                          "test_samples_per_domain", "test")
        test_counts = _counts(priors, test_per_domain)
        parts = _deal(test, used, test_counts, seed, _TEST_POOL)
        pos = np.concatenate(parts)
        dom = np.concatenate([np.full(len(p), d, dtype=np.int64) for d, p in enumerate(parts)])
        order = np.argsort(pos, kind="stable")  # test sorted by position, each with its domain
        test_positions, test_domains = pos[order].tolist(), dom[order].tolist()

    params = {"num_domains": num_domains, "classes": used, "samples_per_domain": per_domain,
              "requested_samples_per_domain": samples_per_domain, "concentration": concentration,
              "max_condition_number": max_condition_number, "condition_number": cond,
              "test_samples_per_domain": test_per_domain,
              "requested_test_samples_per_domain": test_samples_per_domain}
    manifest = {"kind": KIND, "dataset": dataset, "seed": seed, "num_classes": num_classes, "params": params,
                "class_order": [int(c) for c in np.random.default_rng(seed).permutation(num_classes)],
                "known_classes": [], "novel_classes": used, "labelled": [],
                "unlabelled": sorted(int(i) for d in domains for i in d),
                "domains": [[int(i) for i in d] for d in domains],
                "test": [int(i) for i in test_positions], "test_domains": [int(d) for d in test_domains],
                "domain_priors": [[float(v) for v in row] for row in priors],
                "domain_class_counts": counts.tolist(), "test_domain_class_counts": test_counts.tolist()}
    validate_split(manifest)
    return manifest


def _sorted_positions(values, field_name: str) -> None:
    check_field(isinstance(values, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                            for i in values), field_name, "must hold non-negative integer positions")
    check_field(all(a < b for a, b in zip(values, values[1:])), field_name, "must be sorted without repeats")


def validate_split(manifest: dict) -> None:
    """Check a ``latent_shift`` manifest's invariants; raise ``SplitError`` naming the field."""
    check_field(isinstance(manifest, dict), "manifest", f"a manifest is a dict, got {type(manifest).__name__}")
    for key in ("kind", "dataset", "seed", "num_classes", "params", "class_order", "known_classes", "novel_classes",
                "labelled", "unlabelled", "domains", "test", "test_domains", "domain_priors"):
        check_field(key in manifest, key, "missing from the manifest")
    check_field(manifest["kind"] == KIND, "kind", f"this module checks {KIND!r} manifests, got {manifest['kind']!r}")
    num_classes = manifest["num_classes"]
    check_field(isinstance(num_classes, int) and num_classes >= 2, "num_classes",
           f"must be an integer >= 2, got {num_classes!r}")
    check_field(sorted(manifest["class_order"]) == list(range(num_classes)), "class_order",
           f"must be a permutation of range({num_classes})")
    check_field(manifest["known_classes"] == [], "known_classes", "a latent_shift split labels no class")
    check_field(manifest["labelled"] == [], "labelled", "a latent_shift split has no labelled sample")
    used = manifest["novel_classes"]
    check_field(isinstance(used, list) and len(used) >= 2 and used == sorted(set(used))
           and all(isinstance(c, int) and 0 <= c < num_classes for c in used), "novel_classes",
           f"must be at least 2 sorted distinct class ids in [0, {num_classes})")
    domains = manifest["domains"]
    check_field(isinstance(domains, list) and len(domains) >= len(used), "domains",
           f"must be a list of at least as many domains as classes ({len(used)}), got {domains!r:.80}")
    seen: set[int] = set()
    for d, members in enumerate(domains):
        _sorted_positions(members, f"domains[{d}]")
        check_field(len(members) > 0, "domains", f"domain {d} has no samples")
        check_field(not seen & set(members), "domains", f"domain {d} repeats samples of an earlier domain")
        seen |= set(members)
    _sorted_positions(manifest["unlabelled"], "unlabelled")
    check_field(sorted(seen) == manifest["unlabelled"], "unlabelled", "must be the union of the domains' samples")
    _sorted_positions(manifest["test"], "test")
    test_domains = manifest["test_domains"]
    check_field(isinstance(test_domains, list) and len(test_domains) == len(manifest["test"]), "test_domains",
           f"must give the domain of each of the {len(manifest['test'])} test positions")
    check_field(all(isinstance(d, int) and 0 <= d < len(domains) for d in test_domains), "test_domains",
           f"domain ids must lie in [0, {len(domains)})")
    priors = np.asarray(manifest["domain_priors"], dtype=np.float64)
    check_field(priors.shape == (len(domains), len(used)), "domain_priors",
           f"must be {len(domains)} domains x {len(used)} classes, got shape {priors.shape}")
    check_field(bool((priors >= 0).all()) and np.allclose(priors.sum(1), 1.0, atol=1e-6), "domain_priors",
           "each row must be a distribution over the classes")
    params = manifest["params"]
    check_field(isinstance(params, dict) and params.get("num_domains") == len(domains), "params",
           f"params.num_domains must equal the {len(domains)} domains")
