"""Extraction: correctness vs the backbone, resume, kill -9 byte-identity, validation and purge."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _extract_worker import Rec, corpus

from safesteer.errors import SafesteerError
from safesteer.extract import ExtractConfig, Extractor, extract
from safesteer.store import ActivationStore, is_validation_id
from safesteer.store.validate import validate

HERE = Path(__file__).parent


def _cfg(**kw):
    base = dict(
        model="tiny",
        datasets=["synthetic"],
        layers=[1],
        shard_size=50,
        dtype="float32",
        batch_size=8,
        precision="fp32",
    )
    base.update(kw)
    return ExtractConfig(**base)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_extracted_rows_equal_backbone_pooled(tiny_backbone, tmp_path):
    rows = list(corpus(120))
    rep = extract(tiny_backbone, rows, tmp_path, _cfg(layers=[0, 1]), progress=False)
    texts = [r.text for _, r in rows if r.text.strip()]
    assert rep.rows == len(texts) and rep.empty_skipped == 120 - len(texts)
    for layer in (0, 1):
        store = ActivationStore(tmp_path / f"layer-{layer}")
        got = store.load_all()
        ref = tiny_backbone.pooled(texts, [layer], batch_size=7)[layer]
        np.testing.assert_allclose(got.H, ref, atol=1e-5, rtol=1e-4)
        assert list(got.ids) == [r.id for _, r in rows if r.text.strip()]
        assert set(got.labels.columns) >= {"toxic", "score", "dataset"}
        np.testing.assert_array_equal(
            got.labels["toxic"].to_numpy(), [int(i.split(":")[1]) % 2 for i in got.ids]
        )


def test_length_bucketing_order_is_a_permutation_sorted_in_windows(tiny_llama):
    ex = Extractor(tiny_llama, [0], bucket_window=4)
    lengths = [5, 1, 4, 2, 9, 3, 3, 0, 7]
    order = ex.order(lengths)
    assert sorted(order.tolist()) == list(range(len(lengths)))
    for start in range(0, len(lengths), 4):
        window = [lengths[i] for i in order[start : start + 4]]
        assert window == sorted(window) and set(order[start : start + 4]) == set(
            range(start, min(start + 4, len(lengths)))
        )


def test_resume_skips_finished_shards_and_refuses_other_runs(tiny_llama, tmp_path):
    rows = list(corpus(130))
    first = extract(tiny_llama, rows, tmp_path, _cfg(), progress=False)
    before = _files(tmp_path)
    again = extract(tiny_llama, rows, tmp_path, _cfg(), progress=False)
    assert again.shards_done == 0 and again.shards_skipped == first.shards_done
    assert _files(tmp_path) == before
    with pytest.raises(SafesteerError, match="different run.*--overwrite"):
        extract(tiny_llama, rows, tmp_path, _cfg(dtype="float16"), progress=False)
    rep = extract(tiny_llama, rows, tmp_path, _cfg(dtype="float16"), overwrite=True, progress=False)
    assert rep.shards_done == first.shards_done
    assert ActivationStore(tmp_path).dtype == np.float16


def test_nan_activations_refused_naming_rows(tiny_llama, tmp_path):

    rows = list(corpus(20))
    with tiny_llama.steer(1, edit=lambda h: h * float("nan")):
        with pytest.raises(SafesteerError, match="NaN/Inf.*syn:"):
            extract(tiny_llama, rows, tmp_path, _cfg(), progress=False)
    assert not list((tmp_path / "layer-1").glob("shard-*.npy"))


def test_layer_out_of_range(tiny_llama, tmp_path):
    with pytest.raises(SafesteerError, match="out of range"):
        extract(tiny_llama, corpus(5), tmp_path, _cfg(layers=[7]), progress=False)


def test_reader_splits_and_shuffles(tiny_llama, tmp_path):
    extract(tiny_llama, corpus(300), tmp_path, _cfg(), progress=False)
    store = ActivationStore(tmp_path)
    full = store.load_all()
    train = np.concatenate([b.ids for b in store.iter_batches(32, split="train")])
    val = np.concatenate([b.ids for b in store.iter_batches(32, split="val", val_fraction=0.05)])
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(full.ids)
    assert np.array_equal(is_validation_id(val, 0.05), np.ones(len(val), bool))
    a = [b.ids for b in store.iter_batches(32, shuffle_buffer=100, seed=3)]
    b = [b.ids for b in store.iter_batches(32, shuffle_buffer=100, seed=3)]
    c = np.concatenate([b.ids for b in store.iter_batches(32, shuffle_buffer=100, seed=4)])
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sorted(np.concatenate(a)) == sorted(full.ids) and not np.array_equal(np.concatenate(a), c)
    # H rows follow their ids through shuffling
    lookup = {i: k for k, i in enumerate(full.ids)}
    batch = next(store.iter_batches(32, shuffle_buffer=100, seed=3))
    np.testing.assert_array_equal(batch.H, full.H[[lookup[i] for i in batch.ids]])


def test_validate_detects_and_purge_repairs(tiny_llama, tmp_path):
    rows = list(corpus(260))
    extract(tiny_llama, rows, tmp_path, _cfg(), progress=False)
    good = _files(tmp_path)
    layer = tmp_path / "layer-1"
    problems, checked = validate(tmp_path)
    assert problems == [] and checked == len(ActivationStore(tmp_path).shards) >= 5
    shard = layer / "shard-00002.npy"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    trunc = layer / "shard-00004.npy"
    trunc.write_bytes(trunc.read_bytes()[:-100])
    problems, _ = validate(tmp_path)
    names = {p.file for p in problems}
    assert {"shard-00002.npy", "shard-00004.npy"} <= names
    validate(tmp_path, purge=True)
    assert not shard.exists() and not trunc.exists()
    assert validate(tmp_path)[0] == []
    rep = extract(tiny_llama, rows, tmp_path, _cfg(), progress=False)
    assert rep.shards_done == 2
    assert _files(tmp_path) == good


def test_validate_cli_exit_codes(tiny_llama, tmp_path):
    from safesteer.cli.main import main

    extract(tiny_llama, corpus(60), tmp_path, _cfg(), progress=False)
    assert main(["validate", str(tmp_path)]) == 0
    (tmp_path / "layer-1" / "ids-00000.npy").write_bytes(b"garbage")
    assert main(["validate", str(tmp_path)]) == 1
    assert main(["validate", str(tmp_path / "nothing")]) == 2


@pytest.mark.parametrize("dtype,kind", [("float32", "causal"), ("float16", "masked")])
def test_kill9_and_resume_is_byte_identical(tmp_path, dtype, kind):
    n = 3000
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)])}
    cmd = [sys.executable, str(HERE / "_extract_worker.py")]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(cmd + [str(ref), str(n), dtype, kind], check=True, env=env)
    rng = random.Random(7)
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen(cmd + [str(killed), str(n), dtype, kind], env=env)
        time.sleep(rng.uniform(1.5, 4.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    subprocess.run(cmd + [str(killed), str(n), dtype, kind], check=True, env=env)
    assert kills >= 1
    a, b = _files(ref), {k: v for k, v in _files(killed).items() if not Path(k).name.startswith(".")}
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def test_text_labels_survive_mixed_dataset_shards(tiny_llama, tmp_path):
    rows = [
        ("a", Rec(id="a:0", text="the man is good", labels={"target_group": "women", "toxic": 1})),
        ("b", Rec(id="b:0", text="you are kind", labels={"joy": 1})),
        ("a", Rec(id="a:1", text="she is bad", labels={"target_group": "black", "toxic": 0})),
    ]
    extract(tiny_llama, rows, tmp_path, _cfg(), progress=False)
    lab = ActivationStore(tmp_path).load_all().labels
    assert lab["target_group"].tolist()[0] == "women" and lab["target_group"].tolist()[2] == "black"
    assert lab["target_group"].isna().tolist() == [False, True, False]
    assert lab["toxic"].tolist()[0] == 1.0 and np.isnan(lab["toxic"].tolist()[1])
