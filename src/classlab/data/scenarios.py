"""Scenarios are data: a task sequence written as a JSON manifest of indices with its seed.

Every method in a comparison reads the same manifest, so each sees exactly the same samples in
the same order. The class order comes from ``class_order_seed`` and is recorded; the torch seed
of a run is recorded separately by the run itself.

Kinds:
- ``class_incremental``: B0IncK (``initial`` 0 or equal to ``increment``: every task has
  ``increment`` classes) and BxIncK (a first task of ``initial`` classes, then ``increment``).
- ``few_shot``: a base session of ``base_classes`` with all their samples, then sessions of
  ``ways`` new classes with ``shots`` training samples each (FSCIL; TEEN).
- ``si_blurry``: Stochastic incremental Blurry boundaries (Moon et al., ICCV 2023 / MVP):
  ``disjoint_class_ratio`` of the classes appear in one task only; the others are "blurry":
  ``blurry_sample_ratio`` of their samples are scattered into other tasks. Task boundaries are
  drawn with replacement, as in the official builder, so task sizes are random and a task may
  be empty (stochastic boundaries). Training is one online pass over the stream.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from classlab.io import write_json


class ScenarioError(ValueError):
    """A scenario that does not fit the dataset; the message names the field."""


@dataclass
class Task:
    classes: list[int]            # classes first introduced by this task (in class order)
    train_indices: list[int]      # indices into the prepared train split, in stream order
    test_classes: list[int] = field(default_factory=list)  # classes evaluated after this task (all seen)


@dataclass
class ClassIncrementalScenario:
    kind: str
    dataset: str
    num_classes: int
    class_order: list[int]
    class_order_seed: int
    params: dict
    tasks: list[Task]
    pretrain_classes: list[int] = field(default_factory=list)  # labels a pretrained backbone may have seen
    # evaluation subset of the test split (sorted indices); None: the whole test split
    test_indices: list[int] | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def task_of_class(self) -> dict[int, int]:
        return {c: t for t, task in enumerate(self.tasks) for c in task.classes}

    def test_mask(self, test_labels, classes) -> "torch.Tensor":
        """Boolean mask over the test split: samples of ``classes`` inside the evaluation subset."""
        import torch

        mask = torch.isin(test_labels, torch.tensor(list(classes)))
        if self.test_indices is not None:
            subset = torch.zeros_like(mask)
            subset[torch.tensor(self.test_indices, dtype=torch.long)] = True
            mask &= subset
        return mask

    def to_json(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> "ClassIncrementalScenario":
        doc = json.loads(Path(path).read_text())
        doc["tasks"] = [Task(**t) for t in doc["tasks"]]
        return cls(**doc)


def _check(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise ScenarioError(f"scenario.{field_name}: {message}")


def _class_order(num_classes: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).permutation(num_classes).tolist()


def class_incremental(dataset: str, train_labels: np.ndarray, num_classes: int, *, initial: int, increment: int,
                      seed: int, samples_per_class: int | None = None) -> ClassIncrementalScenario:
    """B0IncK when ``initial`` is 0 (or equal to ``increment``), BxIncK otherwise.

    ``samples_per_class`` keeps a seeded subset of each class's training samples (for runs that
    must fit a CPU budget; the manifest records it)."""
    _check(increment >= 1, "increment", f"must be at least 1 class per task, got {increment}")
    _check(initial >= 0, "initial", f"must be >= 0, got {initial}")
    first = initial or increment
    _check(first <= num_classes, "initial", f"{first} classes requested but {dataset} has {num_classes}")
    _check((num_classes - first) % increment == 0, "increment",
           f"{num_classes - first} classes after the first task do not split into tasks of {increment}")
    _check(num_classes - first >= increment or first == num_classes, "increment", "needs at least one task")
    if samples_per_class is not None:
        _check(samples_per_class >= 1, "samples_per_class", f"must be at least 1, got {samples_per_class}")
    order = _class_order(num_classes, seed)
    groups = [order[:first]] + [order[i:i + increment] for i in range(first, num_classes, increment)]
    tasks, seen = [], []
    rng = np.random.default_rng(seed + 1)
    for group in groups:
        seen = seen + group
        if samples_per_class is None:
            idx = np.flatnonzero(np.isin(train_labels, group))
        else:
            idx = np.concatenate([rng.permutation(np.flatnonzero(train_labels == c))[:samples_per_class] for c in group])
        tasks.append(Task(group, rng.permutation(idx).tolist(), list(seen)))
    kind_name = "B0Inc" if initial in (0, increment) else f"B{initial}Inc"
    return ClassIncrementalScenario("class_incremental", dataset, num_classes, order, seed,
                                    {"initial": initial, "increment": increment, "name": f"{kind_name}{increment}",
                                     "samples_per_class": samples_per_class},
                                    tasks, pretrain_classes=[])


def few_shot(dataset: str, train_labels: np.ndarray, num_classes: int, *, base_classes: int, ways: int, shots: int,
             seed: int, samples_per_class: int | None = None) -> ClassIncrementalScenario:
    """A base session with all samples of ``base_classes`` (or a seeded ``samples_per_class``
    subset of each), then N-way K-shot sessions."""
    _check(base_classes >= 1, "base_classes", f"must be at least 1, got {base_classes}")
    _check(base_classes < num_classes, "base_classes",
           f"{base_classes} base classes leave no novel class of {num_classes}")
    _check(ways >= 1, "ways", f"a session needs at least 1 new class, got {ways}")
    _check(shots >= 1, "shots", f"a session needs at least 1 shot, got {shots}")
    _check((num_classes - base_classes) % ways == 0, "ways",
           f"{num_classes - base_classes} novel classes do not split into {ways}-way sessions")
    counts = np.bincount(train_labels, minlength=num_classes)
    _check(int(counts.min()) >= shots, "shots", f"{shots} shots but a class has only {int(counts.min())} samples")
    order = _class_order(num_classes, seed)
    rng = np.random.default_rng(seed + 1)
    if samples_per_class is not None:
        _check(samples_per_class >= 1, "samples_per_class", f"must be at least 1, got {samples_per_class}")
    base = order[:base_classes]
    if samples_per_class is None:
        base_idx = np.flatnonzero(np.isin(train_labels, base))
    else:
        base_idx = np.concatenate([rng.permutation(np.flatnonzero(train_labels == c))[:samples_per_class] for c in base])
    tasks = [Task(base, rng.permutation(base_idx).tolist(), list(base))]
    seen = list(base)
    for i in range(base_classes, num_classes, ways):
        group = order[i:i + ways]
        seen = seen + group
        idx = np.concatenate([rng.choice(np.flatnonzero(train_labels == c), shots, replace=False) for c in group])
        tasks.append(Task(group, rng.permutation(idx).tolist(), list(seen)))
    return ClassIncrementalScenario("few_shot", dataset, num_classes, order, seed,
                                    {"base_classes": base_classes, "ways": ways, "shots": shots,
                                     "samples_per_class": samples_per_class,
                                     "name": f"{base_classes}+{ways}way{shots}shot"}, tasks)


def si_blurry(dataset: str, train_labels: np.ndarray, num_classes: int, *, num_tasks: int,
              disjoint_class_ratio: float, blurry_sample_ratio: float, seed: int,
              samples_per_class: int | None = None) -> ClassIncrementalScenario:
    """Si-Blurry (stochastic incremental blurry boundaries), built as the official builder does.

    The official builder is ``OnlineSampler`` in ``utils/online_sampler.py`` of the Si-Blurry / MVP
    code (github.com/KHU-AGI/Si-Blurry), with ``--rnd_NM`` (``varing_NM``), which its
    ``scripts/mvp.sh`` passes. From one seeded generator it:

    1. permutes the classes; the first N = floor(C * n%) are disjoint, the rest blurry;
    2. splits the disjoint classes into T consecutive groups at T - 1 cut points drawn uniformly
       from {0, ..., N - 1} WITH replacement and sorted (``randint(0, N, (T - 1,))``): equal cut
       points give a task no disjoint class, so the number of classes per task varies and can be 0;
    3. splits the blurry classes the same way, with their own cut points;
    4. collects each task's samples of its disjoint and of its blurry classes;
    5. takes K = floor(m% * number of blurry-class samples) and cuts K the same way (T - 1 points
       from {0, ..., K - 1} with replacement): task t moves its first k_t = K_{t+1} - K_t blurry
       samples (or all it has, if fewer) into a pool; the pool is shuffled and dealt back, k_t
       samples to task t in task order, so blurry samples land in other tasks;
    6. shuffles each task's disjoint + blurry samples: the task's stream.

    Task sizes therefore vary, and a task can receive no new class and even no sample at all; the
    manifest keeps such a task (``classes`` and ``train_indices`` empty), and the protocol runs it
    as a task with nothing to learn.

    Differences, stated: (a) the official code rounds N and C - N down to multiples of T, a
    leftover of its fixed-split branch that drops the remaining classes from the stream; we keep
    every class (the same result whenever both counts divide by T, as for CIFAR-100 N50 in 5
    tasks and for our 10 classes in 5 tasks); (b) it takes a task's first k_t blurry samples in
    dataset order, we shuffle them first (the same distribution for an unordered dataset);
    (c) ``samples_per_class`` keeps a seeded subset of each class first (for CPU-budget runs).
    A class belongs to the first task whose stream holds one of its samples (``Task.classes``).
    """
    _check(num_tasks >= 2, "num_tasks", f"needs at least 2 tasks, got {num_tasks}")
    _check(num_tasks <= num_classes, "num_tasks", f"{num_tasks} tasks but only {num_classes} classes")
    _check(0.0 <= disjoint_class_ratio <= 1.0, "disjoint_class_ratio", "must lie in [0, 1]")
    _check(0.0 <= blurry_sample_ratio <= 1.0, "blurry_sample_ratio", "must lie in [0, 1]")
    if samples_per_class is not None:
        _check(samples_per_class >= 1, "samples_per_class", f"must be at least 1, got {samples_per_class}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_classes).tolist()
    n_disjoint = int(np.floor(disjoint_class_ratio * num_classes + 1e-9))
    disjoint, blurry = order[:n_disjoint], order[n_disjoint:]

    def cut_points(n: int) -> list[int]:
        # [0] + sorted(T - 1 draws from {0, ..., n - 1}, with replacement) + [n]: stochastic boundaries
        if n == 0:
            return [0] * (num_tasks + 1)
        return [0] + np.sort(rng.integers(0, n, size=num_tasks - 1)).tolist() + [n]

    def split(items: list[int]) -> list[list[int]]:
        cuts = cut_points(len(items))
        return [items[cuts[t]:cuts[t + 1]] for t in range(num_tasks)]

    disjoint_parts, blurry_parts = split(disjoint), split(blurry)

    def class_samples(c: int) -> list[int]:
        idx = np.flatnonzero(train_labels == c)
        if samples_per_class:
            idx = rng.permutation(idx)[:samples_per_class]
        return [int(i) for i in idx]

    disjoint_idx = [[i for c in disjoint_parts[t] for i in class_samples(c)] for t in range(num_tasks)]
    blurry_idx = [rng.permutation(np.array([i for c in blurry_parts[t] for i in class_samples(c)],
                                           dtype=np.int64)).tolist() for t in range(num_tasks)]
    n_blurred = int(np.floor(blurry_sample_ratio * sum(len(b) for b in blurry_idx) + 1e-9))
    if n_blurred > 0:
        cuts = cut_points(n_blurred)
        moved = [cuts[t + 1] - cuts[t] for t in range(num_tasks)]
        pool: list[int] = []
        for t in range(num_tasks):          # task t gives its first k_t blurry samples (all, if fewer)
            pool += blurry_idx[t][:moved[t]]
            blurry_idx[t] = blurry_idx[t][moved[t]:]
        pool = rng.permutation(np.array(pool, dtype=np.int64)).tolist()
        for t in range(num_tasks):          # ... and receives k_t from the shuffled pool
            blurry_idx[t] += pool[:moved[t]]
            pool = pool[moved[t]:]
    tasks, seen = [], []
    for t in range(num_tasks):
        stream = rng.permutation(np.array(disjoint_idx[t] + blurry_idx[t], dtype=np.int64)).tolist()
        # a class is "seen" from the first task whose stream contains it
        present = sorted(set(int(train_labels[i]) for i in stream) - set(seen), key=order.index)
        seen = seen + present
        tasks.append(Task(present, stream, list(seen)))
    return ClassIncrementalScenario("si_blurry", dataset, num_classes, order, seed,
                                    {"num_tasks": num_tasks, "disjoint_class_ratio": disjoint_class_ratio,
                                     "blurry_sample_ratio": blurry_sample_ratio,
                                     "samples_per_class": samples_per_class,
                                     "name": f"SiBlurry{num_tasks}(N{int(100 * disjoint_class_ratio)},M{int(100 * blurry_sample_ratio)})"},
                                    tasks)


def validate_forget_tasks(forget_tasks, num_classes: int) -> list[list[int]]:
    """Each task a non-empty list of class ids in range; no class twice; some class retained."""
    if not isinstance(forget_tasks, (list, tuple)) or not forget_tasks:
        raise ScenarioError("forget_tasks: give a non-empty list of tasks, each a list of class ids")
    out, seen = [], set()
    for t, task in enumerate(forget_tasks):
        if not isinstance(task, (list, tuple)) or not task:
            raise ScenarioError(f"forget_tasks[{t}]: a non-empty list of class ids, got {task!r}")
        for c in task:
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= int(c) < num_classes:
                raise ScenarioError(f"forget_tasks[{t}]: {c!r} is not a class id in [0, {num_classes})")
            if int(c) in seen:
                raise ScenarioError(f"forget_tasks[{t}]: class {int(c)} is forgotten twice")
            seen.add(int(c))
        out.append([int(c) for c in task])
    if len(seen) >= num_classes:
        raise ScenarioError(f"forget_tasks: all {num_classes} classes are forgotten; keep at least one")
    return out


BUILDERS = {"class_incremental": class_incremental, "few_shot": few_shot, "si_blurry": si_blurry}


def test_subset(test_labels: np.ndarray, num_classes: int, per_class: int, seed: int) -> list[int]:
    """A seeded subset of ``per_class`` test samples of every class (all of a class that has fewer),
    sorted; for CPU-budget runs, which evaluate after every task. The same for every method."""
    _check(per_class >= 1, "test_samples_per_class", f"must be at least 1, got {per_class}")
    rng = np.random.default_rng(seed + 2)
    labels = np.asarray(test_labels)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(num_classes)]
    return sorted(int(i) for i in np.concatenate(picked))


def build_scenario(kind: str, dataset: str, train_labels: np.ndarray, num_classes: int, seed: int,
                   test_labels: np.ndarray | None = None, **params) -> ClassIncrementalScenario:
    """Build a scenario of ``kind``. ``test_samples_per_class`` (any kind) evaluates on a seeded
    per-class subset of the test split, recorded as ``test_indices``; it needs ``test_labels``."""
    if kind not in BUILDERS:
        raise ScenarioError(f"scenario.kind: {kind!r} is not allowed; allowed values: {sorted(BUILDERS)}")
    test_per_class = params.pop("test_samples_per_class", None)
    # the anytime-evaluation grid of an online stream belongs to the scenario, so that every
    # method of a comparison is evaluated at the same stream positions
    eval_period = params.pop("eval_period", None)
    if eval_period is not None and (kind != "si_blurry" or int(eval_period) < 1):
        raise ScenarioError(f"scenario.eval_period: {eval_period!r} applies to online (si_blurry) scenarios only, "
                            f"as a positive number of stream samples")
    try:
        scenario = BUILDERS[kind](dataset, np.asarray(train_labels), num_classes, seed=seed, **params)
    except TypeError as exc:
        raise ScenarioError(f"scenario ({kind}): {exc}") from None
    if test_per_class is not None:
        if test_labels is None:
            raise ScenarioError("scenario.test_samples_per_class: the test labels are needed to draw the subset")
        scenario.test_indices = test_subset(test_labels, num_classes, int(test_per_class), seed)
        scenario.params["test_samples_per_class"] = int(test_per_class)
    if eval_period is not None:
        scenario.params["eval_period"] = int(eval_period)
    return scenario
