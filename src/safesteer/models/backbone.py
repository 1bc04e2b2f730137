"""One frozen interface over Hugging Face masked and causal language models.

Layer convention: ``layer=L`` (0-based) is the output of transformer block ``L`` — the residual
stream after that block. It equals Hugging Face's ``hidden_states[L + 1]`` (``hidden_states[0]``
is the embedding output), except for the last block of models whose final norm HF folds into
the last ``hidden_states`` entry (Llama family).

The sentence vector H of the original study is the mean of a layer's output over real tokens
(attention mask). :meth:`Backbone.forward_layers` stops the forward pass after the deepest
requested block, and :meth:`Backbone.steer` adds ``alpha * v`` (or applies a callable) to a
block's output while a ``with`` block runs, removing itself on exit even if the body raises.
Every forward hook behind these lives in :mod:`safesteer.models.hooks` (what is installed now:
``backbone.hooks``); pooling in :mod:`safesteer.models.positions`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from safesteer.errors import SafesteerError
from safesteer.models import hooks
from safesteer.models.hooks import HookState, Positions, find_layers, position_mask
from safesteer.models.positions import masked_mean, pooled_vectors
from safesteer.models.registry import resolve_model

Kind = Literal["causal", "masked"]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (batch × seq × d) over positions where ``attention_mask`` is 1
    (:func:`safesteer.models.positions.masked_mean`)."""
    return masked_mean(hidden, attention_mask)


