"""Shallow text features of a conversation (v1), vectorised over a row group, and the
conversation parsing that feeds them and the embedder.

The research (docs/models.md#proxy-label-models) lists the v1 features without defining them; `FEATURES_V1` is the
definition, versioned beside the MLP (`mlp.json` records `FEATURE_VERSION` and the names), so a
served MLP always sees the features it was trained on. Everything is computed with pyarrow string
kernels (RE2 regexes) and numpy over whole arrays: no Python loop per row. RE2's `\\w`, `\\s` and
`\\b` are ASCII, so a "word" is a maximal run of ASCII letters, digits and underscores.

Conversations come as tulu `messages` (list of {role, content}), `prompt`/`response` columns, or one
text in tulu's chat template (`<|user|>\\n...\\n<|assistant|>\\n...`). The user side is every user
message joined by a blank line, the assistant side every assistant message; system messages are
left out of both.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from services.runtime.config import StrictModel

FEATURE_VERSION = "v1"

USER_ROLES = ("user", "human")
ASSISTANT_ROLES = ("assistant", "gpt", "model")
JOINER = "\n\n"

# Patterns shared by the kernels and the definitions (RE2 syntax, ASCII classes).
WORD = r"\w+"
SENTENCE_END = r"[.!?]+([ \t\n\r\f]|$)"
PARAGRAPH_BREAK = r"\n[ \t\r\f]*\n[ \t\n\r\f]*"
LIST_ITEM = r"(?m)^[ \t]*([-*+•]|[0-9]+[.)])[ \t]+"
HEADING = r"(?m)^[ \t]*#{1,6}[ \t]+[^ \t\n]"
URL = r"(https?://|www\.)[^ \t\n\r\f]+"
SPECIAL = r"[!-/:-@\[-`{-~]"
INSTRUCTION = (
    r"(?i)\b(write|explain|describe|list|summari[sz]e|create|generate|give|provide|translate"
    r"|rewrite|classify|compare|calculate|suggest|design|implement|analy[sz]e|identify|make)\b"
)
FIRST_PERSON = r"(?i)\b(i|me|my|mine|myself|we|us|our|ours|ourselves)\b"

# name -> definition. Order is the column order of the feature matrix; never reorder a version.
FEATURES_V1: tuple[tuple[str, str], ...] = (
    # length (8)
    ("user_chars", "characters (code points) of the user text"),
    ("asst_chars", "characters of the assistant text"),
    ("user_words", f"words of the user text: matches of {WORD}"),
    ("asst_words", "words of the assistant text"),
    ("log_user_chars", "ln(1 + user_chars)"),
    ("log_asst_chars", "ln(1 + asst_chars)"),
    ("total_chars", "user_chars + asst_chars"),
    ("len_ratio", "asst_chars / (user_chars + 1)"),
    # structure (10)
    ("turns", "user and assistant messages (a prompt/response pair: 2)"),
    ("user_turns", "user messages"),
    (
        "user_sentences",
        (
            f"0 without a word; else matches of {SENTENCE_END}, plus 1 when the trimmed "
            "text does not end in . ! or ?"
        ),
    ),
    ("asst_sentences", "as user_sentences, of the assistant text"),
    ("asst_paragraphs", f"0 when blank; else 1 + matches of {PARAGRAPH_BREAK} in the trimmed text"),
    ("user_avg_word_len", "word characters / words of the user text (0 without words)"),
    ("asst_avg_word_len", "word characters / words of the assistant text (0 without words)"),
    ("user_avg_sentence_len", "user_words / max(user_sentences, 1)"),
    ("asst_avg_sentence_len", "asst_words / max(asst_sentences, 1)"),
    ("asst_words_per_paragraph", "asst_words / max(asst_paragraphs, 1)"),
    # lexical (2)
    ("user_lexical_diversity", "distinct lower-cased words / words of the user text (0 without words)"),
    ("asst_lexical_diversity", "distinct lower-cased words / words of the assistant text"),
    # content (8)
    ("asst_code_blocks", "floor(occurrences of ``` / 2) in the assistant text"),
    ("user_code_blocks", "floor(occurrences of ``` / 2) in the user text"),
    ("asst_list_items", f"lines of the assistant text starting a list item: {LIST_ITEM}"),
    ("asst_headings", f"markdown heading lines of the assistant text: {HEADING}"),
    ("asst_urls", f"URLs in the assistant text: {URL}"),
    ("asst_special_char_density", f"ASCII punctuation/symbols {SPECIAL} / max(asst_chars, 1)"),
    ("user_special_char_density", "the same of the user text"),
    ("asst_newline_density", "newlines / max(asst_chars, 1)"),
    # prompt (3)
    ("user_question_marks", "occurrences of ? in the user text"),
    ("user_instruction_keywords", f"instruction verbs in the user text: {INSTRUCTION}"),
    ("user_ends_with_question", "1 when the trimmed user text ends with ?, else 0"),
    # response quality (4)
    ("asst_capitalised_start", "1 when the trimmed assistant text starts with A-Z, else 0"),
    ("asst_final_punctuation", "1 when the trimmed assistant text ends with one of . ! ? ) \" ' `, else 0"),
    (
        "asst_bigram_repetition",
        ("1 - distinct / all bigrams of consecutive lower-cased assistant words (0 with fewer than 2 words)"),
    ),
    ("asst_first_person_density", f"first-person pronouns {FIRST_PERSON} / max(asst_words, 1)"),
)
FEATURE_NAMES: tuple[str, ...] = tuple(name for name, _ in FEATURES_V1)
NUM_FEATURES = len(FEATURES_V1)


class FeatureStats(StrictModel):
    """Mean and standard deviation of each feature over the MLP's training rows."""

    version: str = FEATURE_VERSION
    names: list[str] = Field(default_factory=lambda: list(FEATURE_NAMES))
    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _check(self) -> FeatureStats:
        if not len(self.names) == len(self.mean) == len(self.std):
            raise ValueError("names, mean and std must have the same length")
        return self

    @classmethod
    def fit(cls, features: np.ndarray) -> FeatureStats:
        x = np.asarray(features, np.float64)
        return cls(mean=x.mean(axis=0).tolist(), std=x.std(axis=0).tolist())

    def standardise(self, features: np.ndarray) -> np.ndarray:
        if self.version != FEATURE_VERSION or tuple(self.names) != FEATURE_NAMES:
            raise ValueError(
                f"statistics are for features {self.version}, this build computes {FEATURE_VERSION}"
            )
        std = np.asarray(self.std, np.float64)
        # A feature constant over the training rows carries no information: centre it only.
        std = np.where(std > 1e-12, std, 1.0)
        return ((np.asarray(features, np.float64) - np.asarray(self.mean)) / std).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Conversations


