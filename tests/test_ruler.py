"""Tests for ruler.py: each generation rule checked on the generated prompts themselves (with the
real SmolLM2 tokenizer), prompt lengths, the context/question split, RULER's metrics on constructed
predictions, and the protocol constants against the shared transcription of RULER's."""
import json
import math
import random
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoint as CK  # noqa: E402
import ruler as R  # noqa: E402
import ruler_tasks as RT  # noqa: E402

SPEC = Path(__file__).resolve().parents[2] / "shared" / "ruler" / "tasks.json"
NEEDLE_RE = re.compile(r"One of the special magic (numbers|uuids) for (.+?) is: ([0-9a-f-]+)\.")
NIAH_TASKS = [t for t in R.ALL_TASKS if t.startswith("niah")]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return CK.load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def suite(tok):
    """Three samples of every offline task and noise variant at 4096 tokens, generated once."""
    return {task: R.generate(task, 3, tok, 4096) for task in R.ALL_TASKS}


def context_of(sample: dict, header: str) -> str:
    """The haystack: from the end of the header (its last occurrence) to context_end."""
    text = sample["input"][:sample["context_end"]]
    return text[text.rindex(header) + len(header):]


# ----------------------------------------------------------------------------- 1. determinism

@pytest.mark.parametrize("task", ["niah_multikey_2", "vt", "cwe", "fwe"])
def test_generation_is_deterministic_per_seed(tok, task):
    a = R.generate(task, 3, tok, 1024, seed=0)
    assert a == R.generate(task, 3, tok, 1024, seed=0)
    assert a[:2] == R.generate(task, 2, tok, 1024, seed=0)  # a sample does not depend on how many follow it
    b = R.generate(task, 3, tok, 1024, seed=1)
    assert all(x["input"] != y["input"] and x["answers"] != y["answers"] for x, y in zip(a, b))
    assert len({s["input"] for s in a}) == 3
    assert [s["_id"] for s in a] == [f"ruler_{task}_1024_s0_{i}" for i in range(3)]
    assert [s["_id"] for s in b] == [f"ruler_{task}_1024_s1_{i}" for i in range(3)]


# ----------------------------------------------------------------------------- 2. niah

@pytest.mark.parametrize("task", NIAH_TASKS)
def test_niah_answers_are_the_queried_needles(suite, task):
    config = R.task_config(task)
    kind_v, n_values = config["type_needle_v"], config["num_needle_v"]
    singular = config["num_needle_q"] * n_values == 1
    for s in suite[task]:
        question = s["input"][s["context_end"]:]
        shown_v = kind_v[:-1] if singular else kind_v
        asked = re.fullmatch(rf"\nWhat (?:is|are all) the special magic {shown_v} for (.+) mentioned in the "
                             r"provided text\?", question).group(1)
        queries = asked.replace(", and ", ", ").split(", ") if config["num_needle_q"] > 1 else [asked]
        assert len(queries) == config["num_needle_q"] == len(set(queries))
        assert s["input"].startswith(f"A special magic {shown_v} is hidden" if singular
                                     else f"Some special magic {kind_v} are hidden")
        assert s["answer_prefix"] == (f" The special magic {shown_v} for {asked} mentioned in the provided text "
                                      + ("is" if singular else "are"))
        lines = context_of(s, "afterwards.\n").split("\n")
        needles = [NEEDLE_RE.fullmatch(line) for line in lines]
        haystack = config["type_haystack"]
        assert s["haystack"] == haystack
        if haystack == "noise":  # noise lines, and the task's needles
            assert all(line == RT.NOISE_SENTENCE for line, n in zip(lines, needles) if n is None)
            needles = [n for n in needles if n is not None]
            assert len(needles) == max(config["num_needle_k"], config["num_needle_q"]) * n_values
        else:  # every line is a needle: the task's and distractors
            assert None not in needles and len(needles) > 20
        assert all(n.group(1) == kind_v for n in needles)  # the needles keep the plural
        keys = Counter(n.group(2) for n in needles)
        assert all(keys[q] == n_values for q in queries)  # no other needle has a queried key
        expected = [n.group(3) for q in queries for n in needles if n.group(2) == q]
        assert sorted(s["answers"]) == sorted(expected) and len(s["answers"]) == len(queries) * n_values
        if config["num_needle_q"] > 1:  # one value per key, in the order of the question
            assert s["answers"] == expected
        for answer in s["answers"]:
            assert s["input"].count(answer) == 1
            assert re.fullmatch(r"\d{7}" if kind_v == "numbers" else r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-"
                                r"[89ab][0-9a-f]{3}-[0-9a-f]{12}", answer)