@dataclass
class Encoded:
    """Tokenised batch plus how many texts were truncated."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    n_truncated: int = 0


class Backbone:
    """A frozen masked or causal LM with activation access and a steering hook."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        kind: Kind | None = None,
        name: str = "custom",
        source: str = "memory",
        max_length: int = 512,
    ):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.config = model.config
        self.kind: Kind = kind or _detect_kind(model)
        self.name = name
        self.source = source
        n_layers = getattr(self.config, "num_hidden_layers", None) or self.config.n_layer
        self.layers = find_layers(model, n_layers)
        self.n_layers = len(self.layers)
        self.d_model = int(getattr(self.config, "hidden_size", None) or self.config.n_embd)
        limit = (
            getattr(self.config, "max_position_embeddings", None)
            or getattr(self.config, "n_positions", None)
            or max_length
        )
        if self.kind == "masked" and getattr(self.config, "model_type", "") in (
            "roberta",
            "xlm-roberta",
            "camembert",
        ):
            limit -= 2  # RoBERTa reserves two positions for the padding offset
        self.max_length = int(min(max_length, limit))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.hooks = HookState()
        """What is installed on this backbone now (steering layers, prefix cache, answer starts)."""

    # ------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, (int, np.integer)) or not (0 <= int(layer) < self.n_layers):
            raise SafesteerError(
                f"layer {layer} out of range for {self.name}; valid layers are 0..{self.n_layers - 1}"
            )
        return int(layer)

    def tokenize(
        self,
        texts: Sequence[str],
        max_length: int | None = None,
        padding_side: Literal["left", "right"] = "right",
        add_special_tokens: bool = True,
    ) -> Encoded:
        """Tokenise with truncation to the model's limit; count truncated texts."""
        limit = min(max_length or self.max_length, self.max_length)
        old = self.tokenizer.padding_side
        self.tokenizer.padding_side = padding_side
        try:
            enc = self.tokenizer(
                list(texts),
                padding=True,
                truncation=True,
                max_length=limit,
                return_tensors="pt",
                return_overflowing_tokens=False,
                add_special_tokens=add_special_tokens,
                return_length=False,
            )
        finally:
            self.tokenizer.padding_side = old
        n_trunc = (
            int((enc["attention_mask"].sum(dim=1) >= limit).sum())
            if enc["input_ids"].shape[1] >= limit
            else 0
        )
        return Encoded(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device), n_trunc)

    # ------------------------------------------------------------ activations
    @torch.inference_mode()
    def forward_layers(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        layers: Sequence[int],
        stop: bool = True,
    ) -> dict[int, torch.Tensor]:
        """Block outputs (batch × seq × d) for ``layers``; stops after the deepest one if ``stop``."""
        wanted = sorted({self.check_layer(l) for l in layers})
        if not wanted:
            raise SafesteerError("no layer requested; pass at least one layer")
        with hooks.capture(self, wanted, stop) as captured:
            self.body_forward(input_ids, attention_mask)
        return {i: captured[i] for i in wanted}

    def body_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Run the transformer body (no LM head) when possible (:func:`~safesteer.models.hooks.find_body`)."""
        target = hooks.find_body(self.model)
        return (
            target(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            if self.kind == "causal"
            else target(input_ids=input_ids, attention_mask=attention_mask)
        )

    def pooled(
        self,
        texts: Sequence[str],
        layers: Sequence[int],
        batch_size: int = 32,
        max_length: int | None = None,
        position: str = "mean",
        answers: Sequence[str] | None = None,
        system: str | None = None,
    ) -> dict[int, np.ndarray]:
        """Pooled sentence vectors (float32, rows × d) for each requested layer.

        ``position`` (see :mod:`safesteer.models.positions`): ``mean`` (default) and ``last`` pool
        the raw ``texts``; ``prompt_end`` and ``answer`` treat ``texts`` as user messages rendered
        with the chat template (``answers`` appended after the generation prompt for ``answer``).
        """
        return pooled_vectors(self, texts, layers, batch_size, max_length, position, answers, system)

    # ---------------------------------------------------------------- steering
    @contextlib.contextmanager
    def steer(
        self,
        layer: int,
        vector: torch.Tensor | np.ndarray | None = None,
        alpha: float = 1.0,
        edit: Callable[[torch.Tensor], torch.Tensor] | None = None,
        positions: Positions = None,
        where: str = "all",
    ) -> Iterator[None]:
        """Add ``alpha * vector`` to block ``layer``'s output (or apply ``edit``) inside the block.

        ``positions``: None = every position; a bool tensor (batch × seq); a slice or a list of
        sequence indices. ``where="prompt"`` steers the prompt only (see
        :class:`~safesteer.models.hooks.PromptOnly`). The hook is removed on exit, also when the body raises.
        """
        layer = self.check_layer(layer)
        if (vector is None) == (edit is None):
            raise SafesteerError("steer needs exactly one of vector or edit")
        if where == "prompt" and positions is not None:
            raise SafesteerError("steer takes positions or where='prompt', not both")
        where = hooks.check_where(where)
        delta = None
        if vector is not None:
            v = torch.as_tensor(np.asarray(vector) if not isinstance(vector, torch.Tensor) else vector)
            if v.ndim != 1 or v.shape[0] != self.d_model:
                raise SafesteerError(
                    f"steering vector has shape {tuple(v.shape)}; expected ({self.d_model},) for {self.name}"
                )
            delta = (float(alpha) * v.to(torch.float32)).to(self.device)

        def apply(h: torch.Tensor) -> torch.Tensor:
            new = edit(h) if edit is not None else h + delta.to(h.dtype)
            if positions is not None:
                new = torch.where(position_mask(positions, h).unsqueeze(-1), new, h)
            return new

        with hooks.steering(self, layer, apply, where):
            yield

    @property
    def steer_layers(self) -> tuple[int, ...]:
        """The blocks steered right now (one entry per active steering)."""
        return tuple(self.hooks.steer_layers)

    @contextlib.contextmanager
    def prefix_cache(self, layer: int, max_bytes: int = 1 << 30) -> Iterator[hooks.PrefixCache]:
        """Reuse blocks ``0..layer`` across passes over the same inputs (steering evaluations).

        Inside the ``with`` block, the first forward pass over a given batch (same token ids and
        attention mask) records block ``layer``'s output; a later pass over the same batch skips
        blocks ``0..layer`` and starts from the recorded output. Steering at ``layer`` or deeper is
        applied on top of it, so the results equal full passes; when steering acts on a shallower
        block, or with a KV cache (generation) or ``output_hidden_states``, full passes run.
        Recording stops once ``max_bytes`` are held. Nesting is not allowed.
        """
        with hooks.prefix_cache(self, self.check_layer(layer), max_bytes) as pc:
            yield pc

    # ----------------------------------------------------------------- scoring
    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs = {"use_cache": False} if self.kind == "causal" else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits

    def _bos_prefix(self) -> list[int]:
        """BOS id to prepend for causal scoring when the tokenizer does not add one itself."""
        bos = self.tokenizer.bos_token_id
        if bos is None:
            return []
        probe = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        return [] if probe and probe[0] == bos else [bos]

    @torch.inference_mode()
    def token_logprobs(self, texts: Sequence[str], batch_size: int = 16) -> list[torch.Tensor]:
        """Causal LM: log P(token_t | tokens_<t) for every token of each text (BOS-conditioned)."""
        if self.kind != "causal":
            raise SafesteerError(
                "token_logprobs needs a causal LM; use masked_token_logprobs / pseudo-log-likelihood "
                "for masked LMs"
            )
        prefix = self._bos_prefix()
        out: list[torch.Tensor] = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            ids = [
                prefix
                + self.tokenizer(
                    t, add_special_tokens=True, truncation=True, max_length=self.max_length - len(prefix)
                )["input_ids"]
                for t in chunk
            ]
            width = max(len(x) for x in ids)
            pad = self.tokenizer.pad_token_id or 0
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=self.device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=self.device)
            logp = torch.log_softmax(self.logits(input_ids, mask).float(), dim=-1)
            tok = logp[:, :-1].gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            for row, x in zip(tok, ids):
                out.append(row[: len(x) - 1].cpu())
        return out

    @torch.inference_mode()
    def next_token_logprobs(
        self, prompts: Sequence[str], batch_size: int = 16, add_special_tokens: bool = False
    ) -> torch.Tensor:
        """Causal LM: log-softmax over the vocabulary for the token after each prompt (rows × vocab)."""
        if self.kind != "causal":
            raise SafesteerError("next_token_logprobs needs a causal LM")
        rows = []
        for start in range(0, len(prompts), batch_size):
            enc = self.tokenize(
                prompts[start : start + batch_size],
                padding_side="left",
                add_special_tokens=add_special_tokens,
            )
            logits = self.logits(enc.input_ids, enc.attention_mask)[:, -1].float()
            rows.append(torch.log_softmax(logits, dim=-1).cpu())
        return torch.cat(rows)

    @torch.inference_mode()
    def masked_token_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Masked LM: log-softmax over the vocabulary at ``positions[i]`` of row ``i`` (rows × vocab)."""
        if self.kind != "masked":
            raise SafesteerError("masked_token_logprobs needs a masked LM")
        logits = self.logits(input_ids, attention_mask).float()
        idx = torch.arange(logits.shape[0], device=logits.device)
        return torch.log_softmax(logits[idx, positions.to(logits.device)], dim=-1).cpu()

    def chat_prompt(self, user: str | Sequence[Mapping[str, str]], system: str | None = None) -> str:
        """Render a chat with the model's template, ready for the assistant's answer: ``user`` is one
        user message, or a whole conversation (``[{"role": …, "content": …}, …]``, last turn the user's)."""
        turns = (
            [{"role": "user", "content": user}]
            if isinstance(user, str)
            else [{"role": str(m["role"]), "content": str(m["content"])} for m in user]
        )
        if not getattr(self.tokenizer, "chat_template", None):
            body = "\n\n".join(m["content"] for m in turns)
            return body if system is None else f"{system}\n\n{body}"
        messages = ([{"role": "system", "content": system}] if system else []) + turns
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 32,
        do_sample: bool = False,
        seed: int = 0,
        **kwargs,
    ) -> list[str]:
        """Causal LM generation (greedy by default); steering contexts active around it apply."""
        if self.kind != "causal":
            raise SafesteerError("generation needs a causal LM")
        enc = self.tokenize(prompts, padding_side="left", add_special_tokens=False)
        if do_sample:
            torch.manual_seed(seed)
        out = self.model.generate(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            pad_token_id=self.tokenizer.pad_token_id,
            **kwargs,
        )
        return self.tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)


