"""Tests for longbench.py: official metrics on hand-computed cases, prompts, truncation,
data loading errors, prompts, the download, and which samples calibrate and which evaluate."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import longbench as lb  # noqa: E402
import longbench_metrics as lbm  # noqa: E402

SHARED = ROOT.parent / "shared" / "longbench"


# ----------------------------------------------------------------------------- QA F1

@pytest.mark.parametrize("raw, norm", [
    ("The Cat.", "cat"),                       # case, article, punctuation
    ("  an   apple,a pear  ", "applea pear"),   # ',' goes first, so "apple,a" is one token
    ("Theater", "theater"),                    # article only as a whole word
    ("the,the", "thethe"),                     # punctuation goes before articles
    ("A!", ""),
    ("Mr. O'Neil's 3-D\tmovie\n", "mr oneils 3d movie"),
])
def test_normalize_answer(raw, norm):
    assert lbm.normalize_answer(raw) == norm


def test_qa_f1_exact_and_partial():
    assert lbm.qa_f1_score("The Eiffel Tower!", "eiffel tower") == 1.0
    # pred tokens [eiffel, tower, paris], gold [eiffel, tower]: p=2/3, r=1, F1=0.8
    assert lbm.qa_f1_score("Eiffel Tower, Paris", "the Eiffel Tower") == pytest.approx(0.8)
    # bag overlap counts repeats: pred [x, x, y], gold [x, y, y]: common 2, p=r=2/3
    assert lbm.qa_f1_score("x x y", "x y y") == pytest.approx(2 / 3)
    assert lbm.qa_f1_score("nothing", "else") == 0.0
    assert lbm.qa_f1_score("", "") == 0.0  # no common tokens -> 0 even when both empty
    assert lbm.qa_f1_score("The", "a") == 0.0


# ----------------------------------------------------------------------------- ROUGE-L

def test_rouge_l_hand_computed():
    # LCS("police arrested the suspect", "the police quickly arrested a suspect")
    # = police arrested suspect = 3; P = 3/4, R = 3/6, F = 2PR/(P+R) = 0.6
    assert lbm.rouge_score("police arrested the suspect",
                          "the police quickly arrested a suspect") == pytest.approx(0.6, abs=1e-6)
    assert lbm.rouge_score("a b c", "a b c") == pytest.approx(1.0, abs=1e-6)


def test_rouge_empty_is_zero():
    assert lbm.rouge_score("", "some reference") == 0.0
    assert lbm.rouge_score("...", "some reference") == 0.0  # only '.', no sentence left


# ----------------------------------------------------------------------------- classification

TREC = ["Food", "Date", "Description", "Description of something", "City"]


def test_classification_basic():
    assert lbm.classification_score("City", "City", all_classes=TREC) == 1.0
    assert lbm.classification_score("Food or City", "City", all_classes=TREC) == 0.5
    assert lbm.classification_score("Food", "City", all_classes=TREC) == 0.0
    assert lbm.classification_score("no idea", "City", all_classes=TREC) == 0.0


def test_classification_substring_classes():
    # "Description" is found inside the answer but is a proper substring of the gold -> dropped
    assert lbm.classification_score("Description of something", "Description of something",
                                   all_classes=TREC) == 1.0
    # gold "Description": the longer class is not a substring of the gold, so both stay
    assert lbm.classification_score("Description of something", "Description",
                                   all_classes=TREC) == 0.5


def test_classification_official_removal_quirk():
    # official removes while iterating, which skips the element after a removed one:
    # matches [A, AB, ABC] -> remove A, skip AB, keep ABC -> [AB, ABC] -> 1/2
    assert lbm.classification_score("ABC", "ABC", all_classes=["A", "AB", "ABC"]) == 0.5


# ----------------------------------------------------------------------------- retrieval / count

def test_retrieval_score():
    assert lbm.retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    assert lbm.retrieval_score("Paragraph 3 or Paragraph 12", "Paragraph 12") == 0.5
    assert lbm.retrieval_score("Paragraph 1", "Paragraph 12") == 0.0  # whole numbers compared
    assert lbm.retrieval_score("I do not know", "Paragraph 12") == 0.0


def test_count_score():
    assert lbm.count_score("10", "10") == 1.0
    assert lbm.count_score("There are 10 unique paragraphs out of 12.", "10") == 0.5
    assert lbm.count_score("ten", "10") == 0.0


# ----------------------------------------------------------------------------- code sim

def test_code_sim_first_code_line():
    pred = "\n```python\n# the next line\nx = foo(1)\ny = 2\n```"
    assert lbm.code_sim_score(pred, "x = foo(1)") == 1.0
    assert lbm.code_sim_score("// c comment\nint a = 1;", "int a = 1;") == 1.0
    assert lbm.code_sim_score("x = 1  # note\nx = 1", "x = 1") == 1.0  # line with '#' skipped
    # difflib ratio: "abcd" vs "abce" -> 3 matching chars of 8 -> 2*3/8 = 0.75
    assert lbm.code_sim_score("abcd", "abce") == 0.75
    assert lbm.code_sim_score("# only a comment", "x = 1") == 0.0


# ----------------------------------------------------------------------------- score_task

def test_score_task_max_over_answers_and_first_line():
    # triviaqa keeps the first line only: the second line's correct answer must not count
    assert lbm.score_task("triviaqa", ["\nParis\nLondon"], [["London"]], None) == 0.0
    assert lbm.score_task("triviaqa", ["\nLondon\nParis"], [["Paris", "London"]], None) == 100.0
    # hotpotqa scores the whole output; mean over samples
    s = lbm.score_task("hotpotqa", ["Paris\nLondon", "x"], [["London"], ["y"]], None)
    assert s == pytest.approx(100 * (2 * 0.5 * 1 / 1.5) / 2)
    assert lbm.score_task("trec", ["City\nFood"], [["City"]], TREC) == 100.0
    with pytest.raises(ValueError):
        lbm.score_task("nope", ["a"], [["a"]], None)


def test_metric_table():
    assert set(lbm.DATASET2METRIC) == set(lb.ENGLISH_TASKS)
    assert len(lb.ENGLISH_TASKS) == 16


# ----------------------------------------------------------------------------- prompts

def test_build_prompt_official_template():
    path = SHARED / "config" / "dataset2prompt.json"
    if not path.is_file():
        pytest.skip("no shared LongBench config")
    tpl = json.loads(path.read_text())["multifieldqa_en"]
    sample = {"context": "CTX {not a field}", "input": "Q?", "answers": ["a"], "_id": "x"}
    p = lb.build_prompt(sample, tpl)
    assert p.startswith("Read the following text and answer briefly.\n\nCTX {not a field}\n\n")
    assert p.endswith("Question: Q?\nAnswer:")
    assert lb.build_prompt({"context": "C", "input": "I"}, "{context}|{input}") == "C|I"


def test_truncate_middle():
    ids = list(range(100))
    assert lb.truncate_middle(ids, 100) == ids
    assert lb.truncate_middle(ids, 10) == [0, 1, 2, 3, 4, 95, 96, 97, 98, 99]
    out = lb.truncate_middle(ids, 11)  # official: half = int(11/2) = 5, so 10 tokens kept
    assert out == [0, 1, 2, 3, 4, 95, 96, 97, 98, 99]
    assert lb.truncate_middle(ids, 1) == []


def test_chat_template_exceptions():
    assert lb.NO_CHAT_TASKS == {"trec", "triviaqa", "samsum", "lcc", "repobench-p"}
    assert lbm.FIRST_LINE_TASKS == {"trec", "triviaqa", "samsum"}
    assert not lb.use_chat_template("lcc") and lb.use_chat_template("hotpotqa")


# ----------------------------------------------------------------------------- data loading

def _row(**kw):
    row = {"input": "q", "context": "c", "answers": ["a"], "length": 1, "dataset": "qasper",
           "language": "en", "all_classes": None, "_id": "id0"}
    row.update(kw)
    return json.dumps(row)


def test_load_task_ok_and_errors(tmp_path):
    f = tmp_path / "qasper.jsonl"
    f.write_text(_row() + "\n\n" + _row(_id="id1") + "\n")
    assert [s["_id"] for s in lb.load_task(tmp_path, "qasper")] == ["id0", "id1"]
    f.write_text(_row() + "\n" + '{"input": "q", broken\n')
    with pytest.raises(ValueError, match=r"qasper\.jsonl:2: malformed JSON"):
        lb.load_task(tmp_path, "qasper")
    row = json.loads(_row())
    del row["answers"]
    f.write_text(_row() + "\n" + _row() + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"qasper\.jsonl:3: missing required key 'answers'"):
        lb.load_task(tmp_path, "qasper")
    with pytest.raises(ValueError, match="valid: narrativeqa, qasper"):
        lb.load_task(tmp_path, "qasper_zh")


def test_find_data_dir_and_config(tmp_path, monkeypatch):
    monkeypatch.delenv("LONGBENCH_DIR", raising=False)
    assert lb.find_data_dir(None, tmp_path) is None
    d = tmp_path / "data" / "LongBench"
    d.mkdir(parents=True)
    (d / "trec.jsonl").write_text(_row() + "\n")
    assert lb.find_data_dir(None, tmp_path) == d
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        lb.find_data_dir(str(tmp_path / "missing"), tmp_path)
    monkeypatch.setenv("LONGBENCH_DIR", str(d))
    assert lb.find_data_dir(None, tmp_path / "elsewhere") == d
    with pytest.raises(FileNotFoundError) as e:
        lb.load_config(d)
    msg = str(e.value)
    assert "dataset2prompt.json" in msg and str(d / "config") in msg
    (d / "config").mkdir()
    (d / "config" / "dataset2prompt.json").write_text('{"trec": "{context}"}')
    (d / "dataset2maxlen.json").write_text('{"trec": 64}')
    assert lb.load_config(d) == ({"trec": "{context}"}, {"trec": 64})


def test_shared_data_loads():
    if not SHARED.is_dir():
        pytest.skip("no shared LongBench data")
    prompts, maxlens = lb.load_config(SHARED)
    for task in lb.available_tasks(SHARED):
        samples = lb.load_task(SHARED, task)
        assert samples and all(isinstance(s["answers"], list) for s in samples)
        assert task in prompts and task in maxlens
        lb.build_prompt(samples[0], prompts[task])


# ----------------------------------------------------------------------------- split

def tasks_of(n_per_task: dict[str, int]) -> dict[str, list[dict]]:
    """Samples by task in file order, ids <task>-<i>."""
    return {t: [{"_id": f"{t}-{i}", "dataset": t} for i in range(n)] for t, n in n_per_task.items()}


def test_split_disjoint_deterministic():
    samples = tasks_of({"a": 5, "b": 5, "c": 5, "d": 5})
    calib, ev = lb.dataset_split(samples, 2, seed=3)
    assert len(calib) == 8 and len(ev) == 12 and not set(calib) & set(ev)
    assert (calib, ev) == lb.dataset_split(samples, 2, seed=3)
    shuffled = {t: list(reversed(ss)) for t, ss in samples.items()}
    assert lb.dataset_split(shuffled, 2, seed=3) == (calib, ev)  # file order does not matter
    assert lb.dataset_split(samples, 2, seed=4) != (calib, ev)
    c_all, e_all = lb.dataset_split(samples, 99, seed=0)
    assert len(e_all) == 4  # every task keeps one evaluation sample


def test_evaluation_and_calibration_samples_never_meet():
    samples = tasks_of({"a": 9, "b": 3, "c": 1})
    reserve = lb.reserved_ids(samples)
    assert reserve == set(lb.dataset_split(samples, 2, 0)[0]) and len(reserve) == 2 + 2 + 0
    first2 = lb.evaluation_samples(samples, 2, set())
    # per task, file order, outside the reserve: the first two (c has one sample: it is evaluated)
    assert [s["_id"] for s in first2] == [i for t in "abc" for i in [s["_id"] for s in samples[t]
                                                                    if s["_id"] not in reserve][:2]]
    pool = lb.calibration_pool(samples)
    pool_ids = {s["_id"] for ss in pool.values() for s in ss}
    assert not pool_ids & {s["_id"] for s in first2} and pool_ids | {s["_id"] for s in first2} == \
        {s["_id"] for ss in samples.values() for s in ss}
    # a plan calibrated on pool samples changes nothing about the standard evaluation ...
    assert lb.evaluation_samples(samples, 2, pool_ids) == first2
    # ... and everything else it touched is never evaluated, even with --limit 0
    assert not {s["_id"] for s in lb.evaluation_samples(samples, 0, pool_ids)} & pool_ids


def test_draw_is_round_robin_nested_and_disjoint_from_validation():
    pool = tasks_of({"a": 6, "b": 2, "c": 4})
    validation = lb.draw(pool, 3)
    assert sorted(s["dataset"] for s in validation) == ["a", "b", "c"]  # one per task first
    rest = lb.without(pool, validation)
    small, large = lb.draw(rest, 4), lb.draw(rest, 8)
    assert large[:4] == small and not {s["_id"] for s in large} & {s["_id"] for s in validation}
    assert [s["dataset"] for s in large] == ["a", "b", "c", "a", "c", "a", "c", "a"]  # b runs out
    with pytest.raises(ValueError, match="holds 9 samples, fewer than the 10 asked for"):
        lb.draw(rest, 10)


def test_prompt_ids_split_context_and_question(smollm2):
    _, tok = smollm2
    sample = {"input": "What is the river called?", "context": "The river is called Elbe. " * 300, "dataset": "hotpotqa",
              "_id": "x", "template": "Read.\n{context}\n\nQuestion: {input}\nAnswer:"}
    for max_length in (4000, 500):  # whole, and middle-truncated
        ids, n_context = lb.prompt_ids(tok, sample, max_length)
        question = tok.decode(ids[n_context:])
        # a token straddling the boundary counts as context: here " \n" takes one of the newlines
        assert question.startswith("\nQuestion: What is the river called?\nAnswer:")
        assert question.endswith("assistant\n") and "Elbe" not in question
        assert "Elbe" in tok.decode(ids[n_context - 8:n_context])  # the context runs up to the question
    raw = dict(sample, dataset="trec", template="{context}\n{input}")
    ids, n_context = lb.prompt_ids(tok, raw, 500)
    assert tok.decode(ids[n_context:]) == "\nWhat is the river called?"
    assert ids == tok.encode(tok.decode(ids[:250]) + tok.decode(ids[250:])).ids  # one-piece encoding, as before


def test_install_zip_checks_the_sha256_and_extracts_the_english_tasks(tmp_path):
    import hashlib
    import zipfile
    z = tmp_path / "data.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("data/trec.jsonl", _row(dataset="trec") + "\n")
        f.writestr("data/lsht.jsonl", "{}\n")  # Chinese: not extracted
    digest = hashlib.sha256(z.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="does not match the published"):
        lb.install_zip(z, "0" * 64, tmp_path / "LongBench")
    with pytest.raises(FileNotFoundError, match="put dataset2prompt.json and dataset2maxlen.json .* into"):
        lb.install_zip(z, digest, tmp_path / "LongBench")
    assert (tmp_path / "LongBench" / "trec.jsonl").is_file() and not (tmp_path / "LongBench" / "lsht.jsonl").exists()
    with zipfile.ZipFile(z, "a") as f:  # a zip that carries the configs is complete
        f.writestr("config/dataset2prompt.json", '{"trec": "{context}\\n{input}"}')
        f.writestr("config/dataset2maxlen.json", '{"trec": 64}')
    digest = hashlib.sha256(z.read_bytes()).hexdigest()
    d = lb.install_zip(z, digest, tmp_path / "LongBench")
    assert lb.find_data_dir(str(d), tmp_path) == d and list(lb.load_samples(d)) == ["trec"]


def test_download_uses_the_hub_and_falls_back_without_a_network(tmp_path, monkeypatch):
    import huggingface_hub
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, repo_type: calls.append((repo, name)) or "z")
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda url: type("M", (), {"etag": '"abc"'}))
    monkeypatch.setattr(lb, "install_zip", lambda path, sha, dest: (path, sha, dest))
    assert lb.download(tmp_path) == (Path("z"), "abc", tmp_path) and calls == [("THUDM/LongBench", "data.zip")]
    monkeypatch.delenv("LONGBENCH_DIR", raising=False)
    monkeypatch.setattr(lb, "online", lambda: False)
    assert lb.find_or_download(None, tmp_path) == (None, "no LongBench folder and no network: running RULER "
                                                         "(generated offline) instead")


def test_check_disjoint_and_duplicates():
    lb.check_disjoint(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="2 sample id.*: a, b"):
        lb.check_disjoint(["a", "b", "x"], ["b", "a"])
    with pytest.raises(ValueError, match="duplicate _id"):
        lb.dataset_split({"t": [{"_id": "a"}, {"_id": "a"}]}, 1)
