"""KD++'s feature-norm claim: how large are the teacher's features next to the students'?

KD++'s norm-and-direction term, 1 - <s, c_y/|c_y|> / max(|s|, |t|), pushes the (projected) student
feature's norm up only while it is below the teacher's feature norm |t|. For each seed of a recipes
grid with a distillation teacher (``results/checkpoints/teacher/fashion_mnist/convnet/seed<k>/model.pt``
under ``RESULTS``, default ``results``), this prints the teacher's mean penultimate feature norm on
the test images, and each student's mean feature norm from its evaluation
(``results/eval/distill/.../predictions.npz``, ``feature_norm`` of the same images).

    RESULTS=/path/to/results .venv/bin/python bench/diagnose_kdpp_norms.py
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from classlab.data.prepare import load_prepared
from classlab.train import load_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("RESULTS", ROOT / "results"))
STUDENTS = ("ce", "kd", "nd_kd", "nd_kd_no_nd", "multi_aspect_kd")


def main() -> None:
    torch.set_num_threads(1)
    teachers = sorted((RESULTS / "checkpoints" / "teacher" / "fashion_mnist" / "convnet").glob("seed*/model.pt"))
    if not teachers:
        raise SystemExit(f"no teacher checkpoint under {RESULTS}/checkpoints/teacher/fashion_mnist/convnet")
    data = load_prepared(RESULTS.parent / "data" / "prepared" / "fashion_mnist")
    mean = torch.tensor(data.manifest["channel_mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data.manifest["channel_std"]).view(1, -1, 1, 1)
    x = (data.test.x.float() / 255 - mean) / std  # as evaluation normalises them
    for path in teachers:
        seed = path.parent.name
        model, _ = load_model(path)
        model.eval()
        with torch.no_grad():
            norm = float(torch.cat([model.features(x[i:i + 1000]).float().norm(dim=1)
                                    for i in range(0, len(x), 1000)]).mean())
        row = {"seed": seed, "teacher_feature_norm": round(norm, 2), "teacher_dim": int(model.head.in_features)}
        for student in STUDENTS:
            pred = RESULTS / "eval" / "distill" / "fashion_mnist" / "convnet" / student / seed / "predictions.npz"
            if pred.exists():
                with np.load(pred) as z:
                    if "feature_norm" in z.files:
                        row[f"{student}_feature_norm"] = round(float(z["feature_norm"].mean()), 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
