"""The context (prefetch) instance of the LLM-API flavour in its own process, on the helper GPU.

TensorRT-LLM's worker picks its GPU itself: `device_id = global_rank % torch.cuda.device_count()`
(tensorrt_llm/executor/base_worker.py, `_get_comm_ranks_device_id`), an index into the devices its
process sees. A worker in the engine's process (`TLLM_WORKER_USE_SINGLE_PROCESS=1`, read once per
process: `enable_worker_single_process_for_tp1` in tensorrt_llm/llmapi/utils.py is cached) is rank
0, so every `LLM` of that process lands on its visible device 0 whatever `torch.cuda.set_device`
said. And the MPI workers TensorRT-LLM spawns otherwise get only the parent's `TRTLLM*`/`TLLM*`
variables (tensorrt_llm/llmapi/mpi_session.py, `_start_mpi_pool`), so `CUDA_VISIBLE_DEVICES`
cannot be relied on to reach them.

So the context instance runs in a child process this module starts with `CUDA_VISIBLE_DEVICES` =
the helper GPU alone and a single-process worker: rank 0, visible device 0, the helper GPU. The
engine talks to it as to an in-process `LLM` (`generate_async`, the output's `abort`,
`shutdown`). Calls and outputs cross a pipe between the two processes, pickled as TensorRT-LLM
itself sends requests to its worker processes; only this module's two ends write to it, and
nothing a client sends is unpickled. The child exits when the engine shuts it down or its pipe
closes (the engine's process died).
"""
from __future__ import annotations

import asyncio
import importlib
import importlib.util
import itertools
import multiprocessing
import multiprocessing.connection
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

from engines.base import EngineError
from engines.tensorrt_llm.executor_llm import Completion, RoutedOutput
from engines.tensorrt_llm.llm_settings import TrtllmSettings

PRELOAD_ENV = "ALIGNED_TRTLLM_CHILD_PRELOAD"
"""`file.py:function` or `module:function` the child calls before importing TensorRT-LLM (the tests
install the fake TensorRT-LLM there); unset in production."""
START_TIMEOUT_S = 900.0
"""Loading a model into the helper GPU can take minutes."""


def physical_gpu(device: str) -> str:
    """The `CUDA_VISIBLE_DEVICES` entry of "cuda:N" as this process sees it (N indexes the parent's
    own CUDA_VISIBLE_DEVICES when that is set)."""
    kind, _, index = device.partition(":")
    if kind != "cuda" or not index.isdigit():
        raise EngineError(f"the TensorRT-LLM engine runs on CUDA devices named cuda:N, got {device!r}")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return index
    entries = [v.strip() for v in visible.split(",") if v.strip()]
    if int(index) >= len(entries):
        raise EngineError(f"{device} is not one of the {len(entries)} devices of CUDA_VISIBLE_DEVICES={visible}")
    return entries[int(index)]


class RemoteOutput(RoutedOutput):
    """The child's `RequestOutput` as the engine reads it; each message carries the whole output."""

    def __init__(self, llm: "ContextProcessLLM", request_id: int, loop: asyncio.AbstractEventLoop):
        super().__init__(request_id, loop)
        self._llm = llm

    def abort(self) -> None:
        if not self.finished:
            self._llm._send(("abort", self.request_id))

    def _take(self, message: tuple) -> None:
        kind, *rest = message
        if kind == "error":
            self.finished = True
            raise RuntimeError(f"TensorRT-LLM context instance, request {self.request_id}: {rest[0]}")
        token_ids, finished, disagg = rest
        self.outputs = [Completion(list(token_ids), disagg)]
        self.finished = bool(finished)


