"""Why NoProp's backprop twin trains poorly: inspect the inference chain of trained checkpoints.

For each ``noprop`` / ``noprop_backprop`` checkpoint of a recipes grid (``results/checkpoints/
supervised/fashion_mnist/convnet/<method>/seed<k>/model.pt`` under ``RESULTS``, default
``results``), on the first 2,000 validation images: the chain's accuracy, the last block's own
argmax accuracy, how saturated the last block's softmax is (share of samples with max p > 0.99),
the head's logit range, how many classes the chain predicts at all, and a_T, b_T. Prints one
line per checkpoint. The README's NoProp diagnosis quotes these lines.

    RESULTS=/path/to/results .venv/bin/python bench/diagnose_noprop.py
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from classlab.data.prepare import load_prepared
from classlab.train import load_predictor

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("RESULTS", ROOT / "results"))


def chain_report(net, x: torch.Tensor, y: torch.Tensor) -> dict:
    with torch.no_grad():
        h = [block.encode(x) for block in net.blocks]
        z = torch.zeros(len(x), net.embed.shape[1])
        for t in range(1, net.T + 1):
            p = F.softmax(net.blocks[t - 1].logits(h[t - 1], z).float(), dim=1)
            z = net.coef_a[t - 1] * (p @ net.embed.float()) + net.coef_b[t - 1] * z  # the mean chain
        logits = net.head(z)
    return {"accuracy": round(float((logits.argmax(1) == y).float().mean()), 3),
            "last_block_accuracy": round(float((p.argmax(1) == y).float().mean()), 3),
            "last_block_saturated": round(float((p.max(1).values > 0.99).float().mean()), 2),
            "logit_range": round(float((logits.max(1).values - logits.min(1).values).mean()), 2),
            "classes_predicted": int(len(torch.unique(logits.argmax(1)))),
            "a_T": round(float(net.coef_a[-1]), 3), "b_T": round(float(net.coef_b[-1]), 3)}


def main() -> None:
    torch.set_num_threads(1)
    data = load_prepared(ROOT / "data" / "prepared" / "fashion_mnist")
    mean = torch.tensor(data.manifest["channel_mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data.manifest["channel_std"]).view(1, -1, 1, 1)
    x, y = (data.val.x[:2000].float() / 255 - mean) / std, data.val.y[:2000]
    for method in ("noprop", "noprop_backprop"):
        for path in sorted((RESULTS / "checkpoints/supervised/fashion_mnist/convnet" / method).glob("seed*/model.pt")):
            net, _ = load_predictor(path)
            net.eval()
            print({"method": method, "seed": path.parent.name, **chain_report(net, x, y)}, flush=True)


if __name__ == "__main__":
    main()
