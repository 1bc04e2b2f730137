"""The sae and encode stages: train the SAE (single run or grid) on the activation store, encode the store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from safesteer import layout
from safesteer.sae.encode_dist import encode_distributed
from safesteer.sae.run import encode, train_on_store
from safesteer.sae.saving import load_sae


@dataclass(frozen=True)
class SAEOutputs:
    sae: Path  # cfg.json + sae_weights.safetensors of the selected configuration
    grid_results: Path


@dataclass(frozen=True)
class EncodeOutputs:
    latents: Path
    mean_l0: float


def run_sae_stage(section: Any, inputs: Mapping[str, Any], out_dir: Path, ctx) -> SAEOutputs:
    grid = {
        "expansions": [int(x) for x in section.expansions],
        "l1s": [float(x) for x in section.l1],
        "grid_epochs": section.grid_epochs,
        "grid_patience": section.grid_patience,
    }
    # the folder belongs to this key: continue whatever a killed run left
    _, table = train_on_store(
        inputs["extract"].acts,
        out_dir,
        section.train_config(ctx.seed),
        val_fraction=section.val_fraction,
        shuffle_buffer=section.shuffle_buffer,
        device=ctx.device,
        grid=grid,
        resume=True,
        show_progress=ctx.show_progress,
        dist=ctx.dist if ctx.distributed else None,
    )
    if table:
        ctx.say("SAE grid:\n" + table.rstrip())
    return SAEOutputs(out_dir / layout.SAE, out_dir / layout.GRID_RESULTS)


def run_encode_stage(section: Any, inputs: Mapping[str, Any], out_dir: Path, ctx) -> EncodeOutputs:
    if ctx.distributed:  # each rank encodes its shards; the parts are assembled into one latent store
        z = encode_distributed(
            load_sae(inputs["sae"].sae, device=ctx.dist.device),
            inputs["extract"].acts,
            out_dir / layout.LATENTS,
            ctx.dist,
            batch_size=section.batch_size,
            progress=ctx.show_progress,
        )
        return EncodeOutputs(out_dir / layout.LATENTS, float(z.manifest["mean_l0"]))
    z = encode(
        inputs["sae"].sae,
        inputs["extract"].acts,
        out_dir / layout.LATENTS,
        batch_size=section.batch_size,
        device=ctx.device,
        show_progress=ctx.show_progress,
    )
    return EncodeOutputs(out_dir / layout.LATENTS, float(z.manifest["mean_l0"]))
