"""v1 text features: hand-computed values, and the vectorised kernels equal a per-row reference."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pyarrow as pa
import pytest

from services.proxylabel import features as F
from tools.modeller.proxylabel.generate import MESSAGES_TYPE, conversation

A = re.ASCII


def _count(pattern: str, text: str, flags: int = 0) -> int:
    # RE2's $ is the end of text; Python's \Z.
    return len(re.findall(pattern.replace("$", r"\Z"), text, flags | A))


def _side(text: str) -> dict[str, float]:
    words = re.findall(r"\w+", text, A)
    lower = [w.lower() for w in words]
    trimmed = text.strip()
    sentences = 0
    if words:
        sentences = _count(r"[.!?]+(?:[ \t\n\r\f]|$)", text) + (0 if re.search(r"[.!?]\Z", trimmed) else 1)
    paragraphs = 0 if not trimmed else 1 + _count(r"\n[ \t\r\f]*\n[ \t\n\r\f]*", trimmed)
    bigrams = list(itertools.pairwise(lower))
    return {
        "chars": len(text),
        "words": len(words),
        "word_chars": sum(map(len, words)),
        "sentences": sentences,
        "paragraphs": paragraphs,
        "distinct": len(set(lower)),
        "bigrams": len(bigrams),
        "distinct_bigrams": len(set(bigrams)),
        "trimmed": trimmed,
    }


def reference(user: str, asst: str, turns: int, user_turns: int) -> list[float]:
    """The definitions of FEATURES_V1, one row at a time with Python's re."""
    u, a = _side(user), _side(asst)

    def ratio(x: float, y: float) -> float:
        return x / y if y > 0 else 0.0

    f = {
        "user_chars": u["chars"],
        "asst_chars": a["chars"],
        "user_words": u["words"],
        "asst_words": a["words"],
        "log_user_chars": math.log1p(u["chars"]),
        "log_asst_chars": math.log1p(a["chars"]),
        "total_chars": u["chars"] + a["chars"],
        "len_ratio": a["chars"] / (u["chars"] + 1),
        "turns": turns,
        "user_turns": user_turns,
        "user_sentences": u["sentences"],
        "asst_sentences": a["sentences"],
        "asst_paragraphs": a["paragraphs"],
        "user_avg_word_len": ratio(u["word_chars"], u["words"]),
        "asst_avg_word_len": ratio(a["word_chars"], a["words"]),
        "user_avg_sentence_len": u["words"] / max(u["sentences"], 1),
        "asst_avg_sentence_len": a["words"] / max(a["sentences"], 1),
        "asst_words_per_paragraph": a["words"] / max(a["paragraphs"], 1),
        "user_lexical_diversity": ratio(u["distinct"], u["words"]),
        "asst_lexical_diversity": ratio(a["distinct"], a["words"]),
        "asst_code_blocks": asst.count("```") // 2,
        "user_code_blocks": user.count("```") // 2,
        "asst_list_items": len(re.findall(r"^[ \t]*(?:[-*+•]|[0-9]+[.)])[ \t]+", asst, re.MULTILINE | A)),
        "asst_headings": len(re.findall(r"^[ \t]*#{1,6}[ \t]+[^ \t\n]", asst, re.MULTILINE | A)),
        "asst_urls": _count(r"(?:https?://|www\.)[^ \t\n\r\f]+", asst),
        "asst_special_char_density": _count(r"[!-/:-@\[-`{-~]", asst) / max(a["chars"], 1),
        "user_special_char_density": _count(r"[!-/:-@\[-`{-~]", user) / max(u["chars"], 1),
        "asst_newline_density": asst.count("\n") / max(a["chars"], 1),
        "user_question_marks": user.count("?"),
        "user_instruction_keywords": _count(
            F.INSTRUCTION.replace("(?i)", "").replace("(write", "(?:write"), user, re.IGNORECASE
        ),
        "user_ends_with_question": float(u["trimmed"].endswith("?")),
        "asst_capitalised_start": float(bool(re.match(r"[A-Z]", a["trimmed"]))),
        "asst_final_punctuation": float(bool(a["trimmed"]) and a["trimmed"][-1] in ".!?)\"'`"),
        "asst_bigram_repetition": 1 - a["distinct_bigrams"] / a["bigrams"] if a["bigrams"] else 0.0,
        "asst_first_person_density": _count(
            r"\b(?:i|me|my|mine|myself|we|us|our|ours|ourselves)\b", asst, re.IGNORECASE
        )
        / max(a["words"], 1),
    }
    assert list(f) == list(F.FEATURE_NAMES)
    return [float(v) for v in f.values()]


def test_the_table_defines_35_named_features() -> None:
    assert F.NUM_FEATURES == 35 and len(set(F.FEATURE_NAMES)) == 35 and F.FEATURE_VERSION == "v1"
    assert all(definition for _, definition in F.FEATURES_V1)


