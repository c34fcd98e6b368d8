"""Generator of tulu-like parquet shards for the demo, the tests and the benchmark.

Each row is a multi-turn conversation (tulu `messages`: list of {role, content}) of about 1-2k
characters built from templates and topic vocabularies, an `id`, an `embedding` (list<float32>)
and, on a given fraction of rows, `gpt_scores` (0-5). A hidden quality 0-5 drives both the text
(length, structure, punctuation, repetition, register) and the embedding, so a kNN over the
embeddings and the MLP over embedding ⊕ text features both have signal to find.

    tessera-generate-shard out.parquet --rows 10000 --dimension 1024 --labelled 0.1
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from services.proxylabel.features import render

# Score shares of the research's tulu shard (docs/models.md#proxy-label-models).
SCORE_SHARES = (0.062, 0.162, 0.286, 0.293, 0.183, 0.014)
EMBEDDER_METADATA_KEY = b"tessera.embedder"
SYNTHETIC_EMBEDDER = "synthetic"
# The synthetic "embedder": every shard shares its quality directions, whatever the shard's seed.
WORLD_SEED = 7919

Embed = Callable[[list[str]], np.ndarray]

TOPICS = {
    "python": (
        "list comprehension",
        "generator",
        "decorator",
        "virtual environment",
        "dictionary",
        "exception",
        "type hint",
        "unit test",
        "async function",
        "module import",
    ),
    "cooking": (
        "sourdough starter",
        "braised short ribs",
        "risotto",
        "vinaigrette",
        "cast iron pan",
        "knife skills",
        "spice blend",
        "stock reduction",
        "proofing dough",
        "caramelised onions",
    ),
    "history": (
        "the Roman republic",
        "the printing press",
        "the Silk Road",
        "the industrial revolution",
        "the Meiji restoration",
        "the Hanseatic League",
        "the French revolution",
        "medieval guilds",
        "the Bronze Age collapse",
        "the Ottoman court",
    ),
    "finance": (
        "index funds",
        "compound interest",
        "an emergency fund",
        "bond yields",
        "inflation",
        "a household budget",
        "dollar-cost averaging",
        "credit scores",
        "a Roth account",
        "diversification",
    ),
    "biology": (
        "photosynthesis",
        "the immune system",
        "gene expression",
        "cell division",
        "enzymes",
        "the nervous system",
        "evolution by selection",
        "mitochondria",
        "protein folding",
        "ecosystems",
    ),
    "writing": (
        "a cover letter",
        "a short story opening",
        "a product description",
        "a persuasive essay",
        "a wedding toast",
        "a haiku",
        "a press release",
        "meeting notes",
        "a book review",
        "a limerick",
    ),
    "travel": (
        "a week in Kyoto",
        "packing light",
        "train travel in Europe",
        "jet lag",
        "travel insurance",
        "a road trip plan",
        "hiking safety",
        "budget hostels",
        "learning basic phrases",
        "visa rules",
    ),
    "math": (
        "prime numbers",
        "the derivative",
        "probability of dice",
        "matrix multiplication",
        "proof by induction",
        "the Pythagorean theorem",
        "logarithms",
        "expected value",
        "graph colouring",
        "modular arithmetic",
    ),
}

ASKS = (
    "Can you explain {t} to me?",
    "Write a short guide about {t}.",
    "How does {t} work?",
    "Describe {t} in simple terms.",
    "I need help with {t}. Where should I start?",
    "Give me three tips about {t}.",
    "Compare two approaches to {t}.",
    "What is the most common mistake with {t}?",
    "summarize what matters about {t}",
    "explain {t} like I am twelve",
)
FOLLOW_UPS = (
    "Thanks. Can you give an example?",
    "What about edge cases?",
    "Could you make it shorter?",
    "Why does that matter?",
    "Can you list the steps?",
    "ok and then what",
    "Is there a better way?",
)

# Register by quality: what low and high quality answers sound like.
LOW_OPENERS = ("idk, maybe", "well its like", "um so", "yeah so basically", "not sure but", "i think")
LOW_FILLER = (
    "it is kind of a thing",
    "you just do the thing",
    "stuff happens and then it works",
    "it depends on stuff",
    "people say its good",
    "thats basically it i guess",
    "whatever works",
)
MID_SENTENCES = (
    "{T} is a useful idea that many people use.",
    "The basic point of {t} is easy to follow.",
    "You can practise {t} a little every day.",
    "Most people learn {t} by trying it.",
    "There are a few things to watch out for with {t}.",
    "It helps to start small with {t}.",
)
HIGH_SENTENCES = (
    "{T} rests on a precise principle: each step preserves an invariant you can check.",
    "A careful approach to {t} separates the essential constraints from incidental detail.",
    "In practice, {t} rewards deliberate, measurable iteration rather than guesswork.",
    "The key trade-off in {t} is between simplicity and generality; state it explicitly.",
    "Experts approach {t} by verifying assumptions early and documenting the reasoning.",
    "Consider a concrete example of {t}, then generalise from the pattern it reveals.",
)
HIGH_LIST = (
    "Define the goal and the constraints.",
    "Work through a small, concrete example.",
    "Check the result against an independent estimate.",
    "Note the common failure modes.",
    "Summarise what generalises and what does not.",
)
CODE = '```python\ndef example(items):\n    """Return the squares of the even items."""\n    return [x * x for x in items if x % 2 == 0]\n```'


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _answer(rng: np.random.Generator, quality: int, topic: str, kind: str) -> str:
    """One assistant message; length, structure and register grow with quality."""
    t, big = topic, _cap(topic)
    if quality <= 1:
        n = int(rng.integers(4, 9)) if quality == 0 else int(rng.integers(7, 13))
        words = [str(rng.choice(LOW_OPENERS))] + [str(rng.choice(LOW_FILLER)) for _ in range(n)]
        if quality == 0:
            words += [words[-1]] * 2  # the repetition of a degenerate answer
        text = " ".join(words) + f" about {t}"
        return text if quality == 0 else _cap(text)
    if quality == 2:
        sentences = [
            str(rng.choice(MID_SENTENCES)).format(t=t, T=big) for _ in range(int(rng.integers(6, 11)))
        ]
        half = len(sentences) // 2
        return " ".join(sentences[:half]) + "\n\n" + " ".join(sentences[half:])
    sentences = [str(rng.choice(HIGH_SENTENCES)).format(t=t, T=big) for _ in range(int(rng.integers(4, 8)))]
    half = len(sentences) // 2
    parts = [" ".join(sentences[:half]), " ".join(sentences[half:])]
    if quality >= 4:
        items = rng.choice(len(HIGH_LIST), size=int(rng.integers(3, 6)), replace=False)
        parts.append("\n".join(f"{i + 1}. {HIGH_LIST[j]}" for i, j in enumerate(items)))
    if quality >= 4 and kind == "python":
        parts.append(CODE)
    if quality == 5:
        parts.insert(0, f"## {big}")
        parts.append("In short: " + str(rng.choice(HIGH_SENTENCES)).format(t=t, T=big))
    return "\n\n".join(parts)


def conversation(rng: np.random.Generator, quality: int) -> list[dict[str, str]]:
    kind = str(rng.choice(list(TOPICS)))
    topic = str(rng.choice(TOPICS[kind]))
    messages = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": "You are a helpful assistant."})
    turns = int(rng.integers(2, 5))
    for turn in range(turns):
        ask = str(rng.choice(ASKS)).format(t=topic) if turn == 0 else str(rng.choice(FOLLOW_UPS))
        if turn == 0 and rng.random() < 0.5:
            ask += f" Context: I am learning about {kind} and {topic} keeps coming up in my notes."
        messages.append({"role": "user", "content": ask})
        messages.append({"role": "assistant", "content": _answer(rng, quality, topic, kind)})
    return messages


def synthetic_embeddings(
    rng: np.random.Generator,
    quality: np.ndarray,
    dimension: int,
    directions: np.ndarray,
    signal: float | None = None,
) -> np.ndarray:
    """Unit vectors: noise plus a quality direction (ordered: neighbouring scores lie close).

    The default signal, 0.35 / dimension^(1/4), gives a kNN accuracy near the research's (~0.45)
    at any dimension: more dimensions average the noise out, so the signal shrinks with them.
    """
    signal = 0.35 / dimension**0.25 if signal is None else signal
    noise = rng.standard_normal((len(quality), dimension)).astype(np.float32) / np.sqrt(dimension)
    x = noise + signal * directions[quality]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def quality_directions(dimension: int, world_seed: int = WORLD_SEED) -> np.ndarray:
    """Six unit directions: a direction of each score's own plus a path between two random ones,
    so scores are separable and 2 and 3 still lie closer than 0 and 5 (real quality is ordinal)."""
    rng = np.random.default_rng(world_seed)
    a, b = rng.standard_normal((2, dimension))
    own = rng.standard_normal((6, dimension))
    d = np.stack([0.7 * own[s] + 0.7 * ((1 - s / 5) * a + (s / 5) * b) for s in range(6)])
    return (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)


def generate_batches(
    rows: int,
    *,
    dimension: int = 384,
    labelled_fraction: float = 0.1,
    seed: int = 0,
    batch_rows: int = 1000,
    embed: Embed | None = None,
    id_prefix: str = "row",
    start: int = 0,
) -> Iterator[pa.RecordBatch]:
    """Record batches of generated rows (id, messages, embedding, gpt_scores)."""
    rng = np.random.default_rng(seed)
    directions = quality_directions(dimension)
    for lo in range(0, rows, batch_rows):
        n = min(batch_rows, rows - lo)
        quality = rng.choice(6, size=n, p=np.asarray(SCORE_SHARES) / sum(SCORE_SHARES))
        # The text shows the quality with noise, as real answers do: scores are not a function of style.
        shown = np.clip(quality + rng.choice([-1, 0, 1], size=n, p=[0.2, 0.6, 0.2]), 0, 5)
        convs = [conversation(rng, int(q)) for q in shown]
        if embed is not None:
            texts = render(*zip(*[_sides(c) for c in convs], strict=True)) if convs else []
            emb = np.asarray(embed(texts), np.float32)
        else:
            emb = synthetic_embeddings(rng, quality, dimension, directions)
        labelled = rng.random(n) < labelled_fraction
        scores = pa.array(np.where(labelled, quality, 0).astype(np.int8), mask=~labelled)
        ids = pa.array([f"{id_prefix}-{start + lo + i:08d}" for i in range(n)])
        yield pa.RecordBatch.from_arrays(
            [ids, pa.array(convs, MESSAGES_TYPE), pa.array(list(emb), pa.list_(pa.float32())), scores],
            schema=schema(None),
        )


MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def schema(embedder: str | None, dimension: int | None = None) -> pa.Schema:
    s = pa.schema(
        [
            ("id", pa.string()),
            ("messages", MESSAGES_TYPE),
            ("embedding", pa.list_(pa.float32())),
            ("gpt_scores", pa.int8()),
        ]
    )
    if embedder:
        s = s.with_metadata({EMBEDDER_METADATA_KEY: json.dumps({"name": embedder, "dimension": dimension})})
    return s


def _sides(messages: list[dict[str, str]]) -> tuple[str, str]:
    user = "\n\n".join(m["content"] for m in messages if m["role"] == "user")
    assistant = "\n\n".join(m["content"] for m in messages if m["role"] == "assistant")
    return user, assistant


def write_shard(
    path: Path,
    rows: int,
    *,
    dimension: int = 384,
    labelled_fraction: float = 0.1,
    seed: int = 0,
    row_group_rows: int = 1000,
    embed: Embed | None = None,
    embedder_name: str | None = None,
    id_prefix: str = "row",
) -> Path:
    """Write a generated shard, one row group per `row_group_rows` rows (memory stays bounded).

    The embedder's name goes into the file's metadata (`tessera.embedder`) so a job can refuse an
    index built by another embedder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = embedder_name or (None if embed is not None else SYNTHETIC_EMBEDDER)
    tmp = path.with_name(f".{path.name}.tmp")
    with pq.ParquetWriter(tmp, schema(name, dimension)) as writer:
        for batch in generate_batches(
            rows,
            dimension=dimension,
            labelled_fraction=labelled_fraction,
            seed=seed,
            batch_rows=row_group_rows,
            embed=embed,
            id_prefix=id_prefix,
        ):
            writer.write_table(
                pa.Table.from_batches([batch]).replace_schema_metadata(writer.schema.metadata),
                row_group_size=row_group_rows,
            )
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tessera-generate-shard", description=__doc__.splitlines()[0])
    p.add_argument("output", type=Path)
    p.add_argument("--rows", type=int, default=10_000)
    p.add_argument("--dimension", type=int, default=384)
    p.add_argument("--labelled", type=float, default=0.1, help="fraction of rows with gpt_scores")
    p.add_argument("--row-group-rows", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--embedder-dir", type=Path, help="embed the texts with this text_embedder version directory"
    )
    args = p.parse_args(argv)
    embed, name, dim = None, None, args.dimension
    if args.embedder_dir:
        from services.proxylabel.embedder import embed_offline  # only when asked: it loads ONNX Runtime

        meta = json.loads((args.embedder_dir / "embedder.json").read_text())
        name, dim = meta["name"], int(meta["dimension"])

        def embed(texts: list[str]) -> np.ndarray:
            return embed_offline(args.embedder_dir, texts)

    write_shard(
        args.output,
        args.rows,
        dimension=dim,
        labelled_fraction=args.labelled,
        seed=args.seed,
        row_group_rows=args.row_group_rows,
        embed=embed,
        embedder_name=name,
    )
    print(f"{args.output}: {args.rows} rows, dimension {dim}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
