"""A load generator for every public RPC of the gateway: status counts and a latency histogram.

    .venv/bin/python bench/loadgen.py --suite --rpc ClassifyEmotion --concurrency 16 --duration 10
    .venv/bin/python bench/loadgen.py --target 127.0.0.1:50051 --rpc all --rate 20 --count 100 --json out.json

`--rpc` is one of RPCS (repeatable, or `all`); without `--rate` the load is a closed loop
(`--concurrency` callers, each starting its next call when the last one ended); with `--rate`
calls start at that many per second (open loop), at most `--concurrency` in flight (a start that
finds them all busy waits for one, and counts as `late`). Every run is bounded: `--duration`
seconds and/or `--count` calls (100 calls when neither is given). Each call has its own deadline
(`--deadline`). `--suite` starts the suite on loopback (launcher.suite) and loads its gateway.

What is sent (`Payload`): the astronaut photo (JPEG) for ClassifyEmotion; 30 frames of a generated
640×480 webcam clip for ScoreClip and StreamVideo (`--fps` paces StreamVideo's frames, 0 sends
them at once); four text rows (the service embeds them) for ScoreTexts; a 64-row shard embedded
with the served text embedder for ScoreShard (`--shard`, which must lie under the proxylabel
service's input roots, and `--shard-output`, a directory under its output roots: each call writes
a new job under it; `--suite` makes both); a well-formed job id that names no job for
Get/CancelShardJob (NOT_FOUND).

Importable (tests, benchmarks): `run(target, rpc, ...)` → LoadResult (`.table()`, `.to_json()`,
`.codes`, `.percentiles()`); `run_load` is the same as a coroutine.

Over 500 lines on purpose: one payload and one call per public RPC (twenty of them) live beside the
loop that drives them, so adding an RPC is one edit here.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tessera.common.v1 import common_pb2  # noqa: E402
from tessera.gateway.v1 import gateway_service_pb2 as pb  # noqa: E402
from tessera.gateway.v1 import gateway_service_pb2_grpc as pb_grpc  # noqa: E402
from tessera.proxylabel.v1 import proxylabel_service_pb2 as proxylabel_pb  # noqa: E402

RPCS = (
    "ClassifyEmotion",
    "ScoreClip",
    "StreamVideo",
    "ScoreTexts",
    "ScoreShard",
    "GetShardJob",
    "ListShardJobs",
    "CancelShardJob",
    "GetStatus",
)
CLIP_LEVELS = {"engagement": 3, "boredom": 0, "confusion": 2, "frustration": 1}
MAX_MESSAGE = 64 * 1024 * 1024


# ------------------------------------------------------------------------------------------------
# What each call sends
def astronaut_jpeg() -> bytes:
    import cv2
    from skimage import data as skdata

    return cv2.imencode(".jpg", cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))[1].tobytes()


def clip_frames(n: int = 30, seed: int = 3) -> list[bytes]:
    from tools.modeller.engagement.generate import encode_jpeg, make_clip

    return [encode_jpeg(f) for f in make_clip(CLIP_LEVELS, n_frames=n, seed=seed)]


def text_rows(n: int = 4) -> list[proxylabel_pb.TextRow]:
    texts = [
        ("How do I boil an egg?", "Simmer it for nine minutes, then cool it in cold water."),
        ("Name three prime numbers.", "2, 3 and 5."),
        ("Write a haiku about rain.", "Grey sky softly weeps / puddles gather light / the street hums"),
        ("What is the capital of France?", "Paris."),
    ]
    return [
        proxylabel_pb.TextRow(id=f"row-{i}", text=text, response=response)
        for i, (text, response) in ((i, texts[i % len(texts)]) for i in range(n))
    ]


def write_shard(
    path: Path, rows: int = 64, seed: int = 5, repository: Path = ROOT / "model_repository"
) -> Path:
    """A generated tulu-like shard embedded by the repository's text embedder (what the served kNN
    index was built with), as `make demo` makes its shard; kept once written."""
    from services.proxylabel.embedder import embed_offline
    from tools.modeller.proxylabel.generate import write_shard as generate

    if not path.exists():
        embedder = repository / "text_embedder"
        generate(
            path,
            rows,
            labelled_fraction=0.5,
            seed=seed,
            row_group_rows=16,
            id_prefix="load",
            embed=lambda texts: embed_offline(embedder, texts),
            embedder_name="sentence-transformers/all-MiniLM-L6-v2",
        )
    return path


@dataclass
class Payload:
    """The requests a run sends; every field has a default that the suite answers with OK
    (NOT_FOUND for the job id, which names no job)."""

    image: bytes = b""
    frames: list[bytes] = field(default_factory=list)
    fps: float = 0.0  # StreamVideo pacing; 0: as fast as the stream takes them
    rows: list[proxylabel_pb.TextRow] = field(default_factory=list)
    shard: Path | None = None
    shard_output: Path | None = None  # each ScoreShard call writes <shard_output>/<run>-<n>
    job_id: str = "0" * 32
    mode: pb.EmotionMode = pb.EMOTION_MODE_UNSPECIFIED

    def ready_for(self, rpcs: Sequence[str]) -> Payload:
        """Fill what the given RPCs need and is still empty (generated once)."""
        if "ClassifyEmotion" in rpcs and not self.image:
            self.image = astronaut_jpeg()
        if {"ScoreClip", "StreamVideo"} & set(rpcs) and not self.frames:
            self.frames = clip_frames()
        if "ScoreTexts" in rpcs and not self.rows:
            self.rows = text_rows()
        if "ScoreShard" in rpcs and (self.shard is None or self.shard_output is None):
            raise ValueError(
                "ScoreShard needs a shard (under the service's input roots) and an output directory"
            )
        return self


# ------------------------------------------------------------------------------------------------
# One call of each RPC: returns the number of answers (stream messages) and item-level codes.
@dataclass
class Outcome:
    answers: int = 1
    item_codes: list[str] = field(default_factory=list)


def _code_name(value: int) -> str:
    return next((c.name for c in grpc.StatusCode if c.value[0] == value), f"CODE_{value}")


def _clip_messages(cls: type, payload: Payload, clip_id: str) -> Iterator[Any]:
    yield cls(header=pb.ClipHeader(clip_id=clip_id, fps=payload.fps or 30.0))
    for i, frame in enumerate(payload.frames):
        yield cls(
            frame=common_pb2.VideoFrame(timestamp_us=int(i * 1e6 / 30), image=common_pb2.Image(encoded=frame))
        )


async def _paced(messages: Iterator[Any], fps: float) -> AsyncIterator[Any]:
    start = time.perf_counter()
    for i, message in enumerate(messages):
        if fps > 0 and i > 1:  # the header and the first frame go at once
            delay = start + (i - 1) / fps - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        yield message


CallFn = Callable[[pb_grpc.GatewayServiceStub, Payload, float, tuple, int], Awaitable[Outcome]]


async def _classify(stub: Any, p: Payload, timeout: float, md: tuple, n: int) -> Outcome:
    reply = await stub.ClassifyEmotion(
        pb.ClassifyEmotionRequest(images=[common_pb2.Image(encoded=p.image)], mode=p.mode),
        timeout=timeout,
        metadata=md,
    )
    return Outcome(item_codes=[_code_name(i.status.code) for i in reply.images if i.status.code])


async def _score_clip(stub: Any, p: Payload, timeout: float, md: tuple, n: int) -> Outcome:
    reply = await stub.ScoreClip(
        iter(list(_clip_messages(pb.ScoreClipRequest, p, f"load-{n}"))), timeout=timeout, metadata=md
    )
    return Outcome(answers=1 if reply.frames_received == len(p.frames) else 0)


async def _stream_video(stub: Any, p: Payload, timeout: float, md: tuple, n: int) -> Outcome:
    call = stub.StreamVideo(
        _paced(_clip_messages(pb.StreamVideoRequest, p, f"load-{n}"), p.fps), timeout=timeout, metadata=md
    )
    out = Outcome(answers=0)
    try:
        async for reply in call:
            out.answers += 1
            if reply.status.code:
                out.item_codes.append(_code_name(reply.status.code))
    finally:
        call.cancel()
    return out


async def _score_texts(stub: Any, p: Payload, timeout: float, md: tuple, n: int) -> Outcome:
    reply = await stub.ScoreTexts(pb.ScoreTextsRequest(rows=p.rows), timeout=timeout, metadata=md)
    return Outcome(item_codes=[_code_name(r.status.code) for r in reply.rows if r.status.code])


async def _score_shard(stub: Any, p: Payload, timeout: float, md: tuple, n: int) -> Outcome:
    assert p.shard is not None and p.shard_output is not None
    out_dir = p.shard_output / f"{_RUN_ID}-{next(_JOBS)}"  # a new job each call, across runs too
    call = stub.ScoreShard(
        pb.ScoreShardRequest(input_path=str(p.shard), output_path=str(out_dir)), timeout=timeout, metadata=md
    )
    out = Outcome(answers=0)
    try:
        async for event in call:
            out.answers += 1
            if event.WhichOneof("event") == "summary" and event.summary.rows_failed:
                out.item_codes += ["row failed"] * int(event.summary.rows_failed)
    finally:
        call.cancel()
    return out


async def _get_job(stub: Any, p: Payload, timeout: float, md: tuple, n: int) -> Outcome:
    await stub.GetShardJob(pb.GetShardJobRequest(job_id=p.job_id), timeout=timeout, metadata=md)
    return Outcome()


async def _list_jobs(stub: Any, p: Payload, timeout: float, md: tuple, n: int) -> Outcome:
    await stub.ListShardJobs(pb.ListShardJobsRequest(), timeout=timeout, metadata=md)
    return Outcome()


async def _cancel_job(stub: Any, p: Payload, timeout: float, md: tuple, n: int) -> Outcome:
    await stub.CancelShardJob(pb.CancelShardJobRequest(job_id=p.job_id), timeout=timeout, metadata=md)
    return Outcome()


async def _status(stub: Any, p: Payload, timeout: float, md: tuple, n: int) -> Outcome:
    await stub.GetStatus(pb.GetStatusRequest(), timeout=timeout, metadata=md)
    return Outcome()


CALLS: dict[str, CallFn] = {
    "ClassifyEmotion": _classify,
    "ScoreClip": _score_clip,
    "StreamVideo": _stream_video,
    "ScoreTexts": _score_texts,
    "ScoreShard": _score_shard,
    "GetShardJob": _get_job,
    "ListShardJobs": _list_jobs,
    "CancelShardJob": _cancel_job,
    "GetStatus": _status,
}
_RUN_ID = uuid.uuid4().hex[:8]
_JOBS = itertools.count()


# ------------------------------------------------------------------------------------------------
# Results
def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (nan when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# Histogram bucket upper bounds, seconds (roughly log-spaced; the last catches everything).
BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, math.inf)


@dataclass
class Call:
    """One finished call."""

    start: float  # seconds since the run started
    seconds: float
    code: str
    deadline: float
    answers: int = 0
    item_codes: list[str] = field(default_factory=list)
    detail: str = ""


@dataclass
class LoadResult:
    rpc: str
    target: str
    concurrency: int
    rate: float | None
    deadline: float
    wall_seconds: float = 0.0
    calls: list[Call] = field(default_factory=list)
    late: int = 0  # open loop: starts that waited for a free slot

    @property
    def codes(self) -> Counter[str]:
        return Counter(c.code for c in self.calls)

    @property
    def item_codes(self) -> Counter[str]:
        return Counter(code for c in self.calls for code in c.item_codes)

    def count(self, *codes: str) -> int:
        return sum(self.codes[c] for c in codes)

    def overruns(self, slack: float) -> list[Call]:
        """Calls that ended later than their deadline + slack, as this client measured them."""
        return [c for c in self.calls if c.seconds > c.deadline + slack]

    def percentiles(self, code: str | None = None) -> dict[str, float]:
        """p50/p95/p99/max latency in seconds, of every call or of those that ended with `code`."""
        values = sorted(c.seconds for c in self.calls if code is None or c.code == code)
        return {
            "n": len(values),
            "p50": percentile(values, 50),
            "p95": percentile(values, 95),
            "p99": percentile(values, 99),
            "max": values[-1] if values else math.nan,
        }

    def histogram(self) -> list[tuple[float, int]]:
        """(bucket upper bound in seconds, calls) per bucket; a call counts in the first bucket it fits."""
        counts = [0] * len(BUCKETS)
        for c in self.calls:
            counts[next(i for i, b in enumerate(BUCKETS) if c.seconds <= b)] += 1
        return list(zip(BUCKETS, counts, strict=True))

    @property
    def throughput(self) -> float:
        return len(self.calls) / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        def clean(d: dict[str, float]) -> dict[str, float | None]:
            return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}

        return {
            "rpc": self.rpc,
            "target": self.target,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "deadline_seconds": self.deadline,
            "wall_seconds": round(self.wall_seconds, 3),
            "calls": len(self.calls),
            "calls_per_second": round(self.throughput, 3),
            "late_starts": self.late,
            "codes": dict(self.codes),
            "item_codes": dict(self.item_codes),
            "latency_seconds": clean(self.percentiles()),
            "latency_seconds_by_code": {code: clean(self.percentiles(code)) for code in sorted(self.codes)},
            "histogram": [
                {"le": "+Inf" if math.isinf(b) else b, "calls": n} for b, n in self.histogram() if n
            ],
            "errors": sorted({c.detail for c in self.calls if c.detail})[:10],
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def table(self) -> str:
        mode = f"{self.rate:g}/s open loop" if self.rate else "closed loop"
        lines = [
            f"{self.rpc} → {self.target}: {len(self.calls)} calls in {self.wall_seconds:.1f} s "
            f"({self.throughput:.1f}/s), concurrency {self.concurrency}, {mode}, "
            f"deadline {self.deadline:g} s" + (f", {self.late} late starts" if self.late else "")
        ]
        header = f"  {'status':<22}{'calls':>7}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'max ms':>10}"
        lines += [header, "  " + "-" * (len(header) - 2)]
        rows = [(code, self.percentiles(code)) for code, _ in self.codes.most_common()]
        rows.append(("all", self.percentiles()))
        for code, p in rows:
            lines.append(
                f"  {code:<22}{p['n']:>7}"
                + "".join(f"{p[k] * 1e3:>10.1f}" for k in ("p50", "p95", "p99", "max"))
            )
        if self.item_codes:
            lines.append(
                "  item-level statuses: " + ", ".join(f"{k} {v}" for k, v in self.item_codes.most_common())
            )
        for detail in self.to_dict()["errors"][:3]:
            lines.append(f"  e.g. {detail[:160]}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Running a load
def open_channels(target: str, n: int) -> list[grpc.aio.Channel]:
    """n channels to the target, each on a connection of its own."""
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    return [grpc.aio.insecure_channel(target, options=options) for _ in range(max(1, n))]


async def run_load(
    target: str,
    rpc: str,
    *,
    concurrency: int = 1,
    rate: float | None = None,
    duration: float | None = None,
    count: int | None = None,
    deadline: float = 10.0,
    payload: Payload | None = None,
    token: str | None = None,
    channels: int = 1,
    call: CallFn | None = None,
) -> LoadResult:
    """Run one RPC as a closed loop (rate None: `concurrency` callers back to back) or an open loop
    (`rate` starts per second, at most `concurrency` in flight), for `duration` seconds and/or
    `count` calls (100 when neither is given). `call` replaces the RPC's own call function."""
    if rpc not in CALLS and call is None:
        raise ValueError(f"unknown RPC {rpc!r}; one of {', '.join(RPCS)}")
    if concurrency < 1 or (rate is not None and rate <= 0) or deadline <= 0:
        raise ValueError("concurrency ≥ 1, rate > 0 and deadline > 0")
    if duration is None and count is None:
        count = 100
    payload = (payload or Payload()).ready_for([rpc])
    fn = call or CALLS[rpc]
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    result = LoadResult(rpc, target, concurrency, rate, deadline)
    chans = open_channels(target, channels)
    stubs = [pb_grpc.GatewayServiceStub(c) for c in chans]
    started = time.perf_counter()
    stop_at = started + duration if duration is not None else math.inf
    issued = 0

    def take() -> int | None:
        nonlocal issued
        if (count is not None and issued >= count) or time.perf_counter() >= stop_at:
            return None
        issued += 1
        return issued - 1

    async def one(n: int) -> None:
        t0 = time.perf_counter()
        outcome, code, detail = Outcome(answers=0), "OK", ""
        try:
            outcome = await asyncio.wait_for(
                fn(stubs[n % len(stubs)], payload, deadline, metadata, n), deadline + 30
            )  # a client-side backstop only
        except grpc.aio.AioRpcError as exc:
            code, detail = exc.code().name, f"{exc.code().name}: {exc.details()}"
        except TimeoutError:
            code, detail = "CLIENT_TIMEOUT", "no status within the deadline + 30 s"
        result.calls.append(
            Call(
                t0 - started,
                time.perf_counter() - t0,
                code,
                deadline,
                outcome.answers,
                outcome.item_codes,
                detail,
            )
        )

    try:
        if rate is None:

            async def worker() -> None:
                while (n := take()) is not None:
                    await one(n)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            slots = asyncio.Semaphore(concurrency)
            tasks: set[asyncio.Task[None]] = set()

            async def guarded(n: int) -> None:
                try:
                    await one(n)
                finally:
                    slots.release()

            i = 0
            while True:
                due = started + i / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if slots.locked():
                    result.late += 1
                await slots.acquire()
                n = take()
                if n is None:
                    slots.release()
                    break
                task = asyncio.create_task(guarded(n))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            if tasks:
                await asyncio.gather(*tasks)
    finally:
        result.wall_seconds = time.perf_counter() - started
        for c in chans:
            await c.close(None)  # grace None: cancel what is left (grpc-stubs drop the default)
    result.calls.sort(key=lambda c: c.start)
    return result