def test_hand_computed_values() -> None:
    messages = pa.array(
        [
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Write a poem? Please."},
                {"role": "assistant", "content": "Sure! I wrote it.\n\n- one\n- two\nthe the the the"},
            ]
        ],
        MESSAGES_TYPE,
    )
    conv = F.from_messages(messages)
    assert conv.user.to_pylist() == ["Write a poem? Please."] and conv.turns.tolist() == [2]
    got = dict(zip(F.FEATURE_NAMES, F.compute_features(conv)[0].tolist(), strict=True))
    expected = {
        "user_chars": 21,
        "asst_chars": 46,
        "user_words": 4,
        "asst_words": 10,
        "total_chars": 67,
        "len_ratio": 46 / 22,
        "turns": 2,
        "user_turns": 1,
        "user_sentences": 2,  # "poem? " and "Please." at the end
        "asst_sentences": 3,  # "Sure! ", "it.\n", and the unterminated list tail
        "asst_paragraphs": 2,
        "user_avg_word_len": 4.0,
        "asst_avg_word_len": 3.0,
        "asst_avg_sentence_len": 10 / 3,
        "asst_words_per_paragraph": 5.0,
        "user_lexical_diversity": 1.0,
        "asst_lexical_diversity": 0.7,  # 7 distinct of 10
        "asst_list_items": 2,
        "asst_headings": 0,
        "asst_code_blocks": 0,
        "asst_special_char_density": 4 / 46,  # ! . - -
        "asst_newline_density": 4 / 46,
        "user_question_marks": 1,
        "user_instruction_keywords": 1,
        "user_ends_with_question": 0,
        "asst_capitalised_start": 1,
        "asst_final_punctuation": 0,
        "asst_bigram_repetition": 1 - 7 / 9,  # the-the three times
        "asst_first_person_density": 0.1,
    }
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-6), name


def test_markdown_code_urls_and_headings() -> None:
    asst = (
        "## Setup\n\nVisit https://example.org/docs or www.python.org first.\n\n```python\nprint('x')\n```\n"
        "1. Install it.\n2) Run it!\n* done"
    )
    conv = F.from_pairs(["How do I start? I asked you to explain it, then describe it?"], [asst])
    got = dict(zip(F.FEATURE_NAMES, F.compute_features(conv)[0].tolist(), strict=True))
    assert got["asst_headings"] == 1 and got["asst_urls"] == 2 and got["asst_code_blocks"] == 1
    assert got["asst_list_items"] == 3 and got["user_question_marks"] == 2
    assert got["user_instruction_keywords"] == 2 and got["user_ends_with_question"] == 1
    assert got["turns"] == 2 and got["user_turns"] == 1


def test_empty_and_missing_sides_are_zero() -> None:
    conv = F.from_messages(pa.array([[], None, [{"role": "user", "content": "  "}]], MESSAGES_TYPE))
    x = F.compute_features(conv)
    assert np.isfinite(x).all()
    assert x[:2].sum() == 0 and x[2, F.FEATURE_NAMES.index("user_chars")] == 2


def test_vectorised_equals_per_row_reference() -> None:
    rng = np.random.default_rng(5)
    convs = [conversation(rng, int(q)) for q in rng.choice(6, size=300)]
    convs += [
        [
            {"role": "user", "content": "Hi!!  What's up?\n\n\n  Next."},
            {
                "role": "assistant",
                "content": "I... me? We're fine.\tOk\n\n# Title\n-  item\nhttp://x.y?z=1 end",
            },
        ],
        [{"role": "assistant", "content": "x"}],
        [{"role": "user", "content": "ünïcödé wörds ok"}],
    ]
    conv = F.from_messages(pa.array(convs, MESSAGES_TYPE))
    got = F.compute_features(conv)
    users, assts = conv.user.to_pylist(), conv.assistant.to_pylist()
    want = np.array(
        [
            reference(u, a, int(t), int(ut))
            for u, a, t, ut in zip(users, assts, conv.turns, conv.user_turns, strict=True)
        ]
    )
    for j, name in enumerate(F.FEATURE_NAMES):
        np.testing.assert_allclose(got[:, j], want[:, j], rtol=1e-5, atol=1e-6, err_msg=name)


def test_parsing_forms_agree() -> None:
    messages = [
        {"role": "user", "content": "Explain tides."},
        {"role": "assistant", "content": "The moon pulls."},
        {"role": "user", "content": "More?"},
        {"role": "assistant", "content": "Sun too."},
    ]
    a = F.from_messages(pa.array([messages], MESSAGES_TYPE))
    b = F.from_texts(a.rendered())
    c = F.from_texts(["Explain tides.\n\nMore?"], ["The moon pulls.\n\nSun too."])
    assert a.user.to_pylist() == b.user.to_pylist() == c.user.to_pylist()
    assert a.assistant.to_pylist() == b.assistant.to_pylist() == c.assistant.to_pylist()
    # The rendered text (what the embedder sees) keeps the two sides, not the turn order.
    assert a.turns.tolist() == [4] and b.turns.tolist() == [2]
    same = [j for j, n in enumerate(F.FEATURE_NAMES) if n not in ("turns", "user_turns")]
    np.testing.assert_array_equal(F.compute_features(a)[:, same], F.compute_features(b)[:, same])


def test_standardisation_uses_stored_statistics() -> None:
    x = np.arange(70, dtype=np.float32).reshape(2, 35)
    x[:, 3] = 5.0  # constant: centred, not divided by zero
    stats = F.FeatureStats.fit(x)
    z = stats.standardise(x)
    np.testing.assert_allclose(z[:, 0], [-1, 1])
    assert z[:, 3].tolist() == [0, 0]
    again = F.FeatureStats.model_validate_json(stats.model_dump_json())
    np.testing.assert_array_equal(again.standardise(x), z)
