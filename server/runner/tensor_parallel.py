"""Tensor parallelism across processes: one engine core (rank 0) drives size - 1 workers.

Rank 0 is the process that runs `build_core` (the engine-core process, or the caller's for
the offline `LLM`): it owns the scheduler and all KV bookkeeping. Each worker holds its
shard of the model (`models/layers/parallel.py`) and a ModelRunner with KV caches of its
KV heads, block for block the same as rank 0's, and executes the same SchedulerOutput as
rank 0 each step. Every rank computes the same all-gathered logits and samples with the
same seeds, so the workers' request states (their token ids) stay equal to rank 0's;
only rank 0's RunnerOutput is used.

Control (rank 0 → worker) is pickle over the worker's stdin — a subprocess, not
multiprocessing: the engine-core process is daemonic and may not have multiprocessing
children:
  ("init", WorkerInit) once; ("runner", ModelRunner keyword arguments) builds (or replaces:
  the memory-profiling runner comes first) the worker's runner; ("step", SchedulerOutput)
  per step. A worker exits at EOF: rank 0 closed its stdin, or died.
Tensors move only in the layers' collectives, over a gloo (CPU) or NCCL (CUDA, one device
per rank: cuda:index+rank) group on its own TCPStore at 127.0.0.1 (no default process
group, so several engines may live in one process).

A step that raises on rank 0 raises on every worker too (same inputs, same code) before the
same collective; workers log it and wait for the next step, as rank 0's EngineCore fails
the step. A failure on one rank only (a device fault) leaves the others blocked in a
collective until its timeout, which then fails rank 0's step.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vlmserve.config import EngineConfig
from vlmserve.engine.outputs import RunnerOutput, SchedulerOutput
from vlmserve.models.layers.parallel import TPGroup
from vlmserve.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT = timedelta(minutes=5)  # every rank joins the store within this
COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # one collective waits this long for its peers


@dataclass
class Communicator:
    """The group's backend (`pg`) and its store. `close` drops both: a gloo group still
    alive at interpreter teardown aborts the process."""

    pg: Any
    store: Any

    def close(self) -> None:
        self.pg = None
        self.store = None


def rank_device(device: torch.device, rank: int) -> torch.device:
    if device.type == "cuda":
        return torch.device("cuda", (device.index or 0) + rank)
    return device


def connect(rank: int, size: int, port: int, device: torch.device) -> Communicator:
    store = dist.TCPStore("127.0.0.1", port, size, rank == 0, timeout=STARTUP_TIMEOUT)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = COLLECTIVE_TIMEOUT
        pg = dist.ProcessGroupNCCL(store, rank, size, options)
    else:
        pg = dist.ProcessGroupGloo(store, rank, size, COLLECTIVE_TIMEOUT)
    return Communicator(pg, store)


@dataclass
class WorkerInit:
    config: EngineConfig
    model_dir: Path
    rank: int
    size: int
    port: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TPWorkers:
    """Rank 0's handle on the workers: starts them, joins the group with them (`tp`),
    sends them control messages, stops them (`close`, also at exit)."""

    def __init__(self, config: EngineConfig, model_dir: Path, device: torch.device) -> None:
        size = config.tensor_parallel_size
        if device.type == "cuda" and (device.index or 0) + size > torch.cuda.device_count():
            raise ValueError(
                f"--tensor-parallel-size {size} needs {size} GPUs from {device}, "
                f"{torch.cuda.device_count()} are visible"
            )
        port = _free_port()
        self.procs: list[subprocess.Popen] = []
        atexit.register(self.close)
        for rank in range(1, size):
            proc = subprocess.Popen([sys.executable, "-m", "vlmserve.runner.tensor_parallel"], stdin=subprocess.PIPE)
            self.procs.append(proc)
            init = WorkerInit(config, model_dir, rank, size, port, rank_device(device, rank))
            self._write(proc, pickle.dumps(("init", init)))
        backend = "nccl" if device.type == "cuda" else "gloo"
        logger.info("tensor parallel: %d ranks over %s, vision towers replicated on every rank", size, backend)
        try:
            self.comm = connect(0, size, port, device)
        except Exception as e:
            codes = [p.poll() for p in self.procs]
            self.close()
            raise RuntimeError(f"tensor-parallel workers did not join (exit codes {codes}): {e}") from e
        self.tp = TPGroup(0, size, self.comm)

    def _write(self, proc: subprocess.Popen, data: bytes) -> None:
        assert proc.stdin is not None
        proc.stdin.write(data)
        proc.stdin.flush()

    def send(self, message: tuple[str, Any]) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for rank, proc in enumerate(self.procs, start=1):
            if proc.poll() is not None:
                raise RuntimeError(f"tensor-parallel worker rank {rank} exited with code {proc.returncode}")
            self._write(proc, data)

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None and not proc.stdin.closed:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []
        if getattr(self, "comm", None) is not None:
            self.comm.close()


class TPRunner:
    """Rank 0's runner: sends each step to the workers, then runs its own shard. Everything
    else (the encoder cache, request states, counters) is rank 0's ModelRunner's."""

    def __init__(self, runner: ModelRunner, workers: TPWorkers) -> None:
        self.runner = runner
        self.workers = workers

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        self.workers.send(("step", out))
        return self.runner.execute(out)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["runner"], name)


def make_runner(model: Any, workers: TPWorkers | None, device: torch.device, **kwargs: Any) -> ModelRunner | TPRunner:
    """A ModelRunner over `model` on rank 0 and, with workers, the same one on each of them."""
    if workers is None:
        return ModelRunner(model, device=device, **kwargs)
    workers.send(("runner", kwargs))
    return TPRunner(ModelRunner(model, device=device, **kwargs), workers)


def _worker_main() -> None:
    from vlmserve import kernels
    from vlmserve.models.loader import load_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s tp-worker %(name)s: %(message)s")
    stdin = sys.stdin.buffer
    _, init = pickle.load(stdin)
    config = init.config
    kernels.set_backend(config.kernel_backend)
    torch.manual_seed(config.seed)
    comm = connect(init.rank, init.size, init.port, init.device)
    tp = TPGroup(init.rank, init.size, comm)
    model, _ = load_model(init.model_dir, dtype=config.dtype, device=init.device, progress=False, tp=tp)
    runner = None
    while True:
        try:
            kind, payload = pickle.load(stdin)
        except EOFError:
            break
        if kind == "runner":
            runner = None  # free the previous runner's caches first
            runner = ModelRunner(model, device=init.device, **payload)
        elif kind == "step":
            try:
                runner.execute(payload)
            except Exception:
                logger.exception("rank %d: a step failed (rank 0 fails it too)", init.rank)
    comm.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown with the backend's threads around


if __name__ == "__main__":
    _worker_main()
