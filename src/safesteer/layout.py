"""Names of the files and folders each pipeline stage writes inside its stage folder (one place).

On the ground floor: every stage module, the runner, the report and the tests import their names from here.
"""

from __future__ import annotations

DONE = "DONE.json"  # written last: the stage finished (also holds its typed outputs and timings)
PARAMS = "params.json"  # the settings and input keys the stage folder belongs to
LOCK = ".lock"  # one process per run folder
CONFIG = "config.toml"
RUN_SUMMARY = "run_summary.json"

# extract
ACTS = "acts"  # activation store root; one layer-<L>/ folder per layer


def layer_folder(layer: int) -> str:
    return f"layer-{layer}"


# sae
SAE = "sae"  # the selected SAE (cfg.json + sae_weights.safetensors)
GRID_RESULTS = "grid_results.json"
# encode
LATENTS = "z"
# probes
PROBE_METRICS = "probe_metrics.json"
# map
ATOM_MAP = "atom_map.parquet"
TOP_ACTIVATIONS = "top_activations.parquet"
PROBE_ATOM_CORR = "probe_atom_corr.parquet"
MAP_SUMMARY = "summary.json"
LINK = "link.json"
STATS = "stats"
STATS_HELDOUT = "stats_heldout"
# atoms
SELECTION = "selection.json"
TOPK_DIR, TOPK_CSV = "topk", "atoms_topk.csv"
ALL_POSITIVE_DIR, ALL_POSITIVE_CSV = "all_positive", "atoms_all_positive.csv"
FILTERED_DIR, FILTERED_CSV = "filtered", "final_steering_atoms.csv"
CANDIDATES_CSV = "candidates.csv"
FLAGGED_CSV = "flagged_atoms.csv"
ATOM_CARDS = "atom_cards.json"
# directions
DIRECTIONS_JSON = "directions.json"
# evaluate
RESULTS_CSV = "results.csv"
# behaviour (the study's own files: safesteer.behaviour)
SUMMARY = "summary.json"  # every figure of the study (wall-clock seconds apart)
TIMINGS = "timings.json"  # the study's wall-clock seconds per step
POLICY_DIR = "policy"  # the service bundle: recommended.json (or NONE.txt), gate/, directions/
PARETO_CSV = "pareto.csv"  # every validation candidate policy
ANSWERS_CSV = "answers.csv"  # every test answer, per set and policy, with its refusal verdict
GATE_SCORES_CSV = "gate_scores.csv"  # every prompt's gate score (the report's ROC)
FEATURES_DIR = "features"  # pooled activations of every prompt, per position and layer, + prompts.csv
GATE_DIR = "gate"
DIRECTIONS_DIR = "directions"
STEPS_DIR = "steps"  # each study step's cached output (resume)