def test_niah_key_types(suite):
    adjectives, nouns = set(RT.wordlist("adjective")), set(RT.wordlist("noun"))
    for s in suite["niah_single_1"] + suite["niah_multikey_2"]:
        for key in (m.group(2) for m in NEEDLE_RE.finditer(s["input"])):
            assert any(key[:i] in adjectives and key[i + 1:] in nouns for i in range(len(key)) if key[i] == "-")
    for s in suite["niah_multikey_3"]:
        assert all(re.fullmatch(r"[0-9a-f-]{36}", m.group(2)) for m in NEEDLE_RE.finditer(s["input"]))


def test_word_keys_are_distinct_pairs():
    """Why one uniform pair is a uniform draw from RULER's deduplicated list: two pairs give one string
    only if adjective a2 = a + '-' + x and noun n = x + '-' + n2 (so a-n = a2-n2). There is none."""
    adjectives, nouns = set(RT.wordlist("adjective")), set(RT.wordlist("noun"))
    extensions = [b[len(a) + 1:] for a in adjectives for b in adjectives if b.startswith(a + "-")]
    assert sorted(extensions) == ["eyed", "eyed", "fashioned", "pitched", "tiny"]  # blue-eyed, ...
    assert not any(n.startswith(x + "-") and n[len(x) + 1:] in nouns for x in extensions for n in nouns)
    adjs, nouns = RT._adjectives_nouns()
    assert (len(adjs), len(nouns)) == (len(adjectives), len(set(RT.wordlist("noun"))))
    wonderwords = pytest.importorskip("wonderwords")
    for kind in ("noun", "adjective", "verb"):  # read as wonderwords (and RULER) read them
        assert list(RT.wordlist(kind)) == wonderwords.random_word._get_words_from_text_file(f"{kind}list.txt")


def test_essay_haystack_from_a_prose_file(tok, tmp_path):
    words = [f"w{i}" for i in range(100)]
    prose = " ".join(f"{words[i]} {words[i + 1]}." for i in range(0, 100, 2))  # 50 sentences of 2 words
    path = tmp_path / "essays.txt"
    path.write_text(prose)
    with pytest.raises(ValueError, match="niah_multivalue_noise"):
        R.generate("niah_multivalue", 1, tok, 1024)
    for s in R.generate("niah_multivalue", 2, tok, 1024, haystack_file=path):
        assert s["haystack"] == "essay:essays.txt"
        context = context_of(s, "afterwards.\n")
        text_words = NEEDLE_RE.sub(" ", context).split()
        assert len(text_words) > 100  # the prose repeats to fill the length
        assert [w.rstrip(".") for w in text_words] == [words[i % 100] for i in range(len(text_words))]
        # the 4 needles sit after sentence int(n * depth / 100) for depths in DEPTHS (n: sentences, the last cut)
        n_sentences = -(-len(text_words) // 2)
        depths = {int(n_sentences * (d / 100)) for d in RT.DEPTHS}
        needles = list(NEEDLE_RE.finditer(context))
        assert len(needles) == 4
        for needle in needles:
            before = len(NEEDLE_RE.sub(" ", context[:needle.start()]).split())
            assert (n_sentences if before == len(text_words) else before / 2) in depths


def test_depths_are_rulers():
    np = pytest.importorskip("numpy")
    assert RT.DEPTHS == np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int).tolist()


# ----------------------------------------------------------------------------- 3. vt