def run(target: str, rpc: str, **kwargs: Any) -> LoadResult:
    """run_load in an event loop of its own (for callers without one)."""
    return asyncio.run(run_load(target, rpc, **kwargs))


# ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="the gateway, host:port")
    where.add_argument(
        "--suite", action="store_true", help="start the suite on loopback and load its gateway"
    )
    p.add_argument(
        "--rpc", action="append", choices=[*RPCS, "all"], help="repeatable; default ClassifyEmotion"
    )
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--rate", type=float, default=None, help="calls started per second (open loop)")
    p.add_argument("--duration", type=float, default=None, help="seconds per RPC")
    p.add_argument("--count", type=int, default=None, help="calls per RPC")
    p.add_argument("--deadline", type=float, default=10.0, help="seconds, per call")
    p.add_argument("--channels", type=int, default=1, help="connections to the target")
    p.add_argument("--token", default=None)
    p.add_argument("--fps", type=float, default=0.0, help="StreamVideo: frames per second (0: unpaced)")
    p.add_argument("--image", type=Path, help="ClassifyEmotion: this photo instead of the astronaut")
    p.add_argument("--shard", type=Path, help="ScoreShard: a parquet shard under the service's input roots")
    p.add_argument(
        "--shard-output", type=Path, help="ScoreShard: a directory under the service's output roots"
    )
    p.add_argument("--json", type=Path, help="also write the results as JSON (a list, one object per RPC)")
    args = p.parse_args(argv)
    rpcs = ["ClassifyEmotion"] if not args.rpc else list(RPCS) if "all" in args.rpc else args.rpc
    payload = Payload(
        image=args.image.read_bytes() if args.image else b"",
        fps=args.fps,
        shard=args.shard,
        shard_output=args.shard_output,
    )

    def load_all(target: str) -> list[LoadResult]:
        results = []
        for rpc in rpcs:
            result = run(
                target,
                rpc,
                concurrency=args.concurrency,
                rate=args.rate,
                duration=args.duration,
                count=args.count,
                deadline=args.deadline,
                payload=payload,
                token=args.token,
                channels=args.channels,
            )
            print(result.table(), flush=True)
            results.append(result)
        return results

    if args.suite:
        from launcher.suite import Suite

        with tempfile.TemporaryDirectory(prefix="tessera-loadgen-") as tmp:
            work = Path(tmp)
            if "ScoreShard" in rpcs:
                payload.shard = payload.shard or write_shard(work / "data" / "shard.parquet")
                payload.shard_output = payload.shard_output or work / "data" / "out"
            with Suite(work / "suite", data_roots=(work / "data",)) as suite:
                results = load_all(suite.gateway.target)
    else:
        if "ScoreShard" in rpcs and (payload.shard is None or payload.shard_output is None):
            p.error(
                "ScoreShard against --target needs --shard and --shard-output (paths the service can reach)"
            )
        results = load_all(args.target)
    if args.json:
        args.json.write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
