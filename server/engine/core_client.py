"""CoreClient: how `AsyncEngine` reaches the EngineCore step loop, which runs in one of two places.

- `ThreadCoreClient`: on a thread of this process, over an EngineCore built here (thread mode,
  fast tests).
- `ProcessCoreClient`: in a child process (multiprocessing *spawn*: never fork a process that
  has torch threads) that builds model, KV cache, runner and scheduler itself from the
  EngineConfig. The API process then keeps HTTP, JSON, media, rendering and detokenization,
  and the step loop never waits for its GIL.

Both run `run_step_loop`. Inputs (`add_request`, `abort_requests`) are queued by the caller
and all pending ones are applied before each step. Outputs: `on_step(StepResult)` is called
on a thread of the client (never the event loop) once per step, plus once after inputs that
left the core idle (so an abort's freed blocks show in the stats); nothing while idle.
`on_dead(message)` is called once if the loop dies.

Wire protocol of the process client: `pickle` (not multiprocessing's ForkingPickler, which
would move every pixel tensor into a shared-memory segment) over two one-way pipes.
  down: ("init", eos_token_ids) once; then ("inputs", [("add", Request) | ("abort", [ids])]),
        one message per batch the writer thread drains; ("shutdown", None) last.
  up:   ("ready", CoreInfo) | ("failed", message) once; then ("step", StepResult) per step;
        ("dead", message) if the loop fails.
The child exits when the down pipe reads EOF: the parent closed it or died, even by SIGKILL.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from vlmserve.config import EngineConfig
from vlmserve.engine.builder import FrontendParts, build_core, build_frontend, resolve_device
from vlmserve.models.loader import resolve_model_dir
from vlmserve.engine.engine_core import EngineCore
from vlmserve.engine.outputs import EngineCoreOutput

logger = logging.getLogger(__name__)


class EngineStartupError(RuntimeError):
    """The engine-core process could not build the engine; the message is its error."""


@dataclass
class StepResult:
    outputs: list[EngineCoreOutput]
    rejected: list[tuple[str, str]]  # (request id, why): adds the scheduler refused
    stats: dict[str, float]  # SchedulerStats after the step, plus "steps" and "encoded_items"


@dataclass
class CoreInfo:
    max_model_len: int
    num_kv_blocks: int
    stats: dict[str, float]  # before the first step


class CoreClient(Protocol):
    def start(self, on_step: Callable[[StepResult], None], on_dead: Callable[[str], None]) -> CoreInfo:
        """Blocks until the core serves (call it off the event loop); raises EngineStartupError."""

    def add_request(self, request: Any) -> None: ...

    def abort_requests(self, req_ids: list[str]) -> None: ...

    def is_alive(self) -> bool: ...

    def shutdown(self, timeout: float = 10.0) -> None: ...


# ---- the loop both clients run -------------------------------------------------------------
def core_stats(core: EngineCore, num_steps: int) -> dict[str, float]:
    stats = dict(vars(core.scheduler.get_stats()))  # scalars only: no deep copy as in asdict
    stats["steps"] = num_steps
    stats["encoded_items"] = core.runner.encoder.num_encoded_items
    return stats


def run_step_loop(
    core: EngineCore,
    next_inputs: Callable[[bool], list[tuple[str, Any]] | None],
    publish: Callable[[StepResult], None],
) -> None:
    """`next_inputs(block)` returns every pending input (waiting a while for one if `block`:
    the core is idle, or its last step could do nothing), or None to stop. Exceptions of a
    step propagate: the engine is dead.

    A step that did nothing (scheduled no token, preempted nothing, produced no output)
    leaves the scheduler as it was: only an input (an abort, a new request) or the timeout
    can change that, so the loop blocks on the inputs instead of spinning, and publishes
    nothing for such a step."""
    num_steps = 0
    stalled = False
    while True:
        inputs = next_inputs(stalled or not core.has_unfinished_requests())
        if inputs is None:
            return
        rejected = []
        for kind, payload in inputs:
            if kind == "add":
                try:
                    core.add_request(payload)
                except ValueError as e:  # the request cannot fit; the engine is fine
                    rejected.append((payload.request_id, str(e)))
            else:
                core.abort_requests(payload)
        outputs: list[EngineCoreOutput] = []
        stalled = False
        if core.has_unfinished_requests():
            outputs = core.step()
            num_steps += 1
            stalled = not outputs and not core.last_step_progressed
        if not inputs and (stalled or not core.has_unfinished_requests() and not outputs):
            continue  # idle or stalled, and nothing changed: send nothing
        publish(StepResult(outputs, rejected, core_stats(core, num_steps)))


# ---- thread mode ---------------------------------------------------------------------------
class ThreadCoreClient:
    def __init__(self, core: EngineCore, max_model_len: int, num_kv_blocks: int) -> None:
        self.core = core
        self._info = CoreInfo(max_model_len, num_kv_blocks, core_stats(core, 0))
        self._inputs: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._dead = False

    def start(self, on_step: Callable[[StepResult], None], on_dead: Callable[[str], None]) -> CoreInfo:
        def run() -> None:
            try:
                run_step_loop(self.core, self._next_inputs, on_step)
            except Exception as e:
                logger.exception("engine step failed")
                self._dead = True
                on_dead(f"the engine stopped after an internal error: {e!r}")

        self._thread = threading.Thread(target=run, name="engine-core", daemon=True)
        self._thread.start()
        return self._info

    def _next_inputs(self, block: bool) -> list[tuple[str, Any]] | None:
        items = []
        try:
            items.append(self._inputs.get(timeout=0.5) if block else self._inputs.get_nowait())
            while True:
                items.append(self._inputs.get_nowait())
        except queue.Empty:
            pass
        return None if self._stopping.is_set() else [i for i in items if i is not None]

    def add_request(self, request: Any) -> None:
        self._inputs.put(("add", request))

    def abort_requests(self, req_ids: list[str]) -> None:
        self._inputs.put(("abort", req_ids))

    def is_alive(self) -> bool:
        return not self._dead and self._thread is not None and self._thread.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._inputs.put(None)  # wakes a blocked get
        if self._thread is not None:
            self._thread.join(timeout)


# ---- process mode --------------------------------------------------------------------------
def _send(conn: Any, message: tuple[str, Any]) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn: Any) -> tuple[str, Any]:
    return pickle.loads(conn.recv_bytes())


def _describe_exit(proc: mp.process.BaseProcess) -> str:
    proc.join(2)  # it closed its pipe; give it a moment to be reaped
    code = proc.exitcode
    if code is None:
        return "it closed its pipe but is still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class ProcessCoreClient:
    """Spawns the engine-core process at construction, so it loads weights while this process
    builds the processor; `send_init` then hands it the EOS ids, `start` waits for it."""

    def __init__(self, config: EngineConfig, model_dir: Path) -> None:
        ctx = mp.get_context("spawn")
        down_r, self._down = ctx.Pipe(duplex=False)
        self._up, up_w = ctx.Pipe(duplex=False)
        # daemon: if this process exits without `shutdown` (an exception), multiprocessing's
        # exit hook terminates the child instead of waiting for it.
        self._proc = ctx.Process(target=core_process_main, args=(config, model_dir, down_r, up_w),
                                 name="vlmserve-engine-core", daemon=True)
        self._proc.start()
        # Keep only our ends: the child's exit then reads as EOF here, and ours as EOF there.
        down_r.close()
        up_w.close()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._dead = False
        self._on_dead: Callable[[str], None] | None = None
        self._dead_lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def send_init(self, eos_token_ids: list[int]) -> None:
        try:
            _send(self._down, ("init", list(eos_token_ids)))  # small: never blocks on a fresh pipe
        except OSError:
            pass  # the child already exited: `start` reports how

    def start(self, on_step: Callable[[StepResult], None], on_dead: Callable[[str], None]) -> CoreInfo:
        try:
            while not self._up.poll(0.2):  # EOF also polls ready
                if not self._proc.is_alive():
                    break
            kind, payload = _recv(self._up)
        except (EOFError, OSError):
            raise EngineStartupError(
                f"the engine process exited while loading the model ({_describe_exit(self._proc)}); "
                "its log is above") from None
        if kind != "ready":
            self._proc.join(5)
            raise EngineStartupError(f"the engine process failed to load the model: {payload}")

        self._on_dead = on_dead

        def read() -> None:
            try:
                while True:
                    kind, payload = _recv(self._up)
                    if kind == "step":
                        on_step(payload)
                    else:  # "dead": the child logged the traceback
                        self._die(payload)
                        return
            except (EOFError, OSError):
                if not self._stopping:
                    self._die(f"the engine process died ({_describe_exit(self._proc)}); restart the server")
            except BaseException as e:  # unpickling, memory, a failing callback: nothing more arrives
                logger.exception("the engine pipe reader failed")
                self._die(f"the engine pipe reader failed: {e!r}")

        self._threads = [threading.Thread(target=read, name="engine-core-reader", daemon=True),
                         threading.Thread(target=self._write, name="engine-core-writer", daemon=True)]
        for t in self._threads:
            t.start()
        return payload

    def _write(self) -> None:
        """Sends queued inputs in batches. A thread, because a large prompt (pixels) fills the pipe
        and blocks until the child reads between steps: the event loop must never wait for that."""
        while True:
            batch = [self._outbox.get()]
            try:
                while True:
                    batch.append(self._outbox.get_nowait())
            except queue.Empty:
                pass
            stop = None in batch
            try:
                inputs = [item for item in batch if item is not None]
                if inputs:
                    _send(self._down, ("inputs", inputs))
                if stop:
                    _send(self._down, ("shutdown", None))
            except OSError:  # the child is gone; the reader reports it
                return
            except BaseException as e:  # pickling, memory: these inputs never reach the child
                logger.exception("the engine pipe writer failed")
                self._die(f"the engine pipe writer failed: {e!r}")
                return
            if stop:
                return

    def _die(self, message: str) -> None:
        """Once, from whichever pipe thread fails first: the engine is dead to this process
        (`is_alive` False, `on_dead` fails every request in flight). Closing the down pipe
        tells the child to exit, so it also stops reading into a half-lost state."""
        with self._dead_lock:
            if self._dead:
                return
            self._dead = True
        if not self._stopping:
            try:
                self._down.close()
            except OSError:
                pass
        if self._on_dead is not None:
            self._on_dead(message)

    def add_request(self, request: Any) -> None:
        self._outbox.put(("add", request))

    def abort_requests(self, req_ids: list[str]) -> None:
        self._outbox.put(("abort", req_ids))

    def is_alive(self) -> bool:
        return not self._dead and self._proc.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Asks the child to stop, then terminates (and at last kills) it: never leaves an orphan."""
        self._stopping = True
        if self._threads:
            self._outbox.put(None)
        else:  # never started: no writer thread; closing the pipe tells the child to exit
            self._down.close()
        self._proc.join(timeout)
        if self._proc.is_alive():
            logger.warning("the engine process did not stop in %.0f s; terminating it", timeout)
            self._proc.terminate()
            self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        for t in self._threads:
            t.join(2)
        self._up.close()
        if not self._down.closed:
            self._down.close()


