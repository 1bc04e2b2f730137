"""Label specs: frames → 1/0/NaN, records, named specs, drawing texts from the offline data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from safesteer.errors import SafesteerError
from safesteer.probes.labels import GO_EMOTIONS, collect_texts, get_spec, spec_names, specs_for_frame


def _frame():
    return pd.DataFrame(
        [
            {"dataset": "toxigen", "toxic": 1, "target_group": "women"},
            {"dataset": "toxigen", "toxic": 0, "target_group": "black"},
            {"dataset": "realtoxicityprompts", "toxic": 1, "insult": 0.9},
            {"dataset": "realtoxicityprompts", "toxic": 0, "insult": np.nan},  # unscored: outside toxicity
            {"dataset": "go_emotions", "joy": 1, "neutral": 0},
            {"dataset": "go_emotions", "joy": 0, "neutral": 1},
            {"dataset": "advbench", "harmful": 1},
            {"dataset": "donotanswer", "harmful": 1},
            {"dataset": "xstest", "unsafe": 0},
            {"dataset": "xstest", "unsafe": 1},
            {"dataset": "hh_rlhf_harmless", "chosen": 1},
            {"dataset": "hh_rlhf_harmless", "chosen": 0},
            {"dataset": "empathetic_dialogues", "emotion": "afraid", "afraid": 1, "proud": 0},
            {"dataset": "empathetic_dialogues", "emotion": "proud", "afraid": 0, "proud": 1},
        ]
    )


def _nan_eq(a, b):
    np.testing.assert_array_equal(np.nan_to_num(a, nan=-1), np.nan_to_num(np.asarray(b, float), nan=-1))


def test_toxicity_and_harmfulness_from_frame():
    df = _frame()
    n = np.nan
    _nan_eq(get_spec("toxicity").y_from_frame(df), [1, 0, 1, n, 0, 0, n, n, n, n, n, n, n, n])
    _nan_eq(get_spec("harmfulness").y_from_frame(df), [n, n, n, n, n, n, 1, 1, 0, n, 0, n, n, n])


def test_granular_specs():
    df = _frame()
    n = np.nan
    _nan_eq(get_spec("emotion:joy").y_from_frame(df), [n] * 4 + [1, 0] + [n] * 8)
    _nan_eq(get_spec("empathy:afraid").y_from_frame(df), [n] * 12 + [1, 0])
    _nan_eq(get_spec("identity:women").y_from_frame(df), [1, 0] + [n] * 12)
    _nan_eq(get_spec("rtp:insult").y_from_frame(df), [n, n, 1] + [n] * 11)  # NaN score is outside both sides
    assert get_spec("harmfulness").category == "harm" and get_spec("empathy:afraid").category == "empathy"
    assert len(spec_names("emotion")) == len(GO_EMOTIONS) == 28


def test_record_matching_agrees_with_frame():
    df = _frame()
    spec = get_spec("toxicity")
    rows = [
        spec.y_from_record(
            r.pop("dataset"), {k: v for k, v in r.items() if not (isinstance(v, float) and np.isnan(v))}
        )
        for r in df.to_dict("records")
    ]
    _nan_eq(rows, spec.y_from_frame(_frame()))


def test_specs_for_frame_filters_and_discovers_groups():
    df = _frame()
    ys = specs_for_frame(df)
    assert "toxicity" in ys and "harmfulness" in ys and "identity:women" in ys
    assert "emotion:anger" not in ys  # no positives
    assert "toxicity" not in specs_for_frame(df, min_per_class=3)
    extra = pd.concat(
        [df, pd.DataFrame([{"dataset": "toxigen", "toxic": 1, "target_group": "martians"}])],
        ignore_index=True,
    )
    assert "identity:martians" in specs_for_frame(extra)


def test_unknown_label():
    with pytest.raises(SafesteerError, match="unknown label"):
        get_spec("tox")


def test_collect_texts_from_offline_data(shared_data):
    lt = collect_texts("harmfulness", max_per_part=15, data_dir=shared_data, seed=1)
    assert len(lt) == 60 and sum(lt.y) == 30
    assert set(lt.dataset) == {"advbench", "donotanswer", "xstest", "hh_rlhf_harmless"}
    assert all(t for t in lt.texts) and set(lt.split) <= {"train", "test"}
    again = collect_texts("harmfulness", max_per_part=15, data_dir=shared_data, seed=1)
    assert again.ids == lt.ids
