"""The engine: checkpoints are plain tensors, a SIGKILLed run resumes to the same result."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from classlab.engine import CheckpointError, load_checkpoint, save_checkpoint
from classlab.engine.schedule import lr_factor
from tests.conftest import env_with_venv


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="not a plain-tensor checkpoint"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "ok.pt"
    save_checkpoint({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="ok.pt"):
        load_checkpoint(path)


def test_plain_checkpoint_round_trip(tmp_path):
    save_checkpoint({"w": torch.arange(3), "meta": {"name": "x", "n": 2}}, tmp_path / "c.pt")
    out = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(out["w"], torch.arange(3)) and out["meta"] == {"name": "x", "n": 2}
    assert not list(tmp_path.glob(".*tmp"))


def test_onecycle_schedule_shape():
    total = 100
    f = [lr_factor(s, total, "onecycle", 0.2) for s in range(total)]
    assert f[0] == pytest.approx(0.04) and max(f) == pytest.approx(1.0, abs=0.02)
    assert f[-1] == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(5, 10, "constant") == 1.0


def _train_cmd(data, out, epochs):
    overrides = json.dumps({"epochs": epochs, "batch_size": 32, "augment_pad": 1})
    return [sys.executable, "-m", "classlab.cli", "train", "--family", "pretrain", "--method", "supervised",
            "--data", str(data), "--backbone", "convnet", "--backbone-kwargs",
            json.dumps({"widths": [16, 32], "pool_after": [0]}), "--seed", "7", "--out-dir", str(out),
            "--overrides", overrides, "--threads", "1", "--no-progress"]


def test_sigkill_mid_run_resumes_to_identical_result(digits_prepared, tmp_path):
    epochs = 12
    reference = tmp_path / "reference"
    subprocess.run(_train_cmd(digits_prepared, reference, epochs), check=True, env=env_with_venv(),
                   capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(digits_prepared, killed, epochs), env=env_with_venv(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "last.pt").exists():  # the first epoch's checkpoint
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(0.15)  # into a later epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.pt").exists(), "the run finished before the kill: test is void"
    done = load_checkpoint(killed / "last.pt")["epoch"]
    assert 1 <= done < epochs

    resumed = subprocess.run(_train_cmd(digits_prepared, killed, epochs), env=env_with_venv(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"after epoch {done}" in resumed.stderr
    a = load_checkpoint(reference / "model.pt")["model"]
    b = load_checkpoint(killed / "model.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ha = json.loads((reference / "history.json").read_text())["epochs"]
    hb = json.loads((killed / "history.json").read_text())["epochs"]
    assert [e["loss"] for e in ha] == [e["loss"] for e in hb]
    assert not (killed / "last.pt").exists()


def test_saved_tensors_are_byte_reproducible(tmp_path):
    # DVC hashes files: the same tensors must give the same bytes whatever the file is called
    obj = {"x": torch.arange(100, dtype=torch.uint8), "meta": {"k": 1}}
    save_checkpoint(obj, tmp_path / "a.pt")
    save_checkpoint(obj, tmp_path / "b" / "other_name.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b" / "other_name.pt").read_bytes()


def _cmd_with(data, out, epochs, **extra):
    cmd = _train_cmd(data, out, epochs)
    overrides = json.loads(cmd[cmd.index("--overrides") + 1])
    overrides.update(extra)
    cmd[cmd.index("--overrides") + 1] = json.dumps(overrides)
    return cmd


def test_killed_run_under_an_edited_hyperparameter_does_not_resume(digits_prepared, tmp_path):
    """Kill a job, edit a hyperparameter, rerun: the stale checkpoint is discarded, the rerun
    equals a fresh run of the edited config, and the log names the differing key."""
    epochs = 6
    killed = tmp_path / "killed"
    env = {**env_with_venv(), "CLASSLAB_KILL_AT": "epoch:3"}  # dies after epoch 3, with last.pt of epoch 2
    proc = subprocess.run(_cmd_with(digits_prepared, killed, epochs), env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(killed / "last.pt")["epoch"] == 2

    rerun = subprocess.run(_cmd_with(digits_prepared, killed, epochs, lr=0.05), env=env_with_venv(),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "discarding stale checkpoint" in rerun.stderr and "hparams" in rerun.stderr
    assert "resuming" not in rerun.stderr
    fresh = tmp_path / "fresh"
    subprocess.run(_cmd_with(digits_prepared, fresh, epochs, lr=0.05), env=env_with_venv(), check=True,
                   capture_output=True, timeout=300)
    a, b = load_checkpoint(fresh / "model.pt")["model"], load_checkpoint(killed / "model.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mid_epoch_checkpoint_resumes_bit_identical(digits_prepared, tmp_path):
    """A job killed mid-epoch resumes from its step checkpoint (batch offset, RNG state) and ends
    bit-identical to an uninterrupted run."""
    epochs = 3
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_cmd_with(digits_prepared, ref, epochs), env=env_with_venv(), check=True, capture_output=True,
                   timeout=300)
    env = {**env_with_venv(), "CLASSLAB_CHECKPOINT_EVERY_STEPS": "5", "CLASSLAB_KILL_AT": "step:58"}
    proc = subprocess.run(_cmd_with(digits_prepared, killed, epochs), env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    state = load_checkpoint(killed / "last.pt")
    assert state["batch"] > 0, "the kill should land mid-epoch, after a step checkpoint"
    env.pop("CLASSLAB_KILL_AT")
    resumed = subprocess.run(_cmd_with(digits_prepared, killed, epochs), env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"batch {state['batch']}" in resumed.stderr
    a, b = load_checkpoint(ref / "model.pt")["model"], load_checkpoint(killed / "model.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((ref / "history.json").read_text())["epochs"]
    hb = json.loads((killed / "history.json").read_text())["epochs"]
    assert [e["loss"] for e in ha] == [e["loss"] for e in hb]


def test_fingerprint_names_the_differing_keys():
    from classlab.engine.fingerprint import differing_keys, make_fingerprint

    a = make_fingerprint(hparams={"lr": 0.1}, seed=1, data="x")
    b = make_fingerprint(hparams={"lr": 0.2}, seed=1, data="x")
    assert differing_keys(a, b) == ["hparams"]
    assert differing_keys(a, a) == []
    assert differing_keys(None, a) == sorted(a)  # a checkpoint written before fingerprints: never resumed
