"""Every forward hook safesteer installs on a backbone, and the state they share.

* :func:`capture` — block outputs of one forward pass (what :meth:`Backbone.forward_layers` reads),
  optionally stopping the pass after the deepest one.
* :func:`steering` — the one steering hook: a block's output replaced by ``apply(h)``, restricted
  to the prompt's positions with ``where="prompt"`` (:class:`PromptOnly`, :func:`answer_starts`).
  :meth:`Backbone.steer` and :func:`safesteer.steering.condition.conditional` both install it.
* :func:`on_new_input` and :func:`read_in_pass` — the in-pass gate read: a callback per new
  input (no KV cache yet), and the outputs of several blocks of the same pass handed over once
  the deepest of them is computed, before any steering edit of those blocks.
* :class:`PrefixCache` — reuse of blocks ``0..layer`` across passes over the same inputs.

What is installed right now lives in :class:`HookState` (``backbone.hooks``), public so that
modules outside :mod:`safesteer.models` never touch a backbone's private attributes.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from safesteer.errors import SafesteerError

WHERE = ("all", "prompt")
Positions = torch.Tensor | slice | Sequence[int] | None


@dataclass
class HookState:
    """What is installed on one backbone: steering layers (one entry per active steering), the
    active prefix cache, and the answer starts declared by :func:`answer_starts`."""

    steer_layers: list[int] = field(default_factory=list)
    prefix: "PrefixCache | None" = None
    answer_starts: torch.Tensor | None = None


class StopForward(Exception):
    """Raised by a hook to end the forward pass once the deepest requested layer is computed."""


# ------------------------------------------------------------------------------------ model shape
def find_layers(model: nn.Module, n_layers: int) -> nn.ModuleList:
    """The ModuleList of transformer blocks (Llama ``model.layers``, RoBERTa ``encoder.layer``, GPT-2
    ``h``…)."""
    candidates = [
        (name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers
    ]
    if not candidates:
        raise SafesteerError(
            f"cannot find the {n_layers} transformer blocks of {type(model).__name__}; unsupported "
            "architecture"
        )
    return min(candidates, key=lambda nm: nm[0].count("."))[1]


def find_body(model: nn.Module) -> nn.Module:
    """The transformer body under the LM head (Llama ``model.model``): the module whose forward takes
    the token ids and runs the block stack, called by every forward path (generation, logits,
    :meth:`Backbone.forward_layers`); the whole model if it has none."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return base if isinstance(base, nn.Module) else model


def block_hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden states of a block's output (a tensor, or the first item of a tuple/list)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_hidden(output: torch.Tensor | tuple, hidden: torch.Tensor) -> torch.Tensor | tuple:
    """A block's output with its hidden states replaced (the other items kept)."""
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list):
        return [hidden] + list(output[1:])
    return hidden


def is_new_input(kwargs: dict) -> bool:
    """Whether a model call (its forward kwargs) starts a new input: no KV cache, or an empty one."""
    pkv = next(
        (kwargs[k] for k in ("past_key_values", "cache", "past_key_value") if kwargs.get(k) is not None), None
    )
    if pkv is None:
        return True
    try:
        return int(pkv.get_seq_length()) == 0
    except AttributeError:  # legacy tuple caches
        return len(pkv) == 0 or pkv[0] is None