@dataclass(frozen=True)
class Conversations:
    """A batch of conversations split into sides: user and assistant texts, message counts."""

    user: pa.Array
    assistant: pa.Array
    turns: np.ndarray
    user_turns: np.ndarray

    def __len__(self) -> int:
        return len(self.user)

    def rendered(self) -> list[str]:
        """The text the embedder sees: tulu's chat template over the two sides."""
        return render(self.user.to_pylist(), self.assistant.to_pylist())


def render(user: Sequence[str | None], assistant: Sequence[str | None]) -> list[str]:
    return [f"<|user|>\n{u or ''}\n<|assistant|>\n{a or ''}" for u, a in zip(user, assistant, strict=True)]


def _strings(values: pa.Array | pa.ChunkedArray | Sequence[str | None]) -> pa.Array:
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_large_string(arr.type) or pa.types.is_string_view(arr.type) or pa.types.is_null(arr.type):
        arr = arr.cast(pa.string())
    return pc.fill_null(arr, "")


def _join_role(
    contents: pa.Array, parents: np.ndarray, mask: np.ndarray, n: int
) -> tuple[pa.Array, np.ndarray]:
    kept = contents.filter(pa.array(mask))
    counts = np.bincount(parents[mask], minlength=n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    lists = pa.ListArray.from_arrays(pa.array(offsets), kept)
    return pc.binary_join(lists, JOINER), counts


def from_messages(messages: pa.Array | pa.ChunkedArray) -> Conversations:
    """tulu `messages`: list<struct<role, content>>; a null list is an empty conversation."""
    if isinstance(messages, pa.ChunkedArray):
        messages = messages.combine_chunks()
    n = len(messages)
    flat = pc.list_flatten(messages)
    parents = pc.list_parent_indices(messages).to_numpy().astype(np.int64)
    roles = pc.utf8_lower(_strings(flat.field("role"))).to_numpy(zero_copy_only=False)
    contents = _strings(flat.field("content"))
    user_mask = np.isin(roles, USER_ROLES)
    asst_mask = np.isin(roles, ASSISTANT_ROLES)
    user, user_turns = _join_role(contents, parents, user_mask, n)
    assistant, asst_turns = _join_role(contents, parents, asst_mask, n)
    return Conversations(
        user, assistant, (user_turns + asst_turns).astype(np.float64), user_turns.astype(np.float64)
    )


def from_pairs(
    prompt: pa.Array | Sequence[str | None], response: pa.Array | Sequence[str | None]
) -> Conversations:
    """One user message and one assistant message per row (an empty side counts no message)."""
    user, assistant = _strings(prompt), _strings(response)
    u = (pc.utf8_length(user).to_numpy() > 0).astype(np.float64)
    a = (pc.utf8_length(assistant).to_numpy() > 0).astype(np.float64)
    return Conversations(user, assistant, u + a, u)


_TEMPLATE = re.compile(r"<\|(user|assistant|system)\|>\n?")


def parse_rendered(text: str) -> tuple[list[str], list[str]]:
    """(user messages, assistant messages) of a text in tulu's chat template; text without the
    markers is one user message."""
    parts = _TEMPLATE.split(text)
    if len(parts) == 1:
        return ([text] if text else []), []
    user: list[str] = []
    assistant: list[str] = []
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        content = content.removesuffix("\n")
        (user if role == "user" else assistant if role == "assistant" else []).append(content)
    return user, assistant


def from_texts(texts: Sequence[str], responses: Sequence[str] | None = None) -> Conversations:
    """Rows of a request: a prompt with its response, or a whole conversation in one text.

    Parsing the chat template is a Python loop; it serves requests of a few rows, shards use the
    columnar forms above.
    """
    if responses is not None and any(responses):
        pairs = [
            ([t] if t else [], [r] if r else []) if r else parse_rendered(t)
            for t, r in zip(texts, responses, strict=True)
        ]
    else:
        pairs = [parse_rendered(t) for t in texts]
    user = [JOINER.join(u) for u, _ in pairs]
    assistant = [JOINER.join(a) for _, a in pairs]
    ut = np.array([len(u) for u, _ in pairs], np.float64)
    at = np.array([len(a) for _, a in pairs], np.float64)
    return Conversations(_strings(user), _strings(assistant), ut + at, ut)


# ---------------------------------------------------------------------------------------------
# Features


def _np(arr: pa.Array) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False).astype(np.float64)


