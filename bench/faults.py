"""``make faults``: kill small training jobs with SIGKILL at 20 random points, resume each, and
count how many resumed runs ended bit-identical to an uninterrupted one (target 20/20).

The kill points are drawn (seeded) over three kinds of moment, through the engine's fault
hook (``CLASSLAB_KILL_AT``, see ``classlab.engine.faults``):

- ``step``: right after a random optimizer step, mid-epoch (with mid-epoch checkpoints every
  few steps, so some kills resume from a step checkpoint and some from an epoch one);
- ``epoch``: at the end of a random epoch, before its checkpoint is written;
- ``checkpoint_write``: inside a random checkpoint write, after the bytes reached the temporary
  file and before the rename.

Half of the jobs are ``classlab train`` (one model, epoch and step checkpoints), half are
``classlab train-incremental`` (five tasks: task checkpoints on top of the engine's). Each
killed job is rerun with the same command; its outputs must equal the reference run's byte
for byte (``model.pt`` tensors, ``predictions.npz`` arrays, losses in ``history.json``).
Prints one JSON line per trial and a summary line "faults: N/20 kills resumed bit-identical".
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TRIALS = int(os.environ.get("FAULT_TRIALS", 20))
BACKBONE = json.dumps({"widths": [8, 16], "pool_after": [0]})


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "classlab.cli", *args, "--threads", "1", "--no-progress"] \
        if args[0] in ("train", "train-incremental") else [sys.executable, "-m", "classlab.cli", *args]


def train_cmd(data: Path, out: Path) -> list[str]:
    return cli("train", "--family", "pretrain", "--method", "supervised", "--data", str(data), "--backbone",
               "convnet", "--backbone-kwargs", BACKBONE, "--seed", "3", "--out-dir", str(out), "--overrides",
               json.dumps({"epochs": 4, "batch_size": 64, "augment_pad": 1}))


def incremental_cmd(data: Path, scenario: Path, out: Path) -> list[str]:
    return cli("train-incremental", "--method", "finetune", "--data", str(data), "--scenario", str(scenario),
               "--backbone", "convnet", "--backbone-kwargs", BACKBONE, "--seed", "3", "--ckpt-dir", str(out / "ckpt"),
               "--eval-dir", str(out / "eval"), "--overrides",
               json.dumps({"epochs": 2, "batch_size": 32, "augment_pad": 1}))


def run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def tensors_equal(a: Path, b: Path) -> bool:
    x = torch.load(a, weights_only=True)
    y = torch.load(b, weights_only=True)
    x, y = x.get("model", x.get("learner")), y.get("model", y.get("learner"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def arrays_equal(a: Path, b: Path) -> bool:
    with np.load(a) as x, np.load(b) as y:
        return sorted(x.files) == sorted(y.files) and all(np.array_equal(x[k], y[k]) for k in x.files)


def same_result(kind: str, ref: Path, out: Path) -> bool:
    if kind == "train":
        losses = [json.loads((d / "history.json").read_text())["epochs"] for d in (ref, out)]
        return tensors_equal(ref / "model.pt", out / "model.pt") and \
            [e["loss"] for e in losses[0]] == [e["loss"] for e in losses[1]]
    return tensors_equal(ref / "ckpt" / "model.pt", out / "ckpt" / "model.pt") and \
        arrays_equal(ref / "eval" / "predictions.npz", out / "eval" / "predictions.npz")


def main() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from classlab.data.prepare import load_prepared, prepare
    from classlab.data.registry import get_dataset
    from classlab.data.scenarios import build_scenario

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CLASSLAB_CHECKPOINT_EVERY_STEPS": "4"}
    rng = random.Random(int(os.environ.get("FAULT_SEED", 0)))
    work = Path(tempfile.mkdtemp(prefix="classlab-faults-"))
    spec = get_dataset("digits")
    spec.download(work / "raw")
    prepare("digits", work / "raw", work / "prep")
    data = load_prepared(work / "prep")
    scenario = build_scenario("class_incremental", "digits", data.train.y.numpy(), data.num_classes, 0,
                              initial=0, increment=2)
    scenario.save(work / "scenario.json")

    jobs = {"train": lambda out: train_cmd(work / "prep", out),
            "incremental": lambda out: incremental_cmd(work / "prep", work / "scenario.json", out)}
    refs, events = {}, {}
    for kind, make in jobs.items():
        refs[kind] = work / f"ref-{kind}"
        done = run(make(refs[kind]), env)
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return 1
        events[kind] = _events(kind, refs[kind])

    ok, t_start = 0, time.time()
    for trial in range(TRIALS):
        kind = "train" if trial % 2 == 0 else "incremental"
        event = ("step", "epoch", "checkpoint_write", "step")[trial // 2 % 4]
        nth = rng.randint(1, events[kind][event])
        out = work / f"trial{trial}"
        cmd = jobs[kind](out)
        killed = run(cmd, {**env, "CLASSLAB_KILL_AT": f"{event}:{nth}"})
        was_killed = killed.returncode == -signal.SIGKILL
        resumed = run(cmd, env)
        same = resumed.returncode == 0 and same_result(kind, refs[kind], out)
        ok += bool(same and was_killed)
        print(json.dumps({"trial": trial, "job": kind, "kill_at": f"{event}:{nth}", "killed": was_killed,
                          "resumed_from": _resumed_from(resumed.stderr), "bit_identical": bool(same)}), flush=True)
    print(json.dumps({"bench": "faults", "kills": TRIALS, "bit_identical": ok,
                      "seconds": round(time.time() - t_start, 1)}))
    print(f"faults: {ok}/{TRIALS} kills resumed bit-identical")
    return 0 if ok == TRIALS else 1


def _events(kind: str, ref: Path) -> dict[str, int]:
    """Steps, epochs and checkpoint writes of the reference job, from its history."""
    if kind == "train":
        history = json.loads((ref / "history.json").read_text())
        steps, epochs = int(history["meta"]["train_steps"]), len(history["epochs"])
        writes = epochs  # at least one per epoch (plus mid-epoch ones and model.pt)
    else:
        history = json.loads((ref / "ckpt" / "history.json").read_text())
        steps = int(history["meta"]["train_steps"])
        epochs = sum(len(t["epochs"]) for t in history["tasks"])
        writes = epochs + len(history["tasks"])  # epoch and task checkpoints (plus mid-epoch ones)
    return {"step": max(steps, 1), "epoch": max(epochs, 1), "checkpoint_write": max(writes, 1)}


def _resumed_from(stderr: str) -> str:
    for line in stderr.splitlines():
        if "resuming from" in line:
            return line.split("after", 1)[-1].strip()
    return "task checkpoint" if "task" in stderr else "start"


if __name__ == "__main__":
    sys.exit(main())
