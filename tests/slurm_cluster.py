"""A real single-node SLURM cluster on localhost, started and stopped by the test itself.

Debian's slurmctld, slurmd, slurm-client and munge (``make setup`` installs them as root).
State, spool and logs live in a scratch directory. The configuration is written to the
default path /etc/slurm/slurm.conf (steps launched inside a batch job, such as Snakemake's
``srun`` job step, look there); a file already there is kept aside and put back on stop.
The daemons are processes of the test run and are stopped by their pid files.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged", "sinfo", "sbatch", "squeue")


def missing_requirements() -> str | None:
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (SlurmUser=root)"
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if absent:
        return f"not installed: {absent} (apt-get install slurmctld slurmd slurm-client munge)"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _munge_works() -> bool:
    try:
        token = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if token.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=token.stdout, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = Path("/etc/slurm/slurm.conf")
        self.backup = self.root / "slurm.conf.orig"
        self.pids: list[Path] = []
        self.started_munge = False

    def env(self) -> dict:
        return {"SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> None:
        self._start_munge()
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 1
        mem_mib = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 - 1024
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.parent.mkdir(parents=True, exist_ok=True)
        if self.conf.exists():
            shutil.copy2(self.conf, self.backup)
        self.conf.write_text("\n".join([
            "ClusterName=classlab-test",
            f"SlurmctldHost={host}",
            "AuthType=auth/munge",
            "SlurmUser=root",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MinJobAge=600",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
            f"NodeName={host} CPUs={cpus} RealMemory={mem_mib} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        env = {**os.environ, **self.env()}
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([_which(daemon), "-f", str(self.conf)], env=env, check=True, timeout=30)
            self.pids.append(self.root / f"{daemon}.pid")
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        logs = "\n".join(p.read_text()[-2000:] for p in (self.root / "log").glob("*.log"))
        raise RuntimeError(f"SLURM node did not become idle within {timeout} s:\n{logs}")

    def _start_munge(self) -> None:
        if _munge_works():
            return
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["mungekey", "-c", "-k", str(key)], check=True)
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        run_dir = Path("/run/munge")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", _which("munged")], check=True, timeout=30)
        self.started_munge = True
        self.pids.append(run_dir / "munged.pid")
        for _ in range(50):
            if _munge_works():
                return
            time.sleep(0.1)
        raise RuntimeError("munged started but munge -n | unmunge fails")

    def stop(self) -> None:
        for pid_file in reversed(self.pids):
            try:
                pid = int(pid_file.read_text().strip())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue
        time.sleep(1)
        # leave /etc/slurm as found: a config naming a controller that is no longer running makes
        # every `scontrol` (the SLURM executor plugin calls it when Snakemake starts) wait 10 s
        if self.backup.exists():
            shutil.copy2(self.backup, self.conf)
        else:
            self.conf.unlink(missing_ok=True)
