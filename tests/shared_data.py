"""Small shared inputs for the incremental tests, built once per machine and reused.

The layout mirrors what the method tests expect: prepared digits, four scenarios (class-order
seed 0) and backbones pretrained on the first task's classes of B4Inc2 only. Everything is
deterministic, so a cached copy from an earlier run is identical to a fresh one; a marker
file written last tells a complete build from one that was interrupted.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

def _code_digest() -> str:
    """The cache is keyed by the code that builds it (data layer, engine, models, training): a
    change there builds fresh inputs instead of reusing ones made by older code."""
    src = Path(__file__).resolve().parents[1] / "src" / "classlab"
    digest = hashlib.sha256()
    for path in sorted([*src.glob("data/*.py"), *src.glob("engine/*.py"), *src.glob("models/*.py"),
                        *src.glob("methods/pretrain/*.py"), src / "methods" / "base.py", src / "train.py",
                        Path(__file__)]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


SHARED = Path(tempfile.gettempdir()) / f"classlab-test-shared-{_code_digest()}"
SCENARIOS = {
    "digits_b0inc2": {"kind": "class_incremental", "initial": 0, "increment": 2},
    "digits_b4inc2": {"kind": "class_incremental", "initial": 4, "increment": 2},
    "digits_fscil": {"kind": "few_shot", "base_classes": 6, "ways": 2, "shots": 5},
    "digits_siblurry": {"kind": "si_blurry", "num_tasks": 5, "disjoint_class_ratio": 0.5, "blurry_sample_ratio": 0.1},
}
PRETRAIN = {
    "convnet": ('{"widths":[16,32],"pool_after":[0]}',
                {"epochs": 8, "batch_size": 64, "augment_pad": 1, "augment_hflip": False, "lr": 0.05}),
    "vit_tiny": ("{}", {"epochs": 15, "batch_size": 64, "augment_pad": 1, "augment_hflip": False, "lr": 0.001,
                        "optimizer": "adamw", "weight_decay": 0.05}),
}


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "classlab.cli", *args], check=True, capture_output=True)


def ensure_shared() -> Path:
    done = SHARED / "COMPLETE"
    if done.exists():
        return SHARED
    SHARED.parent.mkdir(parents=True, exist_ok=True)
    with open(SHARED.parent / f"{SHARED.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; concurrent sessions wait for it
        if done.exists():
            return SHARED
        if SHARED.exists():
            shutil.rmtree(SHARED)
        prep = SHARED / "prepared" / "digits"
        _cli("download", "--dataset", "digits", "--out-dir", str(SHARED / "raw" / "digits"))
        _cli("prepare", "--dataset", "digits", "--raw-dir", str(SHARED / "raw" / "digits"), "--out-dir", str(prep))
        for name, params in SCENARIOS.items():
            _cli("build-scenario", "--data", str(prep), "--params", json.dumps(params), "--seed", "0",
                 "--out", str(SHARED / "scenarios" / f"{name}.json"))
        for backbone, (kwargs, overrides) in PRETRAIN.items():
            _cli("train", "--family", "pretrain", "--method", "supervised", "--data", str(prep), "--backbone", backbone,
                 "--backbone-kwargs", kwargs, "--seed", "0", "--overrides", json.dumps(overrides),
                 "--classes-from-scenario", str(SHARED / "scenarios" / "digits_b4inc2.json"), "--threads", "2",
                 "--out-dir", str(SHARED / "pretrain" / f"digits_b4inc2_{backbone}"), "--no-progress")
        done.write_text("ok\n")
    return SHARED
