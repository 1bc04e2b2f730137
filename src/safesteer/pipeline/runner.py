"""`safesteer run`: walks the stage table (:mod:`safesteer.pipeline.table`), each stage cached
under a key of its config section(s), the run seed and its inputs' keys, then writes the report.

A re-run skips finished stages; a changed setting re-runs only the stages that depend on it; a
killed run resumes (extraction continues shard by shard, the SAE from its last checkpoint, the
behaviour study at the step it was in: an unfinished stage keeps its folder). One
process at a time per run folder (an OS lock on ``<out>/.lock``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from safesteer import layout
from safesteer.config import Config, dump_toml
from safesteer.data.rows import run_data_dir
from safesteer.devices import resolve_device
from safesteer.distributed import env_world_size, from_env
from safesteer.errors import SafesteerError
from safesteer.io import atomic_path
from safesteer.pipeline.build_report import build_report
from safesteer.pipeline.cache import Stage, StageCache, stage_key
from safesteer.pipeline.lock import RunLock
from safesteer.pipeline.table import TABLE, Context, StageSpec, dump_outputs, load_outputs
from safesteer.serve.bundle import publish

STAGES = tuple(s.name for s in TABLE) + ("report",)


def _say(msg: str) -> None:
    print(f"[safesteer run] {msg}", file=sys.stderr, flush=True)


def stage_params(spec: StageSpec, cfg: Config) -> dict[str, Any]:
    """The settings part of a stage's cache key."""
    return spec.params(cfg, cfg.run.seed, run_data_dir(cfg.data.data_dir) is not None)


def stage_keys(cfg: Config) -> dict[str, str]:
    """Every stage's cache key for ``cfg`` (what the runner uses; computes nothing)."""
    keys: dict[str, str] = {}
    for spec in TABLE:
        keys[spec.name] = stage_key(spec.name, stage_params(spec, cfg), {k: keys[k] for k in spec.inputs})
    return keys


class Pipeline:
    def __init__(
        self,
        cfg: Config,
        out: str | Path,
        stages: list[str] | None = None,
        *,
        show_progress: bool | None = None,
    ):
        self.cfg = cfg
        self.out = Path(out)
        unknown = [s for s in (stages or []) if s not in STAGES]
        if unknown:
            raise SafesteerError(f"unknown stage {unknown[0]!r}; valid stages: {', '.join(STAGES)}")
        self.only = set(stages) if stages else None
        self.timings: dict[str, float] = {}
        self.status: dict[str, str] = {}
        self.st: dict[str, Stage] = {}
        self.outputs: dict[str, Any] = {}
        self.device = resolve_device(cfg.run.device)

        self.data_dir = run_data_dir(cfg.data.data_dir)
        self.show_progress = sys.stderr.isatty() if show_progress is None else show_progress
        self.dist = None  # set in run(): a safesteer.distributed.Dist under torchrun with run.distributed

    @property
    def is_writer(self) -> bool:
        return self.dist is None or self.dist.is_writer

    def context(self) -> Context:
        return Context(
            config=self.cfg,
            seed=self.cfg.run.seed,
            device=self.device,
            data_dir=self.data_dir,
            say=_say,
            show_progress=self.show_progress and self.is_writer,
            dist=self.dist,
        )

    def _stage(self, spec: StageSpec, cache: StageCache, ctx: Context) -> None:
        st = cache.stage(spec.name, stage_params(spec, self.cfg), {k: self.st[k].key for k in spec.inputs})
        self.st[spec.name] = st
        if st.done:
            self.status[spec.name] = "cached"
            self.outputs[spec.name] = load_outputs(spec.outputs, st.info()["outputs"], self.out)
            _say(f"{spec.name}: cached ({st.dir.name})")
            return
        if self.only is not None and spec.name not in self.only:
            self.status[spec.name] = "skipped"
            _say(f"{spec.name}: skipped (not in --stages and no finished output for these settings)")
            return
        missing = [k for k in spec.inputs if not self.st[k].done]
        if missing:
            raise SafesteerError(
                f"stage {spec.name} needs {missing[0]}, which has no finished output for these "
                f"settings; include {missing[0]} in --stages"
            )
        if self.is_writer:
            _say(f"{spec.name}: running -> {st.dir}")
        t0 = time.perf_counter()
        if self.dist is not None and self.dist.enabled and not spec.ranks:
            # a one-process stage: rank 0 runs it, the other ranks read its outputs after the barrier
            outputs = None
            if self.dist.is_writer:
                outputs = spec.run(
                    spec.section_of(self.cfg), {k: self.outputs[k] for k in spec.inputs}, st.dir, ctx
                )
                st.mark_done(
                    seconds=round(time.perf_counter() - t0, 2), outputs=dump_outputs(outputs, self.out)
                )
            self.dist.barrier(f"stage {spec.name}")
            if outputs is None:
                outputs = load_outputs(spec.outputs, st.info()["outputs"], self.out)
        else:
            outputs = spec.run(
                spec.section_of(self.cfg), {k: self.outputs[k] for k in spec.inputs}, st.dir, ctx
            )
            if self.is_writer:
                st.mark_done(
                    seconds=round(time.perf_counter() - t0, 2), outputs=dump_outputs(outputs, self.out)
                )
            if self.dist is not None:
                self.dist.barrier(f"stage {spec.name}")
        seconds = time.perf_counter() - t0
        self.timings[spec.name] = seconds
        self.status[spec.name] = "ran"
        self.outputs[spec.name] = outputs

    def run(self) -> Path | None:
        world = env_world_size()
        if world > 1 and not self.cfg.run.distributed:
            raise SafesteerError(
                f"WORLD_SIZE={world} (torchrun) but run.distributed is false; set [run] distributed = true "
                "or launch one process"
            )
        if self.cfg.run.distributed and world > 1:
            self.dist = from_env(self.device)
            self.dist.agree(
                {"config": self.cfg.to_dict(), "out": str(self.out.resolve())}, "the run configuration"
            )
            if (
                not self.dist.is_writer
            ):  # rank 0 holds the run lock and writes the report; the others follow it
                self._run()
                return None
        with RunLock(self.out):
            return self._run()

    def _run(self) -> Path | None:
        cache = StageCache(self.out)
        if self.is_writer:
            with atomic_path(self.out / layout.CONFIG) as tmp:
                tmp.write_text(dump_toml(self.cfg))
        t_start = time.perf_counter()
        ctx = self.context()
        for spec in TABLE:
            self._stage(spec, cache, ctx)
        self.timings["total"] = time.perf_counter() - t_start
        unfinished = [s.name for s in TABLE if not self.st[s.name].done]
        if not self.is_writer:
            return None
        if unfinished:
            if self.only is not None and "report" in self.only:
                raise SafesteerError(
                    f"the report needs {unfinished[0]}, which has no finished output for these "
                    "settings; include it in --stages"
                )
            _say(f"stopped before {unfinished[0]} (--stages); no report until every stage has finished")
            return None

        if "behaviour" in self.outputs:
            publish(self.outputs["behaviour"].policy, self.out)
        return build_report(self)