def core_process_main(config: EngineConfig, model_dir: Path, down: Any, up: Any) -> None:
    """The engine-core process: build the core, say ready, run the step loop until told to stop
    or until the parent is gone."""
    # Ctrl-C signals the whole process group; the parent stops us in order (or by EOF).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s [engine-core]: %(message)s")
    import torch

    if resolve_device(config.device).type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # The model runs on these CPUs too: leave one core to the API process (HTTP, media,
        # detokenization). Intra-op threads that contend with it cost more than they gain
        # (measured on 2 cores: 1 thread here instead of 2 is ~25% more requests/s).
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))

    def eos_token_ids() -> list[int]:
        kind, payload = _recv(down)
        if kind != "init":
            raise RuntimeError(f"expected the init message from the API process, got {kind!r}")
        return payload

    try:
        parts = build_core(config, model_dir, eos_token_ids)
    except EOFError:  # the parent went away while we loaded
        sys.exit(0)
    except Exception as e:
        logger.exception("building the engine failed")
        user_facing = isinstance(e, (ValueError, FileNotFoundError))
        _send(up, ("failed", str(e) if user_facing else f"{type(e).__name__}: {e}"))
        sys.exit(1)
    core = parts.core
    _send(up, ("ready", CoreInfo(parts.max_model_len, parts.num_kv_blocks, core_stats(core, 0))))

    parent = os.getppid()

    def next_inputs(block: bool) -> list[tuple[str, Any]] | None:
        inputs: list[tuple[str, Any]] = []
        timeout = 1.0 if block else 0.0
        while down.poll(timeout):
            kind, payload = _recv(down)  # EOFError: the parent closed the pipe or died
            if kind == "shutdown":
                return None
            inputs.extend(payload)
            timeout = 0.0
        # A reparented child means the parent died; EOF above normally tells us first.
        return inputs if os.getppid() == parent else None

    try:
        run_step_loop(core, next_inputs, lambda result: _send(up, ("step", result)))
    except (EOFError, BrokenPipeError):
        logger.info("the API process is gone; stopping")
    except Exception as e:
        logger.exception("engine step failed")
        try:
            _send(up, ("dead", f"the engine stopped after an internal error: {e!r}"))
        except OSError:
            pass
        sys.exit(1)


def build_core_client(config: EngineConfig) -> tuple[CoreClient, FrontendParts]:
    """The server's engine, per `config.engine_mode`, not yet started. Process mode spawns the
    engine-core process first: it imports torch and loads the weights while this process
    builds the processor (then sends it the EOS ids, the one thing the core needs from it)."""
    if config.engine_mode == "thread":
        frontend = build_frontend(config)
        parts = build_core(config, frontend.model_dir, lambda: frontend.processor.eos_token_ids)
        return ThreadCoreClient(parts.core, parts.max_model_len, parts.num_kv_blocks), frontend
    model_dir = resolve_model_dir(config.model)  # a hub download happens once, here
    client = ProcessCoreClient(config, model_dir)
    try:
        frontend = build_frontend(config, model_dir)
    except BaseException:
        client.shutdown()
        raise
    client.send_init(frontend.processor.eos_token_ids)
    return client, frontend