def follow_chain(text: str, value: str) -> set[str]:
    """Every name reached from `value` through 'VAR A = VAR B' statements."""
    names = set(re.findall(rf"VAR ([A-Z]+) = {value}\b", text))
    copies = re.findall(r"VAR ([A-Z]+) = VAR ([A-Z]+) ", text)
    while True:
        more = {a for a, b in copies if b in names} - names
        if not more:
            return names
        names |= more


def test_vt_chain_resolves_to_the_answer(suite):
    for s in suite["vt"]:
        value = re.search(r"assigned the value (\d{5}) in the text above\.$", s["input"]).group(1)
        assert s["answer_prefix"] == (" Answer: According to the chain(s) of variable assignment in the text above, "
                                      f"5 variables are assigned the value {value}, they are: ")
        example, task = s["input"].split("\n\nMemorize and track")  # the solved example, then the task
        context = context_of(s, "in the following text.\n\n")
        assert follow_chain(context, value) == set(s["answers"]) and len(s["answers"]) == 5
        assert all(re.fullmatch(r"[A-Z]{5}", name) for name in s["answers"])
        lines = context.split("\n")
        chain = [next(i for i, line in enumerate(lines) if line.startswith(f"VAR {name} = ")) for name in s["answers"]]
        assert chain == sorted(chain)  # statements in the chain's order
        assert sum(line == RT.NOISE_SENTENCE for line in lines) == len(lines) - 5
        # the example is solved: its listed names are exactly its chain's
        shown_value = re.search(r"assigned the value (\d{5}) in the text above\.", example).group(1)
        listed = example.split("they are:  ")[1].split()
        assert follow_chain(example, shown_value) == set(listed) and len(listed) == 5
        assert all(re.fullmatch(r"[A-Z]{3}", name) for name in listed)


# ----------------------------------------------------------------------------- 4. cwe / fwe

def numbered(text: str) -> list[str]:
    entries = re.findall(r"(\d+)\. (.+?)(?= \d+\. |$)", text)
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
    return [w for _, w in entries]


@pytest.mark.parametrize("max_len, example, common, other", [(4096, (40, 10, 3), 30, 3), (2048, (20, 3, 1), 6, 1)])
def test_cwe_answers_are_the_most_common_words(tok, suite, max_len, example, common, other):
    samples = suite["cwe"] if max_len == 4096 else R.generate("cwe", 3, tok, max_len)
    for s in samples:
        counts = Counter(numbered(context_of(s, "Memorize the ones that appear most often.\n")))
        assert {w for w, c in counts.items() if c == common} == set(s["answers"]) and len(s["answers"]) == 10
        assert set(counts.values()) == {common, other}
        # the solved example before the task
        shown = s["input"].split("\nBelow is a numbered list")[0]
        example_list, answer = shown.split("\nQuestion: What are the 10 most common words in the above list?"
                                           " Answer: The top 10 words that appear most often in the list are: ")
        example_counts = Counter(numbered(example_list.split("most often.\n")[1]))
        assert len(example_counts) == example[0]
        assert {w for w, c in example_counts.items() if c == example[1]} == set(numbered(answer))
        assert set(example_counts.values()) == set(example[1:])


def test_fwe_answers_are_the_most_frequent_coded_words(suite):
    for s in suite["fwe"]:
        counts = Counter(context_of(s, "Find the three most frequently appeared coded words. ").split(" "))
        ranked = counts.most_common()
        assert ranked[0][0] == "..." and [w for w, _ in ranked[1:4]] == s["answers"]
        assert ranked[3][1] > ranked[4][1]  # the third answer is strictly more frequent than the rest
        assert all(re.fullmatch(r"[a-z]{6}", w) for w, _ in ranked[1:])
        # the counts are exactly int(N k^-2 / zeta(2)) for rank k, for one N
        norm = RT.zeta(2.0)
        zipf = lambda n: [c for c in (int(n * k ** -2.0 / norm) for k in range(1, 2001)) if c]  # noqa: E731
        candidates = range(int(ranked[0][1] * norm), int((ranked[0][1] + 1) * norm) + 1)
        assert any(zipf(n) == [c for _, c in ranked] for n in candidates)