def _detect_kind(model: nn.Module) -> Kind:
    name = type(model).__name__
    if name.endswith("ForMaskedLM"):
        return "masked"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal"
    raise SafesteerError(
        f"cannot tell whether {name} is a masked or causal LM; pass kind='masked' or kind='causal'"
    )


def load_backbone(
    name: str,
    kind: Kind | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_length: int = 512,
) -> Backbone:
    """Load a frozen backbone by alias (``smollm2-135m``), local folder or hub id."""
    from transformers import (  # transformers: only when a model loads (config imports models)
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    resolved = resolve_model(name)
    hf_logging.set_verbosity_error()
    config = AutoConfig.from_pretrained(resolved.path)
    if kind is None:
        archs = " ".join(getattr(config, "architectures", None) or [])
        if "MaskedLM" in archs or config.model_type in (
            "roberta",
            "bert",
            "distilbert",
            "xlm-roberta",
            "camembert",
            "deberta-v2",
            "electra",
        ):
            kind = "masked"
        else:
            kind = "causal"
    cls = AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(resolved.path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    except OSError as exc:
        raise SafesteerError(
            f"cannot load model '{name}' from {resolved.path}: {str(exc).splitlines()[0]}"
        ) from exc
    model.to(device)
    return Backbone(model, tokenizer, kind=kind, name=name, source=resolved.source, max_length=max_length)
