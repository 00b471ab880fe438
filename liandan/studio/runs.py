"""Training runs started from the studio: a real `liandan lora` process that outlives the page.

Everything the page shows about a run is read back from disk, from the run's adapter directory, so a
reloaded page (or a restarted studio) finds the run again:
  studio.json    the process id and the options it was started with (to stop it and to resume it)
  studio.log     the process's console output
  metrics.jsonl  written by training itself: losses, iterations, tokens/s
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from liandan.atomic import atomic_write_text
from liandan.config import lora_flags
from liandan.errors import LiandanError

RUN_FILE = "studio.json"
LOG_FILE = "studio.log"
LOG_TAIL_BYTES = 20_000
# The `liandan lora` options the Train tab offers (TrainConfig names); the rest keep their defaults.
PAGE_OPTIONS = ("iters", "batch_size", "learning_rate", "fine_tune_type", "num_layers", "steps_per_report",
                "steps_per_eval", "val_batches", "save_every", "max_seq_length", "seed", "optimizer", "batch_order",
                "grad_accumulation_steps", "replay_ratio", "kl_weight", "system_prompt", "mask_prompt",
                "grad_checkpoint", "overwrite")

# Our own children, so a finished one is reaped (and not taken for alive as a zombie).
_children: dict[int, subprocess.Popen] = {}


def start(adapter_dir: Path, options: dict, resume: bool = False) -> int:
    """Start `liandan lora --train` in its own session, so closing the page (or the studio) does not stop it."""
    from liandan.adapters import holds_adapter

    adapter_dir = Path(adapter_dir)
    if is_running(adapter_dir):
        raise LiandanError(f"{adapter_dir}: a run is already going there; stop it first")
    if not resume and not options.get("overwrite") and holds_adapter(adapter_dir):  # before its log and options change
        raise LiandanError(f"{adapter_dir} already holds an adapter from another run; resume it, tick 'Replace the "
                           "adapter already in this run's folder', or choose another run name")
    options = dict(options, train=True, adapter_path=str(adapter_dir))
    flags = lora_flags({k: v for k, v in options.items() if not (resume and k == "overwrite")})
    command = [sys.executable, "-m", "liandan", "lora", *flags, *(["--resume"] if resume else [])]
    adapter_dir.mkdir(parents=True, exist_ok=True)
    with open(adapter_dir / LOG_FILE, "a" if resume else "w", encoding="utf-8") as log:
        log.write(f"$ liandan lora {' '.join(command[4:])}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    _children[process.pid] = process
    atomic_write_text(adapter_dir / RUN_FILE, json.dumps(
        {"pid": process.pid, "options": options, "started": time.time()}, ensure_ascii=False, indent=2))
    return process.pid


def resume(adapter_dir: Path) -> int:
    """Continue a stopped run from its latest checkpoint, with the options it was started with."""
    from liandan.train import latest_checkpoint

    record = read_run(adapter_dir)
    if not record:
        raise LiandanError(f"{adapter_dir}: no run started from the studio here")
    if latest_checkpoint(Path(adapter_dir)) is None:
        raise LiandanError(f"{adapter_dir}: no checkpoint to resume from; start the run again")
    return start(adapter_dir, record["options"], resume=True)


def stop(adapter_dir: Path) -> bool:
    """Ask the run to stop: training saves a checkpoint at the end of the current step, then exits."""
    record = read_run(adapter_dir)
    if not record or not _alive(record["pid"]):
        return False
    os.kill(record["pid"], signal.SIGTERM)
    return True


def read_run(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / RUN_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def is_running(adapter_dir: Path) -> bool:
    record = read_run(adapter_dir)
    return bool(record) and _alive(record["pid"])


def _alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        if os.waitpid(pid, os.WNOHANG)[0]:  # our child (from before a reload of this module) that has ended
            return False
    except ChildProcessError:
        pass  # not our child: started by an earlier studio
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: not a run this studio started, and Stop could not signal it
        return False
    # After a reboot the pid may belong to another program; only a liandan process counts.
    command = _command_line(pid)
    return command is None or b"liandan" in command


def _command_line(pid: int, proc: Path = Path("/proc")) -> bytes | None:
    """The process's command line from /proc (Linux) or `ps` (macOS, which has no /proc); None if neither works."""
    if proc.is_dir():
        cmdline = proc / str(pid) / "cmdline"
        return cmdline.read_bytes() if cmdline.exists() else b""
    try:
        return subprocess.run(["ps", "-p", str(pid), "-o", "command="], capture_output=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None


@dataclass
class RunStatus:
    state: str  # "none", "running", "finished", "stopped" (a checkpoint to resume from) or "failed"
    iteration: int = 0
    iters: int = 0
    it_per_sec: float | None = None
    tokens_per_sec: float | None = None
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    log: str = ""

    @property
    def eta_seconds(self) -> float | None:
        if self.state != "running" or not self.it_per_sec:
            return None
        return max(self.iters - self.iteration, 0) / self.it_per_sec


def status(adapter_dir: Path) -> RunStatus:
    from liandan.train import METRICS, latest_checkpoint

    adapter_dir = Path(adapter_dir)
    record = read_run(adapter_dir)
    if not record:
        return RunStatus("none")
    from liandan.config import TrainConfig

    result = RunStatus("running" if _alive(record["pid"]) else "failed",
                       iters=int(record["options"].get("iters") or TrainConfig.iters), log=_tail(adapter_dir / LOG_FILE))
    for entry in _read_metrics(adapter_dir / METRICS):
        if "train_loss" in entry:
            result.train_loss.append((entry["iteration"], entry["train_loss"]))
            result.iteration = entry["iteration"]
            result.it_per_sec, result.tokens_per_sec = entry.get("it_per_sec"), entry.get("tokens_per_sec")
        if "val_loss" in entry:
            result.val_loss.append((entry["iteration"], entry["val_loss"]))
    if result.state != "running":
        if saved_iteration(adapter_dir, since=record.get("started", 0)) >= result.iters:
            result.state = "finished"
        elif latest_checkpoint(adapter_dir) is not None:
            result.state = "stopped"
    return result


def _read_metrics(path: Path) -> list[dict]:
    entries = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return entries
    for line in lines:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written right now
    return entries


def saved_iteration(adapter_dir: Path, since: float) -> int:
    """The iteration of the adapter this run saved in adapter_dir (its record's), 0 when it saved none since it
    started (an older adapter there is another run's): a run whose adapter reached --iters finished."""
    from liandan.adapters import RECORD, read_record

    try:
        if (adapter_dir / RECORD).stat().st_mtime < since:
            return 0
        return int(read_record(adapter_dir, required=False).get("iteration") or 0)
    except (OSError, LiandanError):  # none yet
        return 0


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def list_runs(runs_dir: Path) -> list[Path]:
    """Run directories started from the studio, the most recently started first."""
    found = [p.parent for p in Path(runs_dir).glob(f"*/{RUN_FILE}")]
    return sorted(found, key=lambda p: read_run(p).get("started", 0), reverse=True)