def test_zeta():
    assert RT.zeta(2.0) == pytest.approx(math.pi ** 2 / 6, rel=1e-14)
    assert RT.zeta(3.0) == pytest.approx(1.2020569031595942, rel=1e-14)


# ----------------------------------------------------------------------------- 5. lengths

@pytest.mark.parametrize("max_len", [1024, 2048, 4096])
def test_prompts_fill_the_length(tok, suite, max_len):
    for task in R.ALL_TASKS:
        samples = suite[task][:2] if max_len == 4096 else R.generate(task, 2, tok, max_len)
        for s in samples:
            total = len(R.prompt_ids(tok, s)[0]) + R.MAX_NEW_TOKENS[task]
            assert s["length"] == total - R.MAX_NEW_TOKENS[task]
            # the haystack grows by whole units; the coarsest, a uuid needle line, is 71-86 tokens
            slack = 90 if task == "niah_multikey_3" else 40
            assert max_len - slack < total <= max_len, (task, total)


def test_each_sample_has_the_largest_haystack_that_fits(tok, monkeypatch):
    """Exact: one more haystack unit would overflow max_seq_length."""
    checked, search = [], R.largest_fitting

    def spy(build, fits, low, high, start):
        sample, size = search(build, fits, low, high, start)
        checked.append(fits(sample) and not fits(build(size + 1)))
        return sample, size

    monkeypatch.setattr(R, "largest_fitting", spy)
    for task in R.ALL_TASKS:
        R.generate(task, 2, tok, 2048)
    assert checked == [True] * (2 * len(R.ALL_TASKS) + 2)  # + vt's two one-shot examples (500 tokens)


def test_largest_fitting_finds_the_largest_size():
    for start in (1, 37, 50, 500):
        sample, size = R.largest_fitting(lambda n: {"n": n}, lambda s: s["n"] * 3 <= 150, 1, 10 ** 6, start)
        assert (sample, size) == ({"n": 50}, 50)
    assert R.largest_fitting(lambda n: n, lambda n: True, 3, 40, 7) == (40, 40)  # capped
    with pytest.raises(ValueError, match="smallest haystack"):
        R.largest_fitting(lambda n: n, lambda n: n < 3, 3, 40, 10)


# ----------------------------------------------------------------------------- 6. prompt_ids

def test_prompt_ids_split_context_and_question(tok, suite):
    before, after = CK.chat_parts(tok)
    for task in R.ALL_TASKS:
        for s in suite[task]:
            text = before + s["input"] + after + s["answer_prefix"]
            ids, n_context = R.prompt_ids(tok, s)
            enc = tok.encode(text, add_special_tokens=False)
            assert ids == enc.ids  # one-piece encoding
            question = s["input"][s["context_end"]:]
            assert re.match(r"\n(What |Question: )", question) and "\n" not in question[1:]
            start = enc.offsets[n_context][0]  # the first question token starts at the question
            assert start == len(before) + s["context_end"] and enc.offsets[n_context - 1][0] < start
            assert text[start:] == question + after + s["answer_prefix"]
            assert tok.decode(ids, skip_special_tokens=False).endswith(after + s["answer_prefix"])  # at the very end


# ----------------------------------------------------------------------------- 7. metrics

def test_postprocess():
    assert R.postprocess("\x00 42 \x01") == "42"  # strip keeps \x00/\x01; they become newlines; strip again
    assert R.postprocess("  a\tb\x07c \n") == "a\nb\nc"


def test_string_match_all_scores():
    predictions = ["abcde FGHIJ", "nothing here", "  ABCDE\x01fghij  ", "XYZ"]
    answers = [["ABCDE", "fghij", "KLMNO", "PQRST"], ["x1"], ["abcde", "e\nF", "zz"], ["xyz"]]
    assert R.sample_scores("vt", predictions, answers) == pytest.approx([50.0, 0.0, 200 / 3, 100.0])
    assert R.score_task("niah_single_1", predictions, answers) == pytest.approx((50 + 0 + 200 / 3 + 100) / 4)
    assert R.sample_scores("niah_multivalue_noise", ["1234567 and 7654321"], [["1234567", "7654321", "1111111"]]) \
        == pytest.approx([200 / 3])


