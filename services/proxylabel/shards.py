"""Input shards: the parquet files a shard job scores, read and checked by their columns' types.

A shard holds a conversation column (`messages` as a list of {role, content}, `prompt` and
`response`, or `text`) and may hold `id`, `embedding` (with the file's `tessera.embedder`
metadata saying which embedder made it) and `gpt_scores` (known scores 0-5, for the evaluation).
Every column a job reads is checked by type before any work (INVALID_ARGUMENT naming the column and
the type expected); messages name the shard as the caller does, never by the server's path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from services.proxylabel.features import Conversations, from_messages, from_pairs, from_texts
from services.runtime.errors import InvalidArgument, NotFound

EMBEDDER_METADATA_KEY = b"tessera.embedder"
ID, EMBEDDING, SCORES = "id", "embedding", "gpt_scores"


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_text(t: pa.DataType) -> bool:
    """Strings (also dictionary-encoded, or a column of nulls only)."""
    if pa.types.is_dictionary(t):
        return _is_string(t.value_type)
    return _is_string(t) or pa.types.is_null(t)


def _is_id(t: pa.DataType) -> bool:
    return (
        _is_text(t)
        or pa.types.is_integer(t)
        or (pa.types.is_dictionary(t) and pa.types.is_integer(t.value_type))
    )


def _column_type(schema: pa.Schema, name: str) -> pa.DataType:
    found = schema.get_all_field_indices(name)
    if len(found) > 1:
        raise InvalidArgument(f"the shard has {len(found)} columns named '{name}'; expected one")
    return schema.field(found[0]).type


def _expect(ok: bool, name: str, t: pa.DataType, expected: str) -> None:
    if not ok:
        raise InvalidArgument(f"column '{name}' has type {t}; expected {expected}")


def text_kind(schema: pa.Schema) -> tuple[str, list[str]]:
    """Which conversation columns a shard has, checked by type; INVALID_ARGUMENT when it has none,
    or when they hold something else than text."""
    names = set(schema.names)
    if "messages" in names:
        t = _column_type(schema, "messages")
        ok = (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_struct(t.value_type)
        fields = {f.name: f.type for f in t.value_type} if ok else {}
        ok = (
            ok
            and {"role", "content"} <= set(fields)
            and all(_is_string(fields[k]) or pa.types.is_null(fields[k]) for k in ("role", "content"))
        )
        _expect(ok, "messages", t, "list<struct<role: string, content: string>>")
        return "messages", ["messages"]
    if {"prompt", "response"} <= names:
        for name in ("prompt", "response"):
            t = _column_type(schema, name)
            _expect(_is_text(t), name, t, "string")
        return "pairs", ["prompt", "response"]
    if "text" in names:
        t = _column_type(schema, "text")
        _expect(_is_text(t), "text", t, "string")
        return "text", ["text"]
    raise InvalidArgument(
        f"the shard has no conversation column: expected 'messages' (list of {{role, content}}), "
        f"'prompt' and 'response', or 'text'; it has {sorted(names)[:20]}"
    )


@dataclass(frozen=True)
class ShardColumns:
    """The columns a job reads from a shard, each checked by its type."""

    text_kind: str  # messages | pairs | text
    names: list[str]  # in the order they are read
    has_id: bool
    has_embedding: bool
    has_scores: bool


def shard_columns(schema: pa.Schema) -> ShardColumns:
    """The conversation columns and those of `id`, `gpt_scores` and `embedding` the shard has,
    checked by type (INVALID_ARGUMENT naming the column and the type expected)."""
    kind, names = text_kind(schema)
    present = set(schema.names)
    has_id, has_embedding, has_scores = ID in present, EMBEDDING in present, SCORES in present
    names = list(names)
    if has_id:
        t = _column_type(schema, ID)
        _expect(_is_id(t), ID, t, "strings or integers")
        names.insert(0, ID)
    if has_scores:
        t = _column_type(schema, SCORES)
        _expect(pa.types.is_integer(t) or pa.types.is_floating(t), SCORES, t, "numbers 0-5")
        names.append(SCORES)
    if has_embedding:
        t = _column_type(schema, EMBEDDING)
        _expect(
            (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
            and pa.types.is_floating(t.value_type),
            EMBEDDING,
            t,
            "a list of floats",
        )
        names.append(EMBEDDING)
    return ShardColumns(kind, names, has_id, has_embedding, has_scores)


def plain_column(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """One array; dictionary-encoded values decoded, a column of nulls only as strings."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_null(arr.type):
        arr = arr.cast(pa.string())
    return arr