def _count(texts: pa.Array, pattern: str) -> np.ndarray:
    return _np(pc.count_substring_regex(texts, pattern))


def _flag(texts: pa.Array, pattern: str) -> np.ndarray:
    return _np(pc.match_substring_regex(texts, pattern))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _words(texts: pa.Array) -> tuple[np.ndarray, np.ndarray, int]:
    """(row of each word, dictionary code of its lower-cased form, dictionary size)."""
    pieces = pc.split_pattern_regex(texts, r"\W+")
    flat = pc.list_flatten(pieces)
    parents = pc.list_parent_indices(pieces)
    keep = pc.greater(pc.utf8_length(flat), 0)
    words = pc.utf8_lower(flat.filter(keep))
    encoded = pc.dictionary_encode(words)
    return (
        parents.filter(keep).to_numpy().astype(np.int64),
        encoded.indices.to_numpy().astype(np.int64),
        max(len(encoded.dictionary), 1),
    )


def _distinct_per_row(rows: np.ndarray, keys: np.ndarray, key_space: int, n: int) -> np.ndarray:
    """Distinct keys (in [0, key_space)) per row, by hashing (row, key) pairs."""
    if len(keys) == 0:
        return np.zeros(n)
    if n * key_space < 2**62:
        pairs = rows * key_space + keys
    else:  # a huge vocabulary: compact the keys first so the pairs fit in int64
        _, keys = np.unique(keys, return_inverse=True)
        pairs = rows * (int(keys.max()) + 1) + keys
        key_space = int(keys.max()) + 1
    distinct = pc.unique(pa.array(pairs)).to_numpy()
    return np.bincount(distinct // key_space, minlength=n).astype(np.float64)


def _side(texts: pa.Array) -> dict[str, np.ndarray]:
    """The per-side quantities the features are made of."""
    n = len(texts)
    trimmed = pc.utf8_trim_whitespace(texts)
    chars = _np(pc.utf8_length(texts))
    words = _count(texts, WORD)
    word_chars = _np(pc.utf8_length(pc.replace_substring_regex(texts, r"\W+", "")))
    has_word = words > 0
    open_end = 1.0 - _flag(trimmed, r"[.!?]$")
    sentences = np.where(has_word, _count(texts, SENTENCE_END) + open_end, 0.0)
    blank = _np(pc.utf8_length(trimmed)) == 0
    paragraphs = np.where(blank, 0.0, 1.0 + _count(trimmed, PARAGRAPH_BREAK))
    rows, codes, size = _words(texts)
    distinct = _distinct_per_row(rows, codes, size, n)
    same = rows[1:] == rows[:-1]
    bigram_rows = rows[:-1][same]
    bigram_keys = codes[:-1][same] * size + codes[1:][same]
    bigrams = np.bincount(bigram_rows, minlength=n).astype(np.float64)
    distinct_bigrams = _distinct_per_row(bigram_rows, bigram_keys, size * size, n)
    return {
        "chars": chars,
        "words": words,
        "word_chars": word_chars,
        "sentences": sentences,
        "paragraphs": paragraphs,
        "distinct": distinct,
        "bigrams": bigrams,
        "distinct_bigrams": distinct_bigrams,
        "trimmed": trimmed,
    }


def compute_features(conversations: Conversations) -> np.ndarray:
    """The v1 feature matrix [rows, 35] (float32, unstandardised), columns in `FEATURE_NAMES` order."""
    user_text, asst_text = conversations.user, conversations.assistant
    u, a = _side(user_text), _side(asst_text)
    f: dict[str, np.ndarray] = {
        "user_chars": u["chars"],
        "asst_chars": a["chars"],
        "user_words": u["words"],
        "asst_words": a["words"],
        "log_user_chars": np.log1p(u["chars"]),
        "log_asst_chars": np.log1p(a["chars"]),
        "total_chars": u["chars"] + a["chars"],
        "len_ratio": a["chars"] / (u["chars"] + 1.0),
        "turns": np.asarray(conversations.turns, np.float64),
        "user_turns": np.asarray(conversations.user_turns, np.float64),
        "user_sentences": u["sentences"],
        "asst_sentences": a["sentences"],
        "asst_paragraphs": a["paragraphs"],
        "user_avg_word_len": _ratio(u["word_chars"], u["words"]),
        "asst_avg_word_len": _ratio(a["word_chars"], a["words"]),
        "user_avg_sentence_len": u["words"] / np.maximum(u["sentences"], 1.0),
        "asst_avg_sentence_len": a["words"] / np.maximum(a["sentences"], 1.0),
        "asst_words_per_paragraph": a["words"] / np.maximum(a["paragraphs"], 1.0),
        "user_lexical_diversity": _ratio(u["distinct"], u["words"]),
        "asst_lexical_diversity": _ratio(a["distinct"], a["words"]),
        "asst_code_blocks": np.floor(_np(pc.count_substring(asst_text, "```")) / 2),
        "user_code_blocks": np.floor(_np(pc.count_substring(user_text, "```")) / 2),
        "asst_list_items": _count(asst_text, LIST_ITEM),
        "asst_headings": _count(asst_text, HEADING),
        "asst_urls": _count(asst_text, URL),
        "asst_special_char_density": _count(asst_text, SPECIAL) / np.maximum(a["chars"], 1.0),
        "user_special_char_density": _count(user_text, SPECIAL) / np.maximum(u["chars"], 1.0),
        "asst_newline_density": _np(pc.count_substring(asst_text, "\n")) / np.maximum(a["chars"], 1.0),
        "user_question_marks": _np(pc.count_substring(user_text, "?")),
        "user_instruction_keywords": _count(user_text, INSTRUCTION),
        "user_ends_with_question": _flag(u["trimmed"], r"\?$"),
        "asst_capitalised_start": _flag(a["trimmed"], r"^[A-Z]"),
        "asst_final_punctuation": _flag(a["trimmed"], r"[.!?)\"'`]$"),
        "asst_bigram_repetition": np.where(
            a["bigrams"] > 0, 1.0 - _ratio(a["distinct_bigrams"], a["bigrams"]), 0.0
        ),
        "asst_first_person_density": _count(asst_text, FIRST_PERSON) / np.maximum(a["words"], 1.0),
    }
    return np.stack([f[name] for name in FEATURE_NAMES], axis=1).astype(np.float32)
