import dataclasses

import numpy as np
import pytest
import torch
import transformers

from jaxret.teachers.t5_teacher import T5Teacher, TeacherSpec, tokenize_passages, tokenize_questions

QUESTIONS = ["where is the bowling hall of fame located?", "when was the eiffel tower built?"]
PASSAGES = [
    [
        {"title": "Bowling", "text": "the bowling hall of fame is located in arlington texas"},
        {"title": "Tower", "text": "the eiffel tower was built in 1889"},
        {"title": "", "text": "photosynthesis converts light energy"},
    ],
    [
        {
            "title": "Paris",
            "text": "the eiffel tower was built in 1889 for the world fair in paris",
        },
        {"title": "Plants", "text": "plants convert light"},
        {"title": "Hall", "text": "hall of fame"},
    ],
]


def torch_mean_loglik(folder, teacher):
    """Per-example mean token log-likelihood with PyTorch: −CE over the question tokens."""
    m = transformers.T5ForConditionalGeneration.from_pretrained(str(folder)).eval()
    flat = [p for ps in PASSAGES for p in ps]
    enc = tokenize_passages(
        teacher.tokenizer, [p["title"] for p in flat], [p["text"] for p in flat], teacher.spec
    )
    q = tokenize_questions(teacher.tokenizer, QUESTIONS, teacher.spec)
    labels = np.repeat(q["labels"], 3, 0).astype(np.int64)
    labels[np.repeat(q["label_mask"], 3, 0) == 0] = -100
    with torch.no_grad():
        logits = m(
            input_ids=torch.tensor(enc["input_ids"]),
            attention_mask=torch.tensor(enc["attention_mask"]),
            labels=torch.tensor(labels),
        ).logits
    ce = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), torch.tensor(labels), reduction="none", ignore_index=-100
    )
    per_example = ce.sum(1) / (torch.tensor(labels) != -100).sum(1)
    return -per_example.numpy().reshape(2, 3)


def test_fp32_scores_equal_pytorch_loss(tiny_t5):
    teacher = T5Teacher.from_pretrained(
        tiny_t5, dtype="float32", spec=TeacherSpec(max_passage_length=48, max_question_length=24)
    )
    ours = teacher.score(QUESTIONS, PASSAGES)
    assert ours.shape == (2, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, torch_mean_loglik(tiny_t5, teacher), atol=1e-4)


def test_bf16_close_and_chunked_equals_unchunked(tiny_t5):
    spec = TeacherSpec(max_passage_length=48, max_question_length=24)
    fp32 = T5Teacher.from_pretrained(tiny_t5, dtype="float32", spec=spec).score(QUESTIONS, PASSAGES)
    bf16_teacher = T5Teacher.from_pretrained(tiny_t5, dtype="bfloat16", spec=spec)
    assert all(
        x.dtype == np.dtype("bfloat16") for x in __import__("jax").tree.leaves(bf16_teacher.params)
    )
    bf16 = bf16_teacher.score(QUESTIONS, PASSAGES)
    assert np.abs(bf16 - fp32).max() < 0.05
    for chunk in (1, 4):  # 6 pairs: 4 leaves a padded last chunk
        chunked = T5Teacher.from_pretrained(
            tiny_t5, "float32", dataclasses.replace(spec, chunk_pairs=chunk)
        )
        np.testing.assert_allclose(chunked.score(QUESTIONS, PASSAGES), fp32, atol=1e-5)
    summed = T5Teacher.from_pretrained(
        tiny_t5, "float32", dataclasses.replace(spec, reduction="sum")
    )
    lengths = tokenize_questions(summed.tokenizer, QUESTIONS, spec)["label_mask"].sum(1)
    np.testing.assert_allclose(
        summed.score(QUESTIONS, PASSAGES), fp32 * lengths[:, None], rtol=1e-5
    )


def test_prompt_format_and_truncation(tiny_t5):
    teacher = T5Teacher.from_pretrained(
        tiny_t5, dtype="float32", spec=TeacherSpec(max_passage_length=24)
    )
    tok = teacher.tokenizer
    assert (
        teacher.spec.verbalize("T", "x y")
        == "Passage: T x y . Please write a question based on this passage."
    )
    roomy = dataclasses.replace(teacher.spec, max_passage_length=64)
    enc = tokenize_passages(tok, ["Bowling"], ["short text"], roomy)
    ref = tok(roomy.verbalize("Bowling", "short text"))["input_ids"]  # the tokenizer's own EOS
    assert 24 < len(ref) < 64
    assert enc["input_ids"][0, : len(ref)].tolist() == ref and enc["attention_mask"][
        0
    ].sum() == len(ref)
    suffix = tok(teacher.spec.passage_suffix, add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="cannot hold the instruction"):
        tokenize_passages(tok, ["t"], ["word " * 200], teacher.spec)  # 24 < the instruction
    tight = dataclasses.replace(teacher.spec, max_passage_length=len(suffix) + 8)
    long = tokenize_passages(tok, ["t"], ["word " * 200], tight)
    row = long["input_ids"][0].tolist()
    assert long["attention_mask"][0].sum() == len(suffix) + 8 and row[-1] == tok.eos_token_id
    assert row[-1 - len(suffix) : -1] == suffix  # the instruction survives truncation
    q = tokenize_questions(tok, ["where?"], teacher.spec)
    assert (
        q["labels"][0, : q["label_mask"][0].sum()].tolist() == tok("Question: where?")["input_ids"]
    )


