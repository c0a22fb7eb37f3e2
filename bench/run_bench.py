"""`make bench`: JSON lines, each measured in this run on this machine.

1. loader_throughput: training throughput (images/s) of the engine's tensor-resident loader with
   batched augmentation against a torchvision DataLoader with per-sample PIL transforms (the same
   augmentation), on the same model, batch size, optimizer and thread count. ``ratio`` =
   engine / best baseline configuration. Also the share of step time spent outside forward
   and backward for each.
2. job_threads: the default ConvNet's combined training throughput of two one-thread processes
   running side by side against one two-thread process, on the same cores. ``make run`` caps
   each job at one thread (THREADS_PER_JOB) because this ratio is above 1 on 2 cores.
3. noop_rerun: wall time of `snakemake -c2` on a DAG whose outputs are all up to date (the
   default config when `make run` has completed here, else the smoke config in a scratch copy),
   next to `snakemake --version`'s (Snakemake's own start-up) and the difference, the workflow's part.
4. incremental_run: one class-incremental run's time per task.
5. discovery_run: one generalized category discovery run (SimGCD), images per second.
6. saliency_maps: maps per second of each explain method on the same untrained scene ConvNet and
   the same batch of Fashion-MNIST-sized scenes (84x84), relative to Grad-CAM's in the same run.
7. recipe_step_time: each training recipe's and distillation student's step time relative to
   erm's, measured in the same process (SAM takes two forward-backward passes, so about 2x).
8. tta_stream: images/s of each test-time adaptation method over one corrupted stream, relative to
   the unadapted source model's in the same run.
9. condensation: outer iterations (image updates) per second of each bi-level condensation method
   at 1 image per class on DC's ConvNet, as config/condense_cpu.yaml runs it, relative to DC's in
   the same run.
10. prompt_learning: training images/s of each vlm prompt learner on the default ConvNet's offline
   CLIP, with the text-tower calls and the prompt sequences it encodes per step, relative to CoOp's.
11. metric_learning: training images/s of each deep-metric-learning method (the losses with their
   miners, ECAML's confusion term, Metrix's mixed examples) at config/metric_cpu.yaml's settings,
   relative to multi-similarity's (the base loss both regularisers wrap) in the same run.
12. single_paper: each single-paper protocol's training cost against its own baseline in the same run:
   INS's instances/s against attention MIL's (mil), and ASPL's seconds per round (pool scoring and
   pseudo-labels included) against active learning alone's (aspl); icl_gd's Adam steps per second.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"
BIN = Path(sys.executable).parent


def emit(row: dict) -> None:
    line = json.dumps(row, sort_keys=True)
    print(line, flush=True)
    with open(OUT / "bench.jsonl", "a") as fh:
        fh.write(line + "\n")


def fashion_mnist() -> "PreparedDataset":
    from classlab.data.prepare import load_prepared, prepare
    from classlab.data.registry import get_dataset

    prepared = ROOT / "data" / "prepared" / "fashion_mnist"
    if not (prepared / "manifest.json").exists():
        prepared = OUT / "fashion_mnist"
        if not (prepared / "manifest.json").exists():
            get_dataset("fashion_mnist").download(OUT / "raw_fashion_mnist")
            prepare("fashion_mnist", OUT / "raw_fashion_mnist", prepared)
    return load_prepared(prepared)


def config_model(config_name: str):
    """The first backbone of a shipped config, built for 28x28 single-channel images."""
    from classlab.models import build_classifier

    config = yaml.safe_load((ROOT / "config" / config_name).read_text())
    backbone = config["backbones"][0]
    torch.manual_seed(0)
    kwargs = config["backbone_kwargs"].get(backbone, {})
    from classlab.engine.device import place

    # the engine's placement (channels-last convolutions) for both loaders: only the input path differs
    model = place(build_classifier(backbone, 1, 10, img_size=28, backbone_kwargs=kwargs), torch.device("cpu"))
    return model, f"{backbone} {kwargs} ({config_name})"


def timed_training(model, batches, steps: int, warmup: int = 5) -> dict:
    """Run ``steps`` SGD steps, timing batch production and forward+backward separately."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    model.train()
    it = iter(batches)
    t_data = t_compute = t_total = 0.0
    images = 0
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        x, y = next(it)
        t1 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if step >= warmup:
            t_data += t1 - t0
            t_compute += t2 - t1
            t_total += t3 - t0
            images += len(y)
    return {"images_per_s": images / t_total, "share_outside_fwd_bwd": 1 - t_compute / t_total,
            "data_s_per_step": t_data / steps, "steps": steps}


def engine_batches(data, batch_size: int):
    from classlab.data.loader import AugmentSpec, TensorLoader

    loader = TensorLoader(data.train.x, data.train.y, batch_size, device=torch.device("cpu"),
                          mean=data.manifest["channel_mean"], std=data.manifest["channel_std"], shuffle=True,
                          seed=0, augment=AugmentSpec(pad=2, hflip=True), drop_last=True)
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            yield batch["x"], batch["y"]
        epoch += 1