def conversations_of(table: pa.Table | pa.RecordBatch, kind: str) -> Conversations:
    if kind == "messages":
        return from_messages(table.column("messages"))
    if kind == "pairs":
        return from_pairs(plain_column(table.column("prompt")), plain_column(table.column("response")))
    return from_texts([t or "" for t in plain_column(table.column("text")).to_pylist()])


def embedding_dimensions(pf: pq.ParquetFile) -> set[int]:
    """What the shard says its embedding width is: the type (fixed-size list), the file's metadata,
    and the first non-null row (read in a small batch, not a whole row group)."""
    found = set()
    t = pf.schema_arrow.field(EMBEDDING).type
    if pa.types.is_fixed_size_list(t):
        found.add(t.list_size)
    meta = embedder_metadata(pf)
    if meta and meta.get("dimension") is not None:
        found.add(meta["dimension"])
    for batch in pf.iter_batches(batch_size=64, columns=[EMBEDDING]):
        lengths = pc.list_value_length(batch.column(0)).drop_null()
        if len(lengths):
            found.add(int(lengths[0].as_py()))
            break
    return found


def embedder_metadata(pf: pq.ParquetFile) -> dict | None:
    """The shard's `tessera.embedder` metadata, checked: a JSON object whose `name` is a string and
    whose `dimension` a positive whole number (INVALID_ARGUMENT otherwise); None without it."""
    raw = (pf.schema_arrow.metadata or {}).get(EMBEDDER_METADATA_KEY)
    if not raw:
        return None
    key = EMBEDDER_METADATA_KEY.decode()
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(
            f"the shard's '{key}' metadata is not JSON; expected an object "
            '{"name": <embedder>, "dimension": <width>}'
        ) from None
    if not isinstance(meta, dict):
        raise InvalidArgument(
            f"the shard's '{key}' metadata is a {type(meta).__name__}; expected an object "
            '{"name": <embedder>, "dimension": <width>}'
        )
    name, dimension = meta.get("name"), meta.get("dimension")
    if name is not None and not isinstance(name, str):
        raise InvalidArgument(
            f"the shard's '{key}' metadata has name {_brief(name)} ({type(name).__name__}); expected a string"
        )
    if isinstance(dimension, str) and dimension.strip().isdigit():
        dimension = int(dimension)
    if dimension is not None and (
        isinstance(dimension, bool) or not isinstance(dimension, int) or dimension <= 0
    ):
        raise InvalidArgument(
            f"the shard's '{key}' metadata has dimension {_brief(dimension)} "
            f"({type(dimension).__name__}); expected a positive whole number"
        )
    return {**meta, "dimension": dimension}


def _brief(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def scrubbed(exc: BaseException, path: Path, label: str) -> str:
    """An exception's text without the server's path in it."""
    return str(exc).replace(str(path), label)


def open_shard(path: Path, label: str | None = None) -> pq.ParquetFile:
    label = str(path) if label is None else label
    try:
        if not path.exists():
            raise NotFound(f"shard {label!r} does not exist")
        if not path.is_file():
            raise InvalidArgument(f"shard {label!r} is not a file")
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InvalidArgument(
            f"shard {label!r} is not a parquet file: {scrubbed(exc, path, label)}"
        ) from None