def test_string_match_part_scores():
    scores = R.sample_scores("qa_1", ["Paris, France", " \x00paris", "London"],
                             [["Lyon", "PARIS"], ["Paris"], ["Paris", "Rome"]])
    assert scores == [100.0, 100.0, 0.0]
    assert R.score_task("qa_2", ["Paris, France", "London"], [["Lyon", "PARIS"], ["Paris"]]) == 50.0


def test_metric_errors():
    with pytest.raises(ValueError, match="2 predictions for 1 samples"):
        R.sample_scores("cwe", ["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="unknown RULER task"):
        R.sample_scores("passkey", ["a"], [["a"]])


# ----------------------------------------------------------------------------- 8. constants

def test_constants_match_the_protocol_transcription():
    if not SPEC.is_file():
        pytest.skip(f"{SPEC} not found")
    spec = json.loads(SPEC.read_text(encoding="utf-8"))
    assert R.TEMPLATES == spec["templates"]
    assert R.TASKS == spec["tasks"] and list(R.TASKS) == list(spec["tasks"])
    assert RT.NEEDLE == spec["needle"]
    assert RT.NOISE_SENTENCE == spec["noise_haystack_sentence"]


def test_task_lists():
    assert R.OFFLINE_TASKS == ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt", "cwe", "fwe")
    assert list(R.NOISE_VARIANTS) == ["niah_single_3_noise", "niah_multikey_1_noise",  # niah_single_2 on noise
                                      "niah_multivalue_noise", "niah_multiquery_noise"]  # would be niah_single_1
    for name, config in R.NOISE_VARIANTS.items():
        base = R.TASKS[name.removesuffix("_noise")]
        assert base["type_haystack"] == "essay" and config == {**base, "type_haystack": "noise"}
    assert R.ALL_TASKS == R.OFFLINE_TASKS + tuple(R.NOISE_VARIANTS)
    assert R.MAX_NEW_TOKENS["niah_single_1"] == R.MAX_NEW_TOKENS["niah_multiquery_noise"] == 128
    assert [R.MAX_NEW_TOKENS[t] for t in ("vt", "cwe", "fwe", "qa_1")] == [30, 120, 50, 32]
    with pytest.raises(ValueError, match="QA"):
        R.generate("qa_1", 1, None)
    with pytest.raises(ValueError, match="unknown RULER task"):
        R.generate("niah_single_4", 1, None)


def test_random_items():
    rng = random.Random(0)
    assert re.fullmatch(r"[1-9]\d{6}", RT.random_item(rng, "numbers"))
    uuid4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert re.fullmatch(uuid4, RT.random_item(rng, "uuids"))
    with pytest.raises(ValueError, match="needle type"):
        RT.random_item(rng, "colors")


# ----------------------------------------------------------------------------- QA, on data built here

def squad_file(path: Path) -> Path:
    """A SQuAD-v2-shaped file: 20 articles x 3 paragraphs, each with one answerable and one impossible question."""
    articles = []
    for a in range(20):
        paragraphs = []
        for p in range(3):
            fact = f"city{a}x{p}"
            context = f"Article {a} paragraph {p}. " + " ".join(f"filler{a}w{k}" for k in range(30)) + f" The capital is {fact}."
            paragraphs.append({"context": context, "qas": [
                {"question": f"What is the capital in article {a} paragraph {p}?", "is_impossible": False,
                 "answers": [{"text": fact}, {"text": fact.upper()}]},
                {"question": "Unanswerable?", "is_impossible": True, "answers": []}]})
        articles.append({"title": f"t{a}", "paragraphs": paragraphs})
    path.write_text(json.dumps({"version": "v2.0", "data": articles}))
    return path


def hotpot_file(path: Path) -> Path:
    """A HotpotQA-shaped file: 30 questions, each with 4 context paragraphs [title, sentences]."""
    rows = [{"question": f"Who founded firm {q}?", "answer": f"founder{q}",
             "context": [[f"Title{q}_{c}", [f"Sentence {q} {c} a. ", f"Founder{q} and more {c}."]] for c in range(4)]}
            for q in range(30)]
    path.write_text(json.dumps(rows))
    return path


def documents_of(sample: dict) -> list[str]:
    context = context_of(sample, "The following are given documents.\n\n")
    parts = re.split(r"(?:^|\n\n)Document (\d+):\n", context)
    assert parts[0] == "" and [int(n) for n in parts[1::2]] == list(range(1, len(parts) // 2 + 1))
    return parts[2::2]


def test_squad_qa_holds_its_gold_paragraph_and_fills_the_length(tok, tmp_path):
    path = squad_file(tmp_path / "dev-v2.0.json")
    questions, docs = R.read_qa(str(path), "squad")
    assert len(questions) == 60 and len(docs) == 60  # impossible questions left out; paragraphs deduplicated
    samples = R.generate("qa_1", 4, tok, 1024, qa_file=path)
    assert samples == R.generate("qa_1", 4, tok, 1024, qa_file=path)
    for s in samples:
        a, p = map(int, re.search(r"article (\d+) paragraph (\d+)\?", s["input"]).groups())
        gold = next(d for d in docs if d.startswith(f"Article {a} paragraph {p}."))
        in_context = documents_of(s)
        assert in_context.count(gold) == 1 and len(set(in_context)) == len(in_context)
        # the article's other paragraphs come first among the distractors (RULER's 'more_context')
        assert all(any(d.startswith(f"Article {a} paragraph {o}.") for d in in_context) for o in range(3))
        assert s["answers"] == [f"city{a}x{p}", f"CITY{a}X{p}"] and s["answer_prefix"] == " Answer:"
        assert s["haystack"] == "squad:dev-v2.0.json" and s["max_new_tokens"] == 32
        one_more = max(len(tok.encode(f"\n\nDocument 99:\n{d}", add_special_tokens=False).ids) for d in docs)
        assert s["length"] + 32 <= 1024 < s["length"] + 32 + one_more  # one more document would not fit
        assert R.sample_scores("qa_1", [f"It is {s['answers'][1].lower()}"], [s["answers"]]) == [100.0]


def test_qa_evaluation_and_calibration_seeds_never_share_a_question(tok, tmp_path):
    path = squad_file(tmp_path / "squad.json")
    asked = lambda seed: {re.search(r"Question: (.*)$", s["input"]).group(1)  # noqa: E731
                          for s in R.generate("qa_1", 10, tok, 512, seed=seed, qa_file=path)}
    evaluation, calibration = asked(0) | asked(1), asked(R.CALIBRATION_SEED)
    assert len(calibration) == 10 and not evaluation & calibration
    with pytest.raises(ValueError, match="31 samples asked, 30 questions available"):
        R.generate("qa_1", 31, tok, 512, qa_file=path)


def test_hotpotqa_keeps_every_context_paragraph_of_its_question(tok, tmp_path):
    path = hotpot_file(tmp_path / "hotpot_dev_distractor_v1.json")
    for s in R.generate("qa_2", 3, tok, 1024, qa_file=path):
        q = int(re.search(r"firm (\d+)\?", s["input"]).group(1))
        in_context = documents_of(s)
        assert sorted(d for d in in_context if d.startswith(f"Title{q}_")) == [
            f"Title{q}_{c}\nSentence {q} {c} a. Founder{q} and more {c}." for c in range(4)]
        assert s["answers"] == [f"founder{q}"] and len(in_context) > 4


def test_qa_without_or_with_bad_data_names_the_problem(tok, tmp_path):
    with pytest.raises(ValueError, match="qa_1: RULER's QA needs its data"):
        R.generate("qa_1", 1, tok, 1024)
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [{"no": 1}]}')
    with pytest.raises(ValueError, match=f"{bad}: not a squad file"):
        R.generate("qa_1", 1, tok, 1024, qa_file=bad)
