"""The mutation report: counts per module, the sampled-score interval, the seeded sample of names."""

import json

import pytest
from scipy.stats import binomtest

from safesteer.bench.mutants import main, sample, summarise, wilson


def _meta(root, rel, codes):
    path = root / f"{rel}.meta"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"exit_code_by_key": codes}))


@pytest.mark.parametrize(("k", "n"), [(8, 10), (0, 7), (37, 37), (50, 53), (1, 1)])
def test_wilson_interval_equals_scipys(k, n):
    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(k, n) == pytest.approx((ref.low, ref.high), abs=1e-12)


def test_summary_counts_each_status_and_scores_checked_mutants_only(tmp_path):
    _meta(
        tmp_path,
        "src/safesteer/a.py",
        {"a.x__mutmut_1": 1, "a.x__mutmut_2": 0, "a.x__mutmut_3": 36, "a.y__mutmut_1": 33},
    )
    _meta(
        tmp_path,
        "src/safesteer/b.py",
        {"b.f__mutmut_1": 1, "b.f__mutmut_2": None, "b.f__mutmut_3": None, "b.f__mutmut_4": 0},
    )
    text = summarise(str(tmp_path))
    # a: 2 caught (killed + timeout) of 3 checked; the "no tests" one is not in the score
    assert "| safesteer/a.py | 4 | 1 | 1 | 1 | 1 | 0 | 66.7% |" in text
    # b: checked in part -> the score carries its Wilson interval and the sample size
    lo, hi = wilson(1, 2)
    assert (
        f"| safesteer/b.py | 4 | 1 | 1 | 0 | 0 | 2 | 50.0% [{100 * lo:.0f}, {100 * hi:.0f}] (sample of 2) |"
        in text
    )
    _meta(tmp_path, "src/safesteer/c.py", {"c.h__mutmut_1": None})
    text = summarise(str(tmp_path))
    assert "safesteer/c.py |" not in text and "Not checked in this run: safesteer/c.py." in text
    assert "## Survivors (2)" in text and "- `a.x__mutmut_2`" in text and "- `b.f__mutmut_4`" in text


def test_sample_is_seeded_capped_per_module_and_filtered(tmp_path):
    _meta(tmp_path, "src/safesteer/a.py", {f"a.f__mutmut_{i}": None for i in range(1, 40)})
    _meta(tmp_path, "src/safesteer/b.py", {f"b.g__mutmut_{i}": None for i in range(1, 4)})
    s0 = sample(str(tmp_path), 10, seed=0)
    assert len(s0) == 13 and len(set(s0)) == 13  # 10 of a, all 3 of b
    assert s0 == sample(str(tmp_path), 10, seed=0)
    assert s0 != sample(str(tmp_path), 10, seed=1)
    assert sample(str(tmp_path), 10, seed=0, modules=["b.py"]) == sorted(
        sample(str(tmp_path), 10, seed=0, modules=["b.py"]), key=lambda n: s0.index(n)
    )
    assert set(sample(str(tmp_path), 10, modules=["b.py"])) == {
        "b.g__mutmut_1",
        "b.g__mutmut_2",
        "b.g__mutmut_3",
    }
    # a larger sample contains the smaller one (the ranking does not depend on n)
    assert set(sample(str(tmp_path), 5)) <= set(s0)


def test_no_mutants_folder_is_one_line_and_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "none")]) == 2
    assert main(["sample", "5", "--root", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("mutmut" in line for line in err)
