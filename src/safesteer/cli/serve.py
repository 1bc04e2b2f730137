"""`safesteer serve`: the runtime steering service (FastAPI + uvicorn)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Optional

import typer

from safesteer.errors import SafesteerError

# The library is imported inside the functions (lazily) on purpose: `safesteer --help` and the other
# commands load no torch/FastAPI, and the tests patch safesteer.models.load_backbone and
# uvicorn.run, which the command looks up when it runs.


def resolve_directions(path: Path):
    """A direction set from its folder, its ``directions.json``, or a run folder holding ``directions/``."""
    from safesteer.steering import DirectionSet

    p = Path(path)
    if not p.exists():
        raise SafesteerError(f"missing directions {p}; build them with `safesteer directions`")
    for cand in (p, p / "directions"):
        if (cand / "directions.json").is_file() or cand.name == "directions.json":
            return DirectionSet.load(cand)
    hits = sorted(p.glob("*/directions.json"))
    if len(hits) == 1:
        return DirectionSet.load(hits[0])
    raise SafesteerError(
        f"{p} holds no directions.json (nor a single sub-folder with one); point --directions at the folder "
        "written by `safesteer directions`"
    )


def resolve_probes(values: list[str], probe_layer: int | None) -> dict[str, Any]:
    """``[NAME=]DIR`` options → ``name → ServedProbe``-ready probes. DIR may hold several probe folders."""
    from safesteer.probes import load_probe
    from safesteer.serve import ServedProbe

    out: dict[str, Any] = {}

    def add(name: str, folder: Path) -> None:
        if name in out:
            raise SafesteerError(f"two probes are named '{name}'; name them with --probes NAME=DIR")
        probe = load_probe(folder)
        layer = probe.meta.get("layer", probe_layer)
        if layer is None:
            raise SafesteerError(f"probe {folder} does not record its layer; pass --probe-layer")
        out[name] = ServedProbe(name, probe, int(layer))

    for value in values:
        name, _, path = value.partition("=") if "=" in value else ("", "", value)
        folder = Path(path)
        if (folder / "probe.json").is_file() or folder.name == "probe.json":
            folder = folder.parent if folder.name == "probe.json" else folder
            add(name or _probe_name(folder), folder)
            continue
        subs = sorted(p.parent for p in folder.glob("*/probe.json")) if folder.is_dir() else []
        if not subs:
            raise SafesteerError(
                f"{folder} is not a probe folder (no probe.json, nor sub-folders with one); train one "
                "with `safesteer probe`"
            )
        if name:
            raise SafesteerError(
                f"--probes {value}: NAME=DIR needs DIR to be one probe folder, {folder} holds {len(subs)}"
            )
        for sub in subs:
            add(_probe_name(sub), sub)
    return out


def _probe_name(folder: Path) -> str:
    from safesteer.io import read_json

    meta = read_json(folder / "probe.json").get("meta", {}) or {}
    return str(meta.get("label") or folder.name)


def _serve_section(run: Path | None):
    """The run's ``[serve]`` section (defaults without a run)."""
    from safesteer.config import ServeSection, load_config

    if run is None or not (Path(run) / "config.toml").is_file():
        return ServeSection()
    return load_config(Path(run) / "config.toml").serve


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        run: Optional[Path] = typer.Option(
            None,
            "--run",
            help="A `safesteer run` folder: serve its model, recommended policy, gate and directions.",
        ),
        model: Optional[str] = typer.Option(
            None,
            "--model",
            help="Alias (smollm2-135m), local folder or hub id (default: the run's model, else "
            "smollm2-135m).",
        ),
        policies: Optional[Path] = typer.Option(
            None,
            "--policies",
            help="Folder of policy JSON files (created if missing; PUTs are saved here). Default with "
            "--run: <run>/policies.",
        ),
        directions: Optional[Path] = typer.Option(
            None, "--directions", help="Direction set folder (or a run folder holding directions/)."
        ),
        probes: list[str] = typer.Option(
            [], "--probes", help="[NAME=]DIR of a probe (or a folder of probe folders); repeatable."
        ),
        probe_layer: Optional[int] = typer.Option(
            None, "--probe-layer", help="Layer of probes that do not record one."
        ),
        sae: Optional[Path] = typer.Option(None, "--sae", help="SAE folder, for policies that clamp atoms."),
        sae_layer: Optional[int] = typer.Option(
            None, "--sae-layer", help="Layer the SAE reads (default: from its config)."
        ),
        host: str = typer.Option("127.0.0.1", "--host", help="Bind address (loopback by default)."),
        port: int = typer.Option(8000, "--port", min=0, max=65535),
        api_key_env: Optional[str] = typer.Option(
            None, "--api-key-env", help="Environment variable holding the API key for PUT/DELETE."
        ),
        max_texts: int = typer.Option(32, "--max-texts", min=1, help="Texts per request."),
        max_text_chars: int = typer.Option(4000, "--max-text-chars", min=1, help="Characters per text."),
        max_body: int = typer.Option(1 << 20, "--max-body-bytes", min=1, help="Request body limit."),
        max_new_tokens: int = typer.Option(
            128, "--max-new-tokens", min=1, help="Upper bound for /v1/generate."
        ),
        max_alpha: float = typer.Option(100.0, "--max-alpha", help="|alpha| limit (raw activation units)."),
        batch_window_ms: float = typer.Option(
            0.0,
            "--batch-window-ms",
            min=0.0,
            help="Coalesce /v1/score and /v1/choice requests of one policy within this window (0 = "
            "off: bit-exact per request).",
        ),
        threads: Optional[int] = typer.Option(
            None, "--threads", min=1, help="torch intra-op threads (default: torch's choice)."
        ),
        log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
        engine: Optional[str] = typer.Option(
            None,
            "--engine",
            help="hf (the Hugging Face model, one worker thread) or vllm (vLLM's engine: continuous "
            "batching, paged KV cache; pip install 'safesteer[vllm]') (default: [serve] or hf).",
        ),
        tensor_parallel_size: Optional[int] = typer.Option(
            None, "--tensor-parallel-size", min=1, help="vllm: tensor parallel size (default: [serve] or 1)."
        ),
        pipeline_parallel_size: Optional[int] = typer.Option(
            None, "--pipeline-parallel-size", min=1, help="vllm: pipeline stages (default: [serve] or 1)."
        ),
        max_model_len: Optional[int] = typer.Option(
            None,
            "--max-model-len",
            min=1,
            help="tokens per request, prompt + answer; a longer one is a 422 (default: [serve] or 2048).",
        ),
        kv_cache_gb: Optional[float] = typer.Option(
            None, "--kv-cache-gb", min=0.01, help="vllm: KV cache size in GiB (default: [serve] or 1)."
        ),
    ) -> None:
        """Serve a steered model over HTTP with policies that can be changed while it runs."""
        from safesteer.serve import Limits, PolicyStore

        section = _serve_section(run)
        engine = engine if engine is not None else section.engine
        if engine not in ("hf", "vllm"):
            raise SafesteerError(f"--engine {engine!r} unknown; valid choices: hf, vllm")
        if engine == "vllm":
            from safesteer.serve.vllm_engine import require_vllm

            require_vllm()  # before anything loads: one line naming the install
        api_key = None
        if api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise SafesteerError(
                    f"--api-key-env {api_key_env}: that environment variable is unset or empty"
                )
        limits = Limits(
            max_texts=max_texts,
            max_text_chars=max_text_chars,
            max_body_bytes=max_body,
            max_new_tokens=max_new_tokens,
            max_abs_alpha=max_alpha,
            batch_window_ms=batch_window_ms,
        )
        bundle = None
        if run is not None:
            from safesteer.serve.bundle import load_bundle

            bundle = load_bundle(run)
            if bundle["none"]:
                typer.echo(f"{run}: {bundle['none']}", err=True)
        elif policies is None:
            raise SafesteerError(
                "pass --policies DIR (a folder of policy files) or --run RUN (a `safesteer run` folder)"
            )
        model = model or (bundle["model"] if bundle else "smollm2-135m")
        policies = policies if policies is not None else bundle["policies"]
        ds = (
            resolve_directions(directions)
            if directions is not None
            else (bundle["directions"] if bundle else None)
        )
        served = {**(bundle["probes"] if bundle else {}), **resolve_probes(probes, probe_layer)}
        if bundle and bundle["provenance"]:
            need = max(
                abs(
                    float(bundle["provenance"]["alpha_norm"])
                    * float(bundle["provenance"]["scale_median_norm"])
                ),
                0.0,
            )
            if need > max_alpha:
                max_alpha = float(need)
                typer.echo(
                    f"--max-alpha raised to {max_alpha:g}: the run's recommended policy steers with that α",
                    err=True,
                )
        limits = Limits(
            max_texts=max_texts,
            max_text_chars=max_text_chars,
            max_body_bytes=max_body,
            max_new_tokens=max_new_tokens,
            max_abs_alpha=max_alpha,
            batch_window_ms=batch_window_ms,
        )
        store = PolicyStore(policies)
        sae_obj = None
        if sae is not None:
            from safesteer.sae import load_sae

            sae_obj = load_sae(sae)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        typer.echo(f"loading {model} ({engine}) …", err=True)
        vllm = None
        if engine == "vllm":
            from safesteer.models.registry import resolve_model
            from safesteer.serve.vllm_engine import TokenizerBackbone, VllmEngine, VllmSettings

            path = str(resolve_model(model).path)
            settings = VllmSettings(
                tensor_parallel_size=tensor_parallel_size or section.tensor_parallel_size,
                pipeline_parallel_size=pipeline_parallel_size or section.pipeline_parallel_size,
                max_model_len=max_model_len or section.max_model_len,
                max_num_seqs=section.max_num_seqs,
                kv_cache_gb=kv_cache_gb or section.kv_cache_gb,
            )
            backbone = TokenizerBackbone(model, path)
            vllm = VllmEngine(path, settings)
        else:
            from safesteer.models import load_backbone

            backbone = load_backbone(model, max_length=max_model_len or section.max_model_len)
        from safesteer.serve.app import create_app

        app_ = create_app(
            backbone,
            ds,
            served,
            store,
            api_key=api_key,
            limits=limits,
            sae=sae_obj,
            sae_layer=sae_layer,
            vllm=vllm,
        )
        if not _is_loopback(host) and not api_key:
            typer.echo(
                f"warning: listening on {host} without an API key; anyone who can reach it can change "
                "policies",
                err=True,
            )
        typer.echo(
            f"serving {model} ({backbone.kind}, {backbone.n_layers} layers) with {len(store)} policies, "
            f"{len(served)} probes, {len(ds) if ds else 0} directions on http://{host}:{port} (docs: /docs)",
            err=True,
        )
        import uvicorn

        try:
            uvicorn.run(app_, host=host, port=port, log_level=log_level)
        finally:
            if vllm is not None:
                vllm.close()