def test_questions_are_tokenized_in_bounded_batches(tiny_t5):
    """The teacher's targets of many questions come from tokenizer calls of at most
    `batch_size` questions, equal to one call over all. Mutation: one tokenizer call over
    every question (as before) → a call of 10 > 4 questions."""
    tok = T5Teacher.from_pretrained(tiny_t5, dtype="float32").tokenizer
    spec = TeacherSpec()
    calls = []

    class Counting:
        def __call__(self, texts, **kw):
            calls.append(len(texts))
            return tok(texts, **kw)

        def __getattr__(self, name):
            return getattr(tok, name)

    questions = [f"who wrote book number {i} of the series?" for i in range(10)]
    batched = tokenize_questions(Counting(), questions, spec, batch_size=4)
    whole = tokenize_questions(tok, questions, spec, batch_size=len(questions))
    assert calls == [4, 4, 2]
    for key in ("labels", "label_mask"):
        np.testing.assert_array_equal(batched[key], whole[key])


def test_score_input_errors(tiny_t5):
    teacher = T5Teacher.from_pretrained(tiny_t5, dtype="float32")
    with pytest.raises(ValueError, match="same number"):
        teacher.score(QUESTIONS, [PASSAGES[0], PASSAGES[1][:2]])
    with pytest.raises(ValueError, match="2 questions but 1"):
        teacher.score(QUESTIONS, PASSAGES[:1])
    with pytest.raises(ValueError, match='"text"'):
        teacher.score(QUESTIONS[:1], [[{"title": "x"}]])
    with pytest.raises(ValueError, match="float16"):
        T5Teacher.from_pretrained(tiny_t5, dtype="float16")


LONG_QUESTIONS = [
    "given that the eiffel tower was built in 1889 for the world fair in paris france and "
    "the bowling hall of fame is located in arlington texas, which came first?",
    "where is the bowling hall of fame located?",
]


def test_long_questions_equal_pytorch_and_cuts_are_reported(tiny_t5, caplog):
    """Targets up to ART's 128 tokens are scored whole: equal to PyTorch's mean token
    log-likelihood of the full question (fp32, 1e-3 nats). Longer ones are cut, and the cut is
    reported once."""
    teacher = T5Teacher.from_pretrained(tiny_t5, dtype="float32")
    assert teacher.spec.max_question_length == 128
    tok = teacher.tokenizer
    full = [tok("Question: " + q)["input_ids"] for q in LONG_QUESTIONS]
    assert 64 < len(full[0]) <= 128  # longer than the old default: it used to be cut
    passages = [PASSAGES[0][:2], PASSAGES[1][:2]]
    ours = teacher.score(LONG_QUESTIONS, passages)

    m = transformers.T5ForConditionalGeneration.from_pretrained(str(tiny_t5)).eval()
    for b, (question_ids, ps) in enumerate(zip(full, passages)):
        for k, p in enumerate(ps):
            prompt = "Please write a question based on this passage."
            enc = tok(f"Passage: {p['title']} {p['text']} . {prompt}")
            with torch.no_grad():
                out = m(
                    input_ids=torch.tensor([enc["input_ids"]]),
                    labels=torch.tensor([question_ids]),
                )
            assert abs(ours[b, k] - (-out.loss.item())) < 1e-3, (b, k)
    assert "were cut" not in caplog.text
    short = T5Teacher.from_pretrained(
        tiny_t5, dtype="float32", spec=TeacherSpec(max_question_length=32)
    )
    short.score(LONG_QUESTIONS, passages)
    short.score(LONG_QUESTIONS, passages)
    cut_lines = [r for r in caplog.records if "teacher questions" in r.getMessage()]
    assert len(cut_lines) == 1  # reported once, however often score() runs
    msg = cut_lines[0].getMessage()
    assert "1 of 2 rows are longer than 32 tokens" in msg and f"longest: {len(full[0])}" in msg
    assert short.truncation["teacher questions"].cut == 2  # counted on every call


def test_a_prompt_that_leaves_no_room_for_the_passage_is_reported(tiny_t5, caplog):
    """The instruction takes most of a short teacher.max_passage_length: every passage then
    reads "Passage: <a few tokens> . Please write …" and the teacher's scores are nearly (or
    exactly) equal. Fails without the warning; no warning at the default 512."""
    from jaxret.teachers.t5_teacher import check_passage_room, passage_room

    teacher = T5Teacher.from_pretrained(tiny_t5, "float32")
    tok = teacher.tokenizer
    short = TeacherSpec(max_passage_length=40)
    prompt = len(
        tok(short.passage_prefix + short.passage_suffix, add_special_tokens=False)["input_ids"]
    )
    assert passage_room(tok, short) == 40 - 1 - prompt
    check_passage_room(tok, short)
    assert "teacher.max_passage_length=40 leaves" in caplog.text
    caplog.clear()
    check_passage_room(tok, TeacherSpec())
    assert "leaves" not in caplog.text
