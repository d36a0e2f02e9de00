"""
A run's folder: its records (predictions.jsonl: one JSON line per finished run, appended and fsynced,
a torn last line redone), its lock (one run at a time) and its run.json (what the records depend on:
resuming with anything else is refused). Written atomically; nothing computed is lost. Under
torchrun the ranks share one folder: each appends its own samples' records, rank 0 alone takes
the lock and writes run.json and the report (the barriers between).
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch

import polykv as K
import policies as P


def plan_fingerprint(plan: K.Plan | None) -> str | None:
    """Identifies what a method kept: a changed plan is a different run (None for FullKV)."""
    return None if plan is None else hashlib.sha256(json.dumps([plan.policies, plan.budgets]).encode()).hexdigest()[:12]


def run_key(sample_id: str, method: str, budget, fingerprint: str | None) -> str:
    return f"{sample_id}\t{method}\t{budget}\t{fingerprint}"


def read_records(out: Path) -> dict[str, dict]:
    """Every finished run in predictions*.jsonl; a line that is not a whole record (a run killed
    mid-write leaves a torn one) is skipped, and that run is redone."""
    records = {}
    for path in sorted(Path(out).glob("predictions*.jsonl")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                r = json.loads(line)
                records[run_key(r["id"], r["method"], r["budget"], r.get("plan"))] = r
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return records


def open_writer(path: Path):
    """(file, write): write(record) appends one line and fsyncs it, so a crash loses at most that line."""
    torn = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    f = open(path, "a", encoding="utf-8")
    if torn:  # a run killed mid-write left half a line: end it, so new records start clean
        f.write("\n")

    def write(record: dict) -> None:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return f, write


def take_lock(out: Path) -> Path:
    """Hold out/.lock for this process, so a second run into the same folder (which would replace
    the first one's records or plans under it) is refused, naming the folder and the other process. A lock
    left by a process that no longer runs is taken over. Released with release_lock (or at exit)."""
    path = Path(out) / ".lock"
    holder = path.read_text().strip() if path.is_file() else ""
    if holder.isdigit() and int(holder) != os.getpid() and alive(int(holder)):
        raise ValueError(f"{out} is in use by another run (pid {holder}, lock file {path}); wait for it to finish "
                         "or use another --out")
    tmp = path.with_name(f".lock.tmp{os.getpid()}")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, path)  # two takeovers at once: the last one wins, the other sees it below
    if path.read_text().strip() != str(os.getpid()):
        raise ValueError(f"{out} was just taken by another run (pid {path.read_text().strip()}); use another --out")
    atexit.register(release_lock, path)
    return path


def release_lock(path: Path) -> None:
    if path.is_file() and path.read_text().strip() == str(os.getpid()):
        path.unlink()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def check_run_config(out: Path, config: dict) -> None:
    """Refuse to resume into a folder holding results made with other settings. A run.json written
    before a field existed gets the field (query-aware, then the only mode; the model's content hash)."""
    path = out / "run.json"
    if path.is_file():
        old = json.loads(path.read_text())
        old.setdefault("query", "aware")
        old.setdefault("model_id", config["model_id"])
        old["settings"] = asdict(P.recorded_settings(old["settings"]) if "settings" in old else P.Settings())
        diff = [k for k in config if old.get(k) != config[k]]
        if diff:
            raise ValueError(f"{out} holds a run with different {', '.join(diff)}; use another --out")
    atomic_write(path, json.dumps(config, indent=1))


def check_writable(folder: Path, flag: str) -> None:
    """Fail now, not after an hour of work: the folder (made if missing) takes a file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{flag} {folder}: not writable ({e.strerror})") from None


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- torchrun


def dist_on() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_world() -> tuple[int, int]:
    return (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist_on() else (0, 1)


def barrier() -> None:
    if dist_on():
        torch.distributed.barrier()


def init_distributed(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1): gloo on CPU, NCCL on CUDA (one GPU per local rank)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    cuda = device.startswith("cuda")
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=12))
    if device == "cuda":  # one GPU per process
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(device)
    return device