def _ids_and_mask(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    ids = kwargs.get("input_ids", args[0] if args else None)
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    return ids, mask


# ------------------------------------------------------------------------------------- capturing
@contextlib.contextmanager
def capture(backbone: Any, layers: Sequence[int], stop: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """Record the outputs of blocks ``layers`` of the passes inside; with ``stop`` the pass ends
    (:class:`StopForward`, caught here) once the deepest one is computed."""
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def make_hook(idx: int):
        def hook(_module, _inputs, output):
            captured[idx] = block_hidden(output)
            if stop and idx == deepest:
                raise StopForward

        return hook

    handles = [backbone.layers[i].register_forward_hook(make_hook(i)) for i in layers]
    try:
        yield captured
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def on_new_input(backbone: Any, fn: Callable[[torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Call ``fn(input_ids, attention_mask)`` before the body runs on a new input (no KV cache yet;
    a missing mask reads as all ones)."""

    def pre(_module, args, kwargs):
        if not is_new_input(kwargs):
            return None
        ids, mask = _ids_and_mask(args, kwargs)
        if mask is None:
            mask = torch.ones(ids.shape[:2], dtype=torch.long, device=ids.device)
        fn(ids, mask)
        return None

    handle = find_body(backbone.model).register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def read_in_pass(
    backbone: Any, layers: Sequence[int], fn: Callable[[dict[int, torch.Tensor]], None]
) -> Iterator[None]:
    """Call ``fn({layer: block output})`` in every pass once the deepest of ``layers`` is computed.
    The hooks run first on their blocks, so they read the outputs before any steering edit."""
    wanted = sorted(set(layers))
    captured: dict[int, torch.Tensor] = {}

    def make_hook(idx: int):
        def hook(_module, _inputs, output):
            captured[idx] = block_hidden(output)
            if idx == wanted[-1]:
                got = dict(captured)
                captured.clear()
                if len(got) == len(wanted):
                    fn(got)
            return None

        return hook

    handles = [backbone.layers[i].register_forward_hook(make_hook(i), prepend=True) for i in wanted]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        captured.clear()


# -------------------------------------------------------------------------------------- steering
def check_where(where: str) -> str:
    if where not in WHERE:
        raise SafesteerError(f"steering positions '{where}' unknown; valid choices: {', '.join(WHERE)}")
    return where


@contextlib.contextmanager
def answer_starts(backbone: Any, starts: torch.Tensor | Sequence[int]) -> Iterator[None]:
    """Declare, for the passes inside, where each row's appended answer starts (teacher-forced
    scoring of prompt + answer in one pass), so that prompt-only steering stops there."""
    state: HookState = backbone.hooks
    prev = state.answer_starts
    state.answer_starts = torch.as_tensor(starts, dtype=torch.long).reshape(-1)
    try:
        yield
    finally:
        state.answer_starts = prev


class PromptOnly:
    """Which positions of the current pass a ``where`` steering touches.

    ``all``: every position of every pass. ``prompt``: the positions of a new input (the prompt;
    cached generation then decodes the answer tokens unsteered, on the steered context), and in a
    teacher-forced pass the positions before :func:`answer_starts` — so that scoring a
    given answer sees exactly the activations generating it would. Used as a context manager, it
    watches the model's calls (a forward pre-hook) while steering is installed. Generation must
    use the KV cache (transformers' default): without it every step is a new input, steered whole."""

    def __init__(self, backbone: Any, where: str = "all"):
        self.bb, self.where, self.new, self._handle = backbone, where, True, None

    def __enter__(self) -> "PromptOnly":
        if self.where == "prompt":
            self._handle = find_body(self.bb.model).register_forward_pre_hook(self._pre, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _pre(self, _module, _args, kwargs):
        self.new = is_new_input(kwargs)
        return None

    def mask(self, h: torch.Tensor) -> torch.Tensor | None:
        """Bool (batch × seq) of the positions to steer in this pass (a new input); None = all of them."""
        if self.where == "all":
            return None
        starts = self.bb.hooks.answer_starts
        if starts is None:
            return None
        if starts.shape[0] != h.shape[0]:
            raise SafesteerError(f"{starts.shape[0]} answer starts for a pass of {h.shape[0]} rows")
        return torch.arange(h.shape[1], device=h.device).unsqueeze(0) < starts.to(h.device).unsqueeze(1)

    def select(self, new: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``new`` where this pass steers, ``h`` elsewhere (all of ``h`` in a cached decoding step)."""
        if self.where == "prompt" and not self.new:
            return h
        m = self.mask(h)
        return new if m is None else torch.where(m.unsqueeze(-1), new, h)


def position_mask(positions: Positions, h: torch.Tensor) -> torch.Tensor:
    """Bool (batch × seq) of ``positions``: a bool tensor (batch × seq), a slice or sequence indices."""
    batch, seq = h.shape[0], h.shape[1]
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        if positions.shape != (batch, seq):
            raise SafesteerError(
                f"position mask shape {tuple(positions.shape)} does not match activations ({batch}, {seq})"
            )
        return positions.to(h.device)
    mask = torch.zeros(seq, dtype=torch.bool, device=h.device)
    if isinstance(positions, slice):
        mask[positions] = True
    else:
        idx = [p for p in positions if -seq <= p < seq]
        if idx:
            mask[torch.tensor(idx, device=h.device)] = True
    return mask.unsqueeze(0).expand(batch, seq)


@contextlib.contextmanager
def steering(
    backbone: Any, layer: int, apply: Callable[[torch.Tensor], torch.Tensor | None], where: str = "all"
) -> Iterator[None]:
    """Replace block ``layer``'s output ``h`` by ``apply(h)`` (None: leave this pass alone) at the
    positions ``where`` selects (:class:`PromptOnly`), while the ``with`` block runs; the hook is
    removed on exit, also when the body raises."""
    only = PromptOnly(backbone, check_where(where))

    def hook(_module, _inputs, output):
        h = block_hidden(output)
        new = apply(h)
        if new is None:
            return None
        return replace_hidden(output, only.select(new, h))

    handle = backbone.layers[layer].register_forward_hook(hook)
    state: HookState = backbone.hooks
    state.steer_layers.append(layer)
    try:
        with only:
            yield
    finally:
        handle.remove()
        state.steer_layers.remove(layer)


# ---------------------------------------------------------------------------------- prefix cache
@contextlib.contextmanager
def prefix_cache(backbone: Any, layer: int, max_bytes: int) -> Iterator["PrefixCache"]:
    """The body of :meth:`Backbone.prefix_cache` (the layer already checked)."""
    state: HookState = backbone.hooks
    if state.prefix is not None:
        raise SafesteerError("prefix_cache is already active on this backbone")
    pc = PrefixCache(backbone, layer, max_bytes)
    state.prefix = pc
    try:
        pc.install()
        yield pc
    finally:
        pc.remove()
        state.prefix = None


class PrefixCache:
    """State of :meth:`Backbone.prefix_cache` (hooks on the block stack, stubs for skipped blocks)."""

    def __init__(self, bb: Any, layer: int, max_bytes: int):
        self.bb, self.layer, self.max_bytes = bb, layer, max_bytes
        self.store: dict[bytes, torch.Tensor | tuple] = {}
        self.nbytes = 0
        self.hits = self.misses = 0
        self._key: bytes | None = None  # key of the forward pass in progress (None: cache not usable)
        self._hit = False
        self._handles: list = []
        self._patched: list[nn.Module] = []

    def install(self) -> None:
        def pre(_module, args, kwargs):
            ids, mask = _ids_and_mask(args, kwargs)
            usable = (
                isinstance(ids, torch.Tensor)
                and kwargs.get("inputs_embeds") is None
                and not kwargs.get("use_cache")
                and kwargs.get("past_key_values") is None
                and not kwargs.get("output_hidden_states")
                and all(l >= self.layer for l in self.bb.hooks.steer_layers)
            )
            if not usable:
                self._key, self._hit = None, False
                return None
            h = hashlib.blake2b(digest_size=16)
            h.update(str(tuple(ids.shape)).encode())
            h.update(ids.detach().cpu().numpy().tobytes())
            if isinstance(mask, torch.Tensor):
                h.update(mask.detach().cpu().numpy().tobytes())
            self._key = h.digest()
            self._hit = self._key in self.store
            self.hits += self._hit
            self.misses += not self._hit
            return None

        def record(_module, _inputs, output):
            if self._key is not None and not self._hit and self._key not in self.store:
                size = block_hidden(output).numel() * block_hidden(output).element_size()
                if self.nbytes + size <= self.max_bytes:
                    self.store[self._key] = output
                    self.nbytes += size
            return None

        owner = find_body(self.bb.model)
        self._handles.append(owner.register_forward_pre_hook(pre, with_kwargs=True))
        # prepend: record the block's own output, before any steering hook edits it
        self._handles.append(self.bb.layers[self.layer].register_forward_hook(record, prepend=True))
        for i in range(self.layer + 1):
            block = self.bb.layers[i]
            original = block.forward
            last = i == self.layer

            def forward(*args, _original=original, _last=last, **kwargs):
                if not self._hit:
                    return _original(*args, **kwargs)
                if _last:
                    return self.store[self._key]
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                return replace_hidden(self.store[self._key], hidden)

            block.forward = forward
            self._patched.append(block)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for block in self._patched:
            del block.forward  # back to the class's forward
        self._handles.clear()
        self._patched.clear()
        self.store.clear()
        self._key, self._hit = None, False