class ContextProcessLLM:
    """An `LLM` (transceiver on, no connector) in a child process pinned to one GPU."""

    def __init__(self, engine_dir: str | Path, settings: TrtllmSettings, device: str, *,
                 start_timeout_s: float = START_TIMEOUT_S):
        self.device = device
        self.cuda_visible_devices = physical_gpu(device)
        self.model = str(engine_dir)
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state inherited
        ctx.set_executable(_python())
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, name=f"trtllm-context-{device}", daemon=True,
                                 args=(child, self.model, settings.to_dict(), self.cuda_visible_devices,
                                       os.environ.get(PRELOAD_ENV)))
        self._proc.start()
        child.close()
        if not self._conn.poll(start_timeout_s):
            self._kill()
            raise EngineError(f"the TensorRT-LLM context instance on {device} did not start in {start_timeout_s:.0f} s")
        try:
            kind, *rest = self._conn.recv()
        except EOFError:
            kind, rest = "failed", [f"its process exited with code {self._proc.exitcode}"]
        if kind != "ready":
            self._kill()
            raise EngineError(f"the TensorRT-LLM context instance on {device} failed to start: {rest[0]}")
        self._ids = itertools.count(1)
        self._outputs: dict[int, RemoteOutput] = {}
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name=f"trtllm-context-{device}", daemon=True)
        self._reader.start()

    def generate_async(self, inputs, sampling_params=None, streaming: bool = True, kv_cache_retention_config=None,
                       disaggregated_params=None) -> RemoteOutput:
        """Submit one request to the child; call from a running event loop (its outputs arrive there)."""
        if not streaming:
            raise ValueError("ContextProcessLLM streams only (the engine reads tokens as they come)")
        request_id = next(self._ids)
        out = RemoteOutput(self, request_id, asyncio.get_running_loop())
        with self._lock:
            self._outputs[request_id] = out
        self._send(("submit", request_id, list(inputs), sampling_params, kv_cache_retention_config,
                    disaggregated_params))
        return out

    def shutdown(self) -> None:
        try:
            self._send(("shutdown",))
        except EngineError:
            pass
        self._proc.join(timeout=30)
        self._kill()
        self._reader.join(timeout=5)

    # ------------------------------------------------------------------ internals
    def _send(self, message: tuple) -> None:
        try:
            with self._lock:
                self._conn.send(message)
        except (OSError, ValueError) as e:
            raise EngineError(f"the TensorRT-LLM context instance on {self.device} is gone: {e}") from e

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                message = None
            if message is None:  # the child exited: every open request ends with an error
                with self._lock:
                    outs, self._outputs = list(self._outputs.values()), {}
                for out in outs:
                    out.deliver(("error", f"the context process on {self.device} exited"))
                return
            kind, request_id, *rest = message
            with self._lock:
                out = self._outputs.get(request_id)
                if out is not None and (kind == "error" or rest[1]):
                    del self._outputs[request_id]
            if out is not None:
                out.deliver((kind, *rest))

    def _kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)


def _python() -> str:
    """The interpreter the child runs: this one, unless this process is not a `python` (Triton's
    Python-backend stub embeds the interpreter; its launcher puts the venv's bin first on PATH)."""
    if Path(sys.executable).name.startswith("python"):
        return sys.executable
    found = shutil.which("python3") or shutil.which("python")
    if found is None:
        raise EngineError("no python interpreter on PATH to run the TensorRT-LLM context instance")
    return found


# ---------------------------------------------------------------------- the child
def _child_main(conn, engine_dir: str, settings: dict, cuda_visible_devices: str, preload: str | None) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices  # before anything touches CUDA
    os.environ["TLLM_WORKER_USE_SINGLE_PROCESS"] = "1"  # the worker is this process: rank 0, visible device 0
    try:
        if preload:
            _run_preload(preload)
        from engines.tensorrt_llm import lazy_import
        from engines.tensorrt_llm.llm_settings import llm_kwargs

        api = lazy_import.llmapi(f"the context instance of {engine_dir}")
        s = TrtllmSettings.from_dict(settings)
        llm = api.LLM(**llm_kwargs(api, s, engine_dir, connector=False, transceiver=True))
    except BaseException as e:  # noqa: BLE001 - reported to the engine, which raises it
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready",))
    try:
        asyncio.run(_serve(conn, llm))
    finally:
        llm.shutdown()


async def _serve(conn, llm) -> None:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()

    parent = multiprocessing.parent_process()
    watched = [conn] + ([parent.sentinel] if parent is not None else [])

    def receive() -> None:
        while True:
            ready = multiprocessing.connection.wait(watched)
            message = ("shutdown",)  # the engine's process is gone (its sentinel, or the pipe's end)
            if conn in ready:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    pass
            loop.call_soon_threadsafe(inbox.put_nowait, message)
            if message[0] == "shutdown":
                return

    threading.Thread(target=receive, daemon=True).start()
    outputs: dict[int, Any] = {}
    tasks: set[asyncio.Task] = set()
    while True:
        message = await inbox.get()
        if message[0] == "shutdown":
            for task in tasks:
                task.cancel()
            return
        if message[0] == "abort":
            out = outputs.get(message[1])
            if out is not None:
                out.abort()
            continue
        _, request_id, tokens, sp, retention, disagg = message
        task = asyncio.create_task(_stream(conn, llm, outputs, request_id, tokens, sp, retention, disagg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def _stream(conn, llm, outputs, request_id, tokens, sp, retention, disagg) -> None:
    try:
        out = outputs[request_id] = llm.generate_async(tokens, sampling_params=sp, streaming=True,
                                                       kv_cache_retention_config=retention,
                                                       disaggregated_params=disagg)
        async for o in out:
            done = o.outputs[0]
            conn.send(("out", request_id, list(done.token_ids), bool(o.finished),
                       getattr(done, "disaggregated_params", None)))
    except Exception as e:  # noqa: BLE001 - the engine's stream raises it
        conn.send(("error", request_id, f"{type(e).__name__}: {e}"))
    finally:
        outputs.pop(request_id, None)


def _run_preload(spec: str) -> None:
    where, _, function = spec.rpartition(":")
    if where.endswith(".py"):
        name = Path(where).stem
        module_spec = importlib.util.spec_from_file_location(name, where)
        module = sys.modules[name] = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    getattr(module, function)()