def pil_batches(data, batch_size: int, workers: int):
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    class UInt8Images(Dataset):
        """The torchvision idiom: one PIL image per __getitem__, per-sample transforms."""

        def __init__(self, x, y):
            self.x, self.y = x.numpy(), y.numpy()
            self.transform = transforms.Compose([
                transforms.RandomCrop(28, padding=2), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                transforms.Normalize(data.manifest["channel_mean"], data.manifest["channel_std"])])

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.transform(Image.fromarray(self.x[i, 0], mode="L")), int(self.y[i])

    loader = DataLoader(UInt8Images(data.train.x, data.train.y), batch_size=batch_size, shuffle=True,
                        num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    while True:
        yield from loader


def bench_loader(steps: int, config_name: str) -> None:
    torch.set_num_threads(2)
    data = fashion_mnist()
    batch_size = 128
    results = {}
    model, backbone = config_model(config_name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results["engine"] = timed_training(model, engine_batches(data, batch_size), steps)
    for workers in (0, 2):
        model.load_state_dict(state)
        results[f"torchvision_pil_workers{workers}"] = timed_training(model, pil_batches(data, batch_size, workers), steps)
    baseline_key = max((k for k in results if k != "engine"), key=lambda k: results[k]["images_per_s"])
    emit({"bench": "loader_throughput", "model": backbone, "dataset": "fashion_mnist", "batch_size": batch_size,
          "threads": torch.get_num_threads(), "device": "cpu",
          "engine_images_per_s": round(results["engine"]["images_per_s"], 1),
          "baseline": baseline_key, "baseline_images_per_s": round(results[baseline_key]["images_per_s"], 1),
          "ratio": round(results["engine"]["images_per_s"] / results[baseline_key]["images_per_s"], 3),
          "engine_share_outside_fwd_bwd": round(results["engine"]["share_outside_fwd_bwd"], 4),
          "baseline_share_outside_fwd_bwd": round(results[baseline_key]["share_outside_fwd_bwd"], 4),
          "all": {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in results.items()}})


def _train_worker(threads: int, steps: int) -> None:
    """A child process of bench_job_threads: prints its training throughput as one JSON line."""
    torch.set_num_threads(threads)
    model, _ = config_model("config.yaml")
    result = timed_training(model, engine_batches(fashion_mnist(), 128), steps)
    print(json.dumps({"images_per_s": result["images_per_s"]}), flush=True)


def bench_job_threads(steps: int) -> None:
    def workers(threads: int, count: int) -> list[float]:
        procs = [subprocess.Popen([sys.executable, __file__, "--train-worker", str(threads), str(steps)],
                                  stdout=subprocess.PIPE, text=True) for _ in range(count)]
        outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError("a bench_job_threads worker failed")
        return [json.loads(o.strip().splitlines()[-1])["images_per_s"] for o in outs]

    one_two_thread = workers(2, 1)[0]
    two_one_thread = workers(1, 2)
    emit({"bench": "job_threads", "model": "convnet (config.yaml)", "batch_size": 128, "device": "cpu",
          "one_job_two_threads_images_per_s": round(one_two_thread, 1),
          "two_jobs_one_thread_images_per_s": [round(v, 1) for v in two_one_thread],
          "ratio": round(sum(two_one_thread) / one_two_thread, 3)})


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([str(BIN / "snakemake"), *args], cwd=workdir, env=env, capture_output=True, text=True)


def _jobs_planned(workdir: Path, *args: str) -> int:
    proc = _snakemake(workdir, "-n", *args)
    return sum(1 for line in (proc.stdout + proc.stderr).splitlines() if line.startswith(("rule ", "localrule ")))


def bench_noop() -> None:
    workdir, args, dag = ROOT, [], "default (config/config.yaml)"
    if _jobs_planned(ROOT) != 0:
        # the default run has not completed here: measure the same thing on the smoke DAG
        from tests.conftest import copy_repo

        workdir = copy_repo(Path(tempfile.mkdtemp(prefix="classlab-bench-")) / "repo")
        args, dag = ["--configfile", "config/smoke.yaml"], "smoke (config/smoke.yaml; default run not complete here)"
        proc = _snakemake(workdir, "-c2", *args)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
    timings = []
    for _ in range(3):
        t0 = time.perf_counter()
        proc = _snakemake(workdir, "-c2", *args)
        timings.append(time.perf_counter() - t0)
        if proc.returncode != 0 or "Nothing to be done" not in proc.stdout + proc.stderr:
            raise RuntimeError("rerun was not a no-op:\n" + (proc.stdout + proc.stderr)[-2000:])
    # Snakemake's own start-up (its imports, with every installed executor plugin's) is a floor no
    # workflow can go under: time `snakemake --version` in the same run, so that the line shows
    # what the workflow itself adds (parsing the rules and config, checking the DAG).
    startup = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([str(BIN / "snakemake"), "--version"], capture_output=True, check=True)
        startup.append(time.perf_counter() - t0)
    emit({"bench": "noop_rerun", "dag": dag, "wall_s": round(min(timings), 3),
          "all_s": [round(t, 3) for t in timings], "target_s": 2.0,
          "snakemake_startup_s": round(min(startup), 3),
          "workflow_s": round(min(timings) - min(startup), 3)})
    if workdir != ROOT:
        shutil.rmtree(workdir.parent, ignore_errors=True)


def bench_incremental() -> None:
    """One class-incremental run (finetune, Fashion-MNIST B0Inc2, 1 epoch per task, the default
    ConvNet): wall time per task and training images/s, from the run's own history."""
    from classlab.data.scenarios import build_scenario
    from classlab.protocols.incremental import run_incremental

    data = fashion_mnist()
    prepared = ROOT / "data" / "prepared" / "fashion_mnist"
    if not (prepared / "manifest.json").exists():
        prepared = OUT / "fashion_mnist"
    work = Path(tempfile.mkdtemp(prefix="classlab-bench-inc-"))
    scenario = build_scenario("class_incremental", "fashion_mnist", data.train.y.numpy(), 10, seed=0,
                              initial=0, increment=2)
    scenario.save(work / "scenario.json")
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    t0 = time.perf_counter()
    out = run_incremental("finetune", prepared, work / "scenario.json", "convnet", 0, work / "ck", work / "ev",
                          overrides={"epochs": 1}, backbone_kwargs=config["backbone_kwargs"].get("convnet", {}),
                          threads=2, progress=False)
    wall = time.perf_counter() - t0
    tasks = out["history"]
    emit({"bench": "incremental_run", "method": "finetune", "scenario": "fashion_mnist B0Inc2", "epochs_per_task": 1,
          "wall_s": round(wall, 2), "tasks": len(tasks),
          "wall_s_per_task": [round(t["seconds"], 2) for t in tasks],
          "images_per_s_per_task": [round(t["images_per_s"], 1) for t in tasks],
          "images_per_s": round(sum(t["train_samples"] for t in tasks) / sum(t["seconds"] for t in tasks), 1)})
    shutil.rmtree(work, ignore_errors=True)


def bench_discovery() -> None:
    """One generalized category discovery run (SimGCD, Fashion-MNIST, 5 known / 5 novel classes on 400
    training images per class, 2 epochs from scratch, the default ConvNet): wall time and training
    images/s (two views each), from the run's own history."""
    from classlab.data.discovery_split import build_discovery_split, write_discovery_split
    from classlab.protocols.discovery import run_discovery

    data = fashion_mnist()
    prepared = ROOT / "data" / "prepared" / "fashion_mnist"
    if not (prepared / "manifest.json").exists():
        prepared = OUT / "fashion_mnist"
    work = Path(tempfile.mkdtemp(prefix="classlab-bench-disc-"))
    split = build_discovery_split("gcd", "fashion_mnist", data.train.y.numpy(), 10, 0,
                                  test_labels=data.test.y.numpy(), samples_per_class=400, test_samples_per_class=200)
    write_discovery_split(split, work / "split.json")
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    t0 = time.perf_counter()
    out = run_discovery("simgcd", prepared, work / "split.json", "convnet", 0, work / "ck", work / "ev",
                        overrides={"epochs": 2}, backbone_kwargs=config["backbone_kwargs"].get("convnet", {}),
                        threads=2, progress=False)
    wall = time.perf_counter() - t0
    task = out["history"][0]
    emit({"bench": "discovery_run", "method": "simgcd", "split": "fashion_mnist gcd 5+5, 400/class", "epochs": 2,
          "wall_s": round(wall, 2), "train_samples": task["train_samples"], "train_s": round(task["seconds"], 2),
          "images_per_s": round(task["images_per_s"], 1)})
    shutil.rmtree(work, ignore_errors=True)


RECIPES = [("supervised", m) for m in ("erm", "adamw", "lion", "grad_noise", "z_loss", "ps_kd", "tract", "sam",
                                      "useful", "noprop", "noprop_blocks_ce", "supcon", "sbcl", "core_tuning")] + \
          [("distill", m) for m in ("ce", "kd", "nd_kd", "multi_aspect_kd")]


def bench_recipe_steps(steps: int = 14, rounds: int = 2) -> None:
    """Training step time of each recipe and distillation method relative to erm, in one process on
    the default ConvNet, batch 64 of Fashion-MNIST, through the engine's loop (forward, backward,
    the method's optimizer step and after-step hook). Each method's time is the median interval
    between steps (the first two skipped), the best of ``rounds`` passes over the methods."""
    from classlab.config import resolve_hparams
    from classlab.engine import Trainer, TrainConfig
    from classlab.methods.registry import get_method
    from classlab.models import build_classifier

    torch.set_num_threads(2)
    data = fashion_mnist()
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    kwargs = config["backbone_kwargs"]["convnet"]
    subset = torch.arange(64 * steps)
    mean, std = data.manifest["channel_mean"], data.manifest["channel_std"]
    best: dict[str, float] = {}
    for _ in range(rounds):
        for family, name in RECIPES:
            hp = resolve_hparams(family, name, {"epochs": 1, "batch_size": 64})
            hp.pop("backbone", None)  # every method on the same ConvNet: the cost of the method, not of its model
            torch.manual_seed(0)
            method = get_method(family, name)(build_classifier("convnet", 1, 10, img_size=28, backbone_kwargs=kwargs),
                                               hp, 10)
            method.class_names = list(data.manifest["class_names"])
            if hp.get("uses_teacher"):
                method.set_teacher(build_classifier("convnet", 1, 10, img_size=28, backbone_kwargs={
                    "widths": [48, 48, 96, 96, 192], "pool_after": [1, 3]}), {})
            trainer = Trainer(method, TrainConfig.from_hparams(hp), torch.device("cpu"), 0, None, progress=False)
            loader = trainer.make_loader(data.train.x, data.train.y, mean, std, subset)
            stamps: list[float] = []
            trainer.fit(loader, on_step=lambda *_: stamps.append(time.perf_counter()))
            step = float(np.median(np.diff(stamps[2:])))
            key = f"{family}/{name}"
            best[key] = min(best.get(key, float("inf")), step)
    for key, step in best.items():
        emit({"bench": "recipe_step_time", "method": key, "batch_size": 64, "threads": 2,
              "step_ms": round(1000 * step, 2), "ratio_to_erm": round(step / best["supervised/erm"], 3)})


def bench_saliency(batch: int = 32, rounds: int = 2) -> None:
    """Maps per second of every explain method at one layer (input-space methods at the input), on the
    same randomly initialised scene ConvNet and the same batch (a map's cost does not depend on how
    well the model is trained). The ratio is against Grad-CAM, measured in the same process."""
    from classlab.config import list_methods, resolve_hparams
    from classlab.engine.device import set_threads
    from classlab.methods.registry import get_method
    from classlab.methods.saliency_method import SaliencyMethod
    from classlab.models import build_classifier

    set_threads(2)
    torch.manual_seed(0)
    model = build_classifier("convnet", 1, 5, img_size=84,
                             backbone_kwargs={"widths": [16, 32, 32, 64, 64], "pool_after": [0, 2]}).eval()
    x = torch.randn(batch, 1, 84, 84)
    classes = torch.arange(batch) % 5
    baseline = torch.zeros(1, 84, 84)
    timings = {}
    for name in list_methods("explain"):
        cls = get_method("explain", name)
        if not (isinstance(cls, type) and issubclass(cls, SaliencyMethod)):
            continue  # promptcam explains its own trained ViT readout, not this model
        method = cls(resolve_hparams("explain", name, None))
        layer = "block4" if method.layered else None
        extra = {"baseline": baseline} if getattr(method, "needs_baseline", False) else {}
        method.explain(model, x[:4], classes[:4], layer, **extra)  # warm-up
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            method.explain(model, x, classes, layer, **extra)
            best = min(best, time.perf_counter() - start)
        timings[name] = (layer or "input", batch / best)
    for name, (layer, rate) in timings.items():
        emit({"bench": "saliency_maps", "method": name, "layer": layer, "model": "scene convnet 84x84 (explain_cpu.yaml)",
              "batch_size": batch, "threads": 2, "maps_per_s": round(rate, 1),
              "ratio_to_gradcam": round(rate / timings["gradcam"][1], 3)})


def bench_tta_stream(images: int = 2000, batch: int = 64, rounds: int = 2) -> None:
    """Online test-time adaptation throughput: one corrupted stream (gaussian noise, severity 3) of
    ``images`` Fashion-MNIST test images in batches of ``batch`` through each method's
    ``forward_and_adapt`` on the default ConvNet, in one process; images/s (best of ``rounds``) and
    the ratio to the unadapted source model measured in the same run. The corruption itself is timed
    apart (it is built once per stream, before adaptation)."""
    from classlab.config import resolve_hparams
    from classlab.data.corruptions import corrupt
    from classlab.engine.device import set_threads
    from classlab.methods.registry import get_method
    from classlab.methods.source_stats import source_statistics

    set_threads(2)
    data = fashion_mnist()
    model, _ = config_model("config.yaml")
    mean, std = data.manifest["channel_mean"], data.manifest["channel_std"]
    t0 = time.perf_counter()
    x = corrupt(data.test.x[:images], "gaussian_noise", 3, 0)
    corrupt_s = time.perf_counter() - t0
    stats = source_statistics(model, data.train.x[:2000], data.train.y[:2000], 10, mean, std)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    sd = torch.tensor(std).view(1, -1, 1, 1)
    batches = [(x[i:i + batch].float() / 255 - m) / sd for i in range(0, images, batch)]
    rates = {}
    for name in ("source", "bn_adapt", "tent", "cafa"):
        method = get_method("shift", name)(copy.deepcopy(model), resolve_hparams("shift", name, {}), 10,
                                             source_stats=stats)
        best = 0.0
        for _ in range(rounds):
            method.reset()
            t0 = time.perf_counter()
            for xb in batches:
                method.forward_and_adapt(xb)
            best = max(best, images / (time.perf_counter() - t0))
        rates[name] = best
    for name, rate in rates.items():
        emit({"bench": "tta_stream", "method": name, "model": "convnet (config.yaml)", "images": images,
              "batch_size": batch, "images_per_s": round(rate, 1),
              "relative_to_source": round(rate / rates["source"], 3),
              "corruption_images_per_s": round(images / corrupt_s, 1)})


def bench_condensation(networks: int = 4) -> None:
    """The condense family's bi-level loop: ``networks`` networks (one image update each, DC's schedule
    at 1 image per class) of dc, dsa, dcc and nrr_dd with config/condense_cpu.yaml's overrides on
    Fashion-MNIST and convnet_dc at width 128, two threads, in one process; the loop's outer iterations
    per second (the manifest's ``outer_iterations_per_s``: initialisation, NRR-DD's teacher included,
    is timed apart) and the ratio to DC's measured in the same run."""
    from classlab.engine.device import seed_everything, set_threads
    from classlab.methods.condense_learner import RealData
    from classlab.methods.registry import get_method
    from classlab.models import build_classifier
    from classlab.protocols.condense import BACKBONE, FAMILY, _resolve, condense_images

    set_threads(2)
    data = fashion_mnist()
    grid = yaml.safe_load((ROOT / "config" / "condense_cpu.yaml").read_text())["families"]["condense"]
    real = RealData(data.train.x, data.train.y, data.manifest["channel_mean"], data.manifest["channel_std"],
                    data.num_classes)
    rates = {}
    for name in ("dc", "dsa", "dcc", "nrr_dd"):
        # a short teacher: its quality does not change the cost of an image update
        extra = {"teacher_steps": 50} if name == "nrr_dd" else {}
        hp = _resolve(name, {**grid["overrides"].get(name, {}), **extra, "iterations": networks})
        seed_everything(0)
        model = build_classifier(BACKBONE, 1, data.num_classes, img_size=28, backbone_kwargs=grid.get("backbone_kwargs"))
        learner = get_method(FAMILY, name)(model, hp, data.num_classes)
        learner.seed = 0
        with tempfile.TemporaryDirectory() as tmp:
            _, _, manifest = condense_images(learner, name, hp, real, 1, 0, torch.device("cpu"), Path(tmp), {},
                                             False, data, None)
        rates[name] = (manifest["outer_iterations_per_s"], manifest["prepare_seconds"])
    for name, (rate, prepare_s) in rates.items():
        emit({"bench": "condensation", "method": name, "model": "convnet_dc width 128 (condense_cpu.yaml)",
              "images_per_class": 1, "batch_real": int(_resolve(name, grid["overrides"].get(name, {}))["batch_real"]),
              "networks": networks, "threads": 2, "outer_iterations_per_s": round(rate, 3),
              "seconds_per_network": round(1.0 / rate, 2), "prepare_seconds": round(prepare_s, 1),
              "relative_to_dc": round(rate / rates["dc"][0], 3)})


def bench_prompt_learning(steps: int = 20, batch: int = 32) -> None:
    """The vlm family's training step: zeroshot's forward and CoOp, CoCoOp and KgCoOp's steps (batch
    ``batch``, 5 base classes) on an offline CLIP built around the default ConvNet (untrained: the
    cost does not depend on the weights), two threads, in one process. Counts every call of the frozen
    text tower and the prompt sequences it encodes; images/s is the best of two rounds of ``steps``."""
    from classlab.config import resolve_hparams
    from classlab.engine.device import set_threads
    from classlab.methods.registry import get_method
    from classlab.models import image_text
    from classlab.models.image_text import ImageTextModel

    set_threads(2)
    data = fashion_mnist()
    model, _ = config_model("config.yaml")
    pretrained = torch.nn.Module()
    pretrained.clip = ImageTextModel(model.backbone, model.num_features, embed_dim=128)
    names = list(data.manifest["class_names"])
    mean = torch.tensor(data.manifest["channel_mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data.manifest["channel_std"]).view(1, -1, 1, 1)
    base = [c for c in range(5)]
    pick = torch.nonzero(data.train.y < 5).flatten()[: batch * steps]
    batches = [{"x": (data.train.x[pick[i:i + batch]].float() / 255 - mean) / std, "y": data.train.y[pick[i:i + batch]],
                "index": pick[i:i + batch]} for i in range(0, len(pick), batch)]
    tower = image_text.text_tower()
    calls = {"calls": 0, "sequences": 0}
    original = tower.encode_embeds

    def counted(embeds, mask):
        calls["calls"] += 1
        calls["sequences"] += int(embeds.shape[0])
        return original(embeds, mask)

    tower.encode_embeds = counted
    rows = {}
    try:
        for name in ("zeroshot", "coop", "cocoop", "kgcoop"):
            method = get_method("vlm", name)(pretrained, resolve_hparams("vlm", name, {"batch_size": batch}), 10)
            method.train_classes = base
            method.build(names)
            params = [p for g in method.param_groups() for p in g["params"]]
            opt = torch.optim.SGD(params, lr=0.002) if params else None
            best = 0.0
            for _ in range(2):
                calls.update(calls=0, sequences=0)
                t0 = time.perf_counter()
                for b in batches:
                    if opt is None:
                        with torch.no_grad():
                            method(b["x"])
                        continue
                    loss, _ = method.training_step(b)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                best = max(best, len(batches) * batch / (time.perf_counter() - t0))
            rows[name] = (best, calls["calls"] / len(batches), calls["sequences"] / len(batches))
    finally:
        tower.encode_embeds = original
    for name, (rate, per_step, sequences) in rows.items():
        emit({"bench": "prompt_learning", "method": name, "model": "offline CLIP on convnet (config.yaml) + MiniLM-L6",
              "batch_size": batch, "base_classes": len(base), "threads": 2, "images_per_s": round(rate, 1),
              "text_tower_calls_per_step": round(per_step, 2), "prompt_sequences_per_step": round(sequences, 1),
              "relative_to_coop": round(rate / rows["coop"][0], 3),
              "step": "forward only (nothing trained)" if name == "zeroshot" else "forward + backward + SGD"})


def _metric_batches(data, batch: int, steps: int):
    mean = torch.tensor(data.manifest["channel_mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data.manifest["channel_std"]).view(1, -1, 1, 1)
    pick = torch.nonzero(data.train.y < 5).flatten()[: batch * steps]
    return [{"x": (data.train.x[pick[i:i + batch]].float() / 255 - mean) / std, "y": data.train.y[pick[i:i + batch]],
             "index": pick[i:i + batch]} for i in range(0, len(pick), batch)]


def _best_training_rate(learner, batches: list, images_per_batch: int, rounds: int = 2) -> float:
    """Images/s of ``learner``'s training step (forward, backward, optimizer step) over ``batches``, the
    best of ``rounds`` passes (the first pass also pays for warm-up allocations)."""
    opt = learner.configure_optimizer()
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for step, b in enumerate(batches):
            learner.global_step = step
            loss, _ = learner.training_step(b)
            learner.optimizer_step(loss, opt, lambda: learner.training_step(b)[0])
        best = max(best, len(batches) * images_per_batch / (time.perf_counter() - t0))
    return best


def bench_metric_learning(steps: int = 12) -> None:
    """The metric family's training step on the default ConvNet with a 64-d embedding head, batch 128 of
    the five training classes, two threads, in one process; images/s is the best of two rounds."""
    from classlab.config import resolve_checked_hparams
    from classlab.engine.device import set_threads
    from classlab.methods.metric_learner import METHODS, method_class
    from classlab.models import build_classifier

    set_threads(2)
    data = fashion_mnist()
    batches = _metric_batches(data, 128, steps)
    rates = {}
    for name in METHODS:
        torch.manual_seed(0)
        hp = resolve_checked_hparams("metric", name, {})
        model = build_classifier("convnet", 1, int(hp["embedding_size"]), img_size=28)
        learner = method_class(name)(model, hp, 5)
        rates[name] = _best_training_rate(learner, batches, 128)
    for name, rate in rates.items():
        emit({"bench": "metric_learning", "method": name, "model": "convnet + 64-d embedding (metric_cpu.yaml)",
              "batch_size": 128, "threads": 2, "images_per_s": round(rate, 1),
              "relative_to_multi_similarity": round(rate / rates["multi_similarity"], 3)})


def bench_single_paper() -> None:
    """One short run of each single-paper protocol and its baseline on Fashion-MNIST, one thread each, in
    this process: the protocols' own ``train_seconds`` (training only) turned into rates."""
    from classlab.protocols.single_paper import run_single_paper

    fashion_mnist()  # prepared here when the pipeline has not
    data_dir = ROOT / "data" / "prepared" / "fashion_mnist"
    if not (data_dir / "manifest.json").exists():
        data_dir = OUT / "fashion_mnist"
    small_bags = {"train_bags": 40, "val_bags": 20, "test_bags": 20, "epochs": 2}
    rounds = {"queries_per_round": 50, "query_budget": 150, "train_steps": 100}
    runs = {"mil": small_bags, "mil_attention": small_bags, "aspl": rounds, "active_only": rounds,
            "icl_gd": {"train_tasks": 20480, "epochs": 5, "val_tasks": 1000, "test_tasks": 1000}}
    out = {}
    for name, overrides in runs.items():
        with tempfile.TemporaryDirectory() as tmp:
            m = run_single_paper(name, data_dir, 0, Path(tmp), overrides=overrides, threads=1)
        out[name] = m
    ins_rate = out["mil"]["train_instances"] * small_bags["epochs"] / out["mil"]["train_seconds"]
    abmil_rate = out["mil_attention"]["train_instances"] * small_bags["epochs"] / out["mil_attention"]["train_seconds"]
    emit({"bench": "single_paper", "protocol": "mil", "methods": "mil (INS) vs mil_attention (ABMIL)", "threads": 1,
          "mil_instances_per_s": round(ins_rate, 1), "mil_attention_instances_per_s": round(abmil_rate, 1),
          "ratio": round(ins_rate / abmil_rate, 3)})
    per_round = {k: out[k]["train_seconds"] / len(out[k]["curve_labels"]) for k in ("aspl", "active_only")}
    emit({"bench": "single_paper", "protocol": "aspl", "methods": "aspl vs active_only", "threads": 1,
          "aspl_seconds_per_round": round(per_round["aspl"], 2),
          "active_only_seconds_per_round": round(per_round["active_only"], 2),
          "ratio": round(per_round["aspl"] / per_round["active_only"], 3)})
    icl = out["icl_gd"]
    emit({"bench": "single_paper", "protocol": "icl_gd", "methods": "icl_gd (one LSA layer)", "threads": 1,
          "adam_steps_per_s": round(icl["train_steps"] / icl["train_seconds"], 1), "batch_size": icl["hparams"]["batch_size"]})


def bench_ssl_steps(steps: int = 6, batch: int = 128) -> None:
    """The ssl family's pretraining step (both views, forward and backward, optimizer step) of every
    method of config/ssl_cpu.yaml's groups on that group's backbone, two threads, in one process;
    images/s (source images, not views) is the best of two rounds, relative to the group's baseline
    measured in the same run."""
    import yaml

    from classlab.config import resolve_checked_hparams
    from classlab.data.loader import AugmentSpec, TensorLoader
    from classlab.engine.device import set_threads
    from classlab.methods.registry import get_method
    from classlab.models import build_classifier

    set_threads(2)
    groups = yaml.safe_load((ROOT / "config" / "ssl_cpu.yaml").read_text())["families"]["ssl"]["groups"]
    flat = fashion_mnist()
    # scenes for the dense group: random 84x84 RGB canvases are enough for a step's cost
    scenes = (torch.randint(0, 256, (batch * 2, 3, 84, 84), dtype=torch.uint8), torch.zeros(batch * 2, dtype=torch.long))
    for name, group in groups.items():
        dense = group.get("probe") == "segmentation"
        x, y = scenes if dense else (flat.train.x[: batch * steps], flat.train.y[: batch * steps])
        rates = {}
        for method in group["methods"]:
            torch.manual_seed(0)
            hp = resolve_checked_hparams("pretrain", method, {"batch_size": batch})
            if int(hp.get("epochs", 1)) == 0:  # random_init: the untrained reference has no step to time
                continue
            model = build_classifier(group["backbone"], int(x.shape[1]), 10, img_size=int(x.shape[-1]),
                                     backbone_kwargs=group.get("backbone_kwargs") or {})
            learner = get_method("pretrain", method)(model, hp, 10)
            loader = TensorLoader(x, y, batch, device=torch.device("cpu"), augment=AugmentSpec(2, True),
                                  views=learner.num_views, drop_last=True)
            batches = [b for _, b in zip(range(steps), loader)]
            learner.total_steps = 2 * steps  # what the engine sets from the run's length (schedules)
            rates[method] = _best_training_rate(learner, batches, batch)
        base = group["methods"][0]
        for method, rate in rates.items():
            emit({"bench": "ssl_pretrain_step", "group": name, "method": method, "backbone": group["backbone"],
                  "batch_size": batch, "threads": 2, "images_per_s": round(rate, 1),
                  f"relative_to_{base}": round(rate / rates[base], 3)})


def bench_dense_steps(steps: int = 4, batch: int = 32) -> None:
    """The dense family's training step of every method of config/dense_cpu.yaml on its backbone, on
    random 84x84 scenes with the real targets' shapes, two threads, in one process; images/s is the best
    of two rounds, relative to each task's baseline (class_head, pixel_head) measured in the same run."""
    import yaml

    from classlab.config import resolve_checked_hparams
    from classlab.data.loader import TensorLoader
    from classlab.engine.device import set_threads
    from classlab.methods.dense_learner import DenseTargets
    from classlab.methods.registry import get_method
    from classlab.models import build_classifier

    set_threads(2)
    spec = yaml.safe_load((ROOT / "config" / "dense_cpu.yaml").read_text())["families"]["dense"]
    n, side, classes, k_max = batch * steps, 84, 40, 5
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=gen)
    # one object per 28x28 cell of a 3x3 grid, k_max slots, the rest padding
    cells = torch.randint(0, 9, (n, k_max), generator=gen)
    x0, y0 = (cells % 3) * 28 + 4, (cells // 3) * 28 + 4
    boxes = torch.stack([x0, y0, x0 + 20, y0 + 20], dim=-1).float()
    labels = torch.randint(0, classes, (n, k_max), generator=gen)
    labels[:, 3:] = -1
    semantic = torch.randint(0, classes + 1, (n, side, side), generator=gen)
    targets = DenseTargets(boxes, labels, semantic)
    loader = TensorLoader(x, torch.zeros(n, dtype=torch.long), batch, device=torch.device("cpu"), drop_last=True)
    batches = list(loader)
    rates, tasks = {}, {}
    for method in spec["methods"]:
        torch.manual_seed(0)
        hp = resolve_checked_hparams("dense", method, {"batch_size": batch})
        model = build_classifier(spec.get("backbone", "convnet"), 3, classes, img_size=side,
                                 backbone_kwargs=spec.get("backbone_kwargs") or {})
        cls = get_method("dense", method)
        learner = cls(model, hp, classes, image_shape=(3, side, side))
        learner.set_targets(targets)
        learner.total_steps = 2 * steps
        rates[method], tasks[method] = _best_training_rate(learner, batches, batch), cls.task
    base = {"detection": "class_head", "segmentation": "pixel_head"}
    for method, rate in rates.items():
        ref = base[tasks[method]]
        emit({"bench": "dense_train_step", "task": tasks[method], "method": method,
              "backbone": spec.get("backbone", "convnet"), "batch_size": batch, "threads": 2,
              "images_per_s": round(rate, 1), f"relative_to_{ref}": round(rate / rates[ref], 3) if ref in rates else None})


def bench_generative(batch: int = 32, steps: int = 6, classify_images: int = 4) -> None:
    """The generative family's three costs at config/methods/generative/'s defaults (the CPU grid's), on
    random 3x28x28 images of a 4 x 10 pair grid, two threads, in one process: the DDPM's training step
    (images/s, best of two rounds), the diffusion classifier (test images/s: every pair condition at
    every sampled timestep), and one personalisation step with and without the semantic preservation
    loss (relative to plain personalisation, measured in the same run)."""
    import copy

    from classlab.config import resolve_checked_hparams
    from classlab.engine.device import set_threads
    from classlab.methods.generative.ddpm import build_denoiser, denoiser_spec
    from classlab.methods.registry import get_method

    set_threads(2)
    attributes, objects = ["red", "green", "blue", "yellow"], [f"garment{k}" for k in range(10)]
    pairs = len(attributes) * len(objects)
    hp = resolve_checked_hparams("generative", "ddpm", {})
    torch.manual_seed(0)
    base = build_denoiser(denoiser_spec(hp, attributes, objects, [3, 28, 28]))
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch * steps, 3, 28, 28, generator=gen) * 2 - 1
    y = torch.randint(0, pairs, (batch * steps,), generator=gen)
    batches = [{"x": x[i:i + batch], "y": y[i:i + batch], "index": torch.arange(i, i + batch)}
               for i in range(0, len(x), batch)]
    ddpm = get_method("generative", "ddpm")(copy.deepcopy(base), hp, pairs)
    ddpm.total_steps = 2 * steps
    train_rate = _best_training_rate(ddpm, batches, batch)
    emit({"bench": "generative", "part": "ddpm_train_step", "model": f"UNet2DModel {hp['block_out_channels']}",
          "batch_size": batch, "threads": 2, "images_per_s": round(train_rate, 1)})

    cls_hp = resolve_checked_hparams("generative", "diffusion_classifier", {})
    classifier = get_method("generative", "diffusion_classifier")(copy.deepcopy(base).eval(), cls_hp, pairs)
    best = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        classifier.errors(x[:classify_images], range(classify_images), 0)
        best = max(best, classify_images / (time.perf_counter() - t0))
    forwards = pairs * int(cls_hp["timestep_samples"]) * int(cls_hp["noise_per_timestep"])
    emit({"bench": "generative", "part": "diffusion_classifier", "candidates": pairs,
          "timestep_samples": cls_hp["timestep_samples"], "denoiser_forwards_per_image": forwards, "threads": 2,
          "images_per_s": round(best, 3),
          "relative_to_ddpm_train_images_per_s": round(best / train_rate, 5)})

    rates = {}
    for method in ("personalize", "classdiffusion"):
        p_hp = resolve_checked_hparams("generative", method, {})
        k = int(p_hp["batch_size"])
        learner = get_method("generative", method)(copy.deepcopy(base), p_hp, pairs)
        learner.set_instance(0)
        learner.total_steps = 2 * steps
        rates[method] = _best_training_rate(learner, [{**b, "x": b["x"][:k], "y": b["y"][:k], "index": b["index"][:k]}
                                                      for b in batches], k)
    for method, rate in rates.items():
        emit({"bench": "generative", "part": "personalisation_step", "method": method, "batch_size": k, "threads": 2,
              "images_per_s": round(rate, 1), "relative_to_personalize": round(rate / rates["personalize"], 3)})


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench.jsonl").unlink(missing_ok=True)
    steps = int(os.environ.get("BENCH_STEPS", "60"))
    # The input pipeline is measured on the smoke ConvNet, where it is a visible part of the
    # step, and on the default ConvNet, where CPU compute dominates (see README).
    bench_loader(steps, "smoke.yaml")
    bench_loader(steps, "config.yaml")
    bench_job_threads(steps)
    bench_noop()
    bench_incremental()
    bench_discovery()
    bench_saliency()
    bench_recipe_steps()
    bench_tta_stream()
    bench_condensation()
    bench_prompt_learning()
    bench_metric_learning()
    bench_single_paper()
    bench_ssl_steps()
    bench_dense_steps()
    bench_generative()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--train-worker"]:
        _train_worker(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
