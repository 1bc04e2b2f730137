"""Subprocess for tests/test_behaviour_study.py: the tiny behaviour stage, SIGKILLable mid-sweep.

``python tests/_study_worker.py MODEL_DIR DIRECTIONS DATA_DIR OUT DELAY [OVERRIDES]``: ``DELAY`` seconds
of sleep before each steered validation generation make the sweep slow enough to be killed in the
middle (the sleep changes nothing in the numbers); ``OVERRIDES``: a JSON object of [behaviour] settings
set after the tiny ones.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import safesteer.behaviour.sweep as steps
from safesteer.config import Config
from safesteer.pipeline.stages.behaviour import run_behaviour_stage
from safesteer.pipeline.table import Context

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_behaviour_section  # noqa: E402


def main(
    model_dir: str, directions: str, data_dir: str, out: str, delay: float, overrides: str = "{}"
) -> None:
    torch.set_num_threads(1)
    if delay:
        real = steps.generate

        def slow(*args, **kwargs):
            time.sleep(delay)
            return real(*args, **kwargs)

        steps.generate = slow
    cfg = Config()
    cfg.model.name, cfg.model.layer, cfg.model.max_length = model_dir, 1, 32
    tiny_behaviour_section(cfg.behaviour)
    for k, v in json.loads(overrides).items():
        setattr(cfg.behaviour, k, v)
    ctx = Context(config=cfg, seed=0, device="cpu", data_dir=Path(data_dir), say=lambda m: None)
    run_behaviour_stage(
        cfg.behaviour, {"directions": SimpleNamespace(directions=Path(directions))}, Path(out), ctx
    )


if __name__ == "__main__":
    main(*sys.argv[1:5], float(sys.argv[5]), *sys.argv[6:])
