"""Shard scoring end to end through the gateway vs faiss exact search alone, same data, same run.

    .venv/bin/python bench/bench_shards.py [--rows 300000] [--labelled 30000] [--dim 1024]
                                           [--mode knn|ensemble] [--quick]

docs/benchmarks.md#targets: end-to-end rows/s ≥ 0.8 × faiss exact search alone (IndexFlatIP, K=50); memory
independent of shard size. The shards (synthetic unit-vector embeddings, row groups of 10k rows)
are generated once per (rows, labelled, dim) under .cache/bench/; the kNN index and a demo MLP of
the matching input dimension are built into a temporary repository (no text embedder: every row
carries its embedding). `--quick` is a smoke run: 20k rows, 3k labelled, 384-d.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import results  # noqa: E402
from launcher.suite import Suite  # noqa: E402
from services.proxylabel.features import compute_features  # noqa: E402
from services.proxylabel.knn import KnnOptions  # noqa: E402
from tessera_client import TesseraClient  # noqa: E402
from tools.modeller.proxylabel import generate  # noqa: E402
from tools.modeller.proxylabel.build_index import build_index, labelled_rows  # noqa: E402
from tools.modeller.proxylabel.train_mlp import train_mlp as fit_mlp  # noqa: E402
from tools.modeller.proxylabel.train_mlp import write_mlp  # noqa: E402

CACHE = ROOT / ".cache" / "bench"
ROW_GROUP_ROWS = 10_000
K = 50


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def shards(rows: int, labelled: int, dim: int) -> tuple[Path, Path]:
    """The labelled shard and the scoring shard, generated once per arguments (and generator source)."""
    h = hashlib.sha256(f"{rows}|{labelled}|{dim}|{ROW_GROUP_ROWS}".encode())
    h.update(Path(generate.__file__).read_bytes())
    d = CACHE / f"shards-{rows}-{labelled}-{dim}-{h.hexdigest()[:10]}"
    lab, score = d / "labelled.parquet", d / "scoring.parquet"
    if not lab.is_file():
        t = time.perf_counter()
        generate.write_shard(
            lab,
            labelled,
            dimension=dim,
            labelled_fraction=1.0,
            seed=11,
            row_group_rows=ROW_GROUP_ROWS,
            id_prefix="lab",
        )
        log(f"labelled shard: {labelled} rows in {time.perf_counter() - t:.0f}s")
    if not score.is_file():
        t = time.perf_counter()
        generate.write_shard(
            score,
            rows,
            dimension=dim,
            labelled_fraction=0.1,
            seed=12,
            row_group_rows=ROW_GROUP_ROWS,
            id_prefix="row",
        )
        log(f"scoring shard: {rows} rows in {time.perf_counter() - t:.0f}s")
    return lab, score


def build_repo(labelled: Path, repo: Path) -> None:
    t = time.perf_counter()
    build_index([labelled], repo, KnnOptions(k=K))
    rows = labelled_rows([labelled])
    model, meta = fit_mlp(
        rows.embeddings,
        compute_features(rows.conversations),
        rows.labels,
        rows.embedder,
        hidden=(128,),
        seed=0,
        max_iter=30,
        demo=True,
    )
    write_mlp(repo, model, meta)
    log(f"kNN index + demo MLP built in {time.perf_counter() - t:.0f}s")


def embeddings_of(table) -> np.ndarray:
    col = table.column("embedding").combine_chunks()
    flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
    return flat.reshape(len(col), -1).astype(np.float32, copy=False)


FAISS_ROW_GROUPS = 10  # of the scoring shard's 30 at full size: the rate per row is the same


def faiss_alone(labelled: Path, scoring: Path, row_groups: int = FAISS_ROW_GROUPS) -> tuple[float, int]:
    """IndexFlatIP over the labelled embeddings, K=50, the scoring shard's first `row_groups` row
    groups searched one by one. Each row group is the same search against the same index, so a
    third of the shard gives the rate of all of it in a third of the time (5 min at full size)."""
    import faiss

    index = None
    pf = pq.ParquetFile(labelled)
    for rg in range(pf.num_row_groups):
        x = embeddings_of(pf.read_row_group(rg, columns=["embedding"]))
        if index is None:
            index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
    if index is None:
        raise ValueError(f"{labelled}: no row groups to index")
    pf = pq.ParquetFile(scoring)
    n = 0
    t = time.perf_counter()
    for rg in range(min(row_groups, pf.num_row_groups)):
        q = embeddings_of(pf.read_row_group(rg, columns=["embedding"]))
        index.search(q, K)
        n += len(q)
    return n / (time.perf_counter() - t), n


def hwm_kib(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) of a process, KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0])
    return fields["VmHWM"], fields["VmRSS"]


def rules_file(mode: str, path: Path) -> Path:
    text = (ROOT / "config" / "fusion_rules.yaml").read_text()
    head, sep, tail = text.partition("\nproxylabel:\n")
    tail, count = re.subn(r"(?m)^  mode: \w+", f"  mode: {mode}", tail, count=1)
    if not sep or count != 1:
        raise SystemExit("config/fusion_rules.yaml: no proxylabel mode to edit")
    path.write_text(head + sep + tail)
    return path


def end_to_end(repo: Path, rules: Path, scoring: Path, work: Path) -> dict:
    out = work / "out"
    with Suite(work / "suite", repository=repo, rules=rules, data_roots=(scoring.parent, work)) as suite:
        pid = suite.processes["proxylabel"].popen.pid
        hwm_start, _ = hwm_kib(pid)
        summary = None
        peak_progress_rss = 0
        first_part_rss = None  # after the first part: what the job holds before the shard's size counts
        with TesseraClient(suite.gateway.target) as client:
            t = time.perf_counter()
            for event in client.score_shard(scoring, out):
                if event.HasField("summary"):
                    summary = event.summary
                else:
                    rss = hwm_kib(pid)[1]
                    peak_progress_rss = max(peak_progress_rss, rss)
                    if first_part_rss is None and event.progress.rows_done > 0:
                        first_part_rss = rss
            wall = time.perf_counter() - t
        hwm_end, rss_end = hwm_kib(pid)
    if summary is None:
        raise SystemExit("score_shard ended without a summary")
    return {
        "summary": summary,
        "wall": wall,
        "hwm_start": hwm_start,
        "hwm_end": hwm_end,
        "rss_end": rss_end,
        "rss_during": peak_progress_rss,
        "rss_first_part": first_part_rss or 0,
        "out": out,
    }


def check_output(out: Path, scoring: Path) -> tuple[bool, str]:
    want = pq.read_table(scoring, columns=["id"]).column("id").to_pylist()
    got: list[str] = []
    for part in sorted(out.glob("part-*.parquet")):
        got += pq.read_table(part, columns=["id"]).column("id").to_pylist()
    dupes = len(got) - len(set(got))
    missing = len(set(want) - set(got))
    extra = len(set(got) - set(want))
    ok = dupes == 0 and missing == 0 and extra == 0 and len(got) == len(want)
    return (
        ok,
        f"{len(got)} ids in {len(list(out.glob('part-*.parquet')))} parts, {dupes} duplicated, "
        f"{missing} missing, {extra} unknown",
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--labelled", type=int, default=30_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--mode", choices=("knn", "ensemble"), default="knn")
    p.add_argument("--quick", action="store_true", help="20k rows, 3k labelled, 384-d (a smoke run)")
    args = p.parse_args()
    if args.quick:
        args.rows, args.labelled, args.dim = 20_000, 3_000, 384

    lab, scoring = shards(args.rows, args.labelled, args.dim)
    work = Path(tempfile.mkdtemp(prefix="tessera-bench-shards-"))
    try:
        # faiss first: after the MLP is trained in this process (scikit-learn, ONNX Runtime thread
        # pools) the same search ran ~35% slower (1279 vs 1995 rows/s at full size).
        log("faiss alone …")
        t = time.perf_counter()
        faiss_rps, _ = faiss_alone(lab, scoring)
        log(f"faiss alone: {faiss_rps:.0f} rows/s ({time.perf_counter() - t:.0f}s)")
        repo = work / "repo"
        build_repo(lab, repo)
        log(f"end to end through the gateway (mode {args.mode}) …")
        e2e = end_to_end(repo, rules_file(args.mode, work / "fusion_rules.yaml"), scoring, work)
        ok, detail = check_output(e2e["out"], scoring)
        s = e2e["summary"]
        e2e_rps = args.rows / e2e["wall"]
        emb_bytes = args.rows * args.dim * 4
        mib = 1024 * 1024

        print(
            f"\nshard scoring: {args.rows} rows × {args.dim}-d vs {args.labelled} labelled, K={K}, "
            f"mode {args.mode}, row groups of {ROW_GROUP_ROWS}"
        )
        print(f"{'measure':<46}{'value':>16}{'ratio':>8}{'target':>8}")
        print(f"{'faiss IndexFlatIP search alone':<46}{faiss_rps:>12.0f} r/s")
        print(
            f"{'end to end through the gateway (wall)':<46}{e2e_rps:>12.0f} r/s"
            f"{e2e_rps / faiss_rps:>8.2f}{'≥ 0.8':>8}"
        )
        print(
            f"{'  service-reported seconds / rows/s':<46}{s.seconds:>10.1f} s  "
            f"{s.rows_done / max(s.seconds, 1e-9):.0f} r/s"
        )
        print(
            f"{'  rows done / failed / resumed':<46}{f'{s.rows_done} / {s.rows_failed} / {s.rows_resumed}':>16}"
        )
        print(f"{'proxylabel peak RSS (VmHWM) after start':<46}{e2e['hwm_start'] / 1024:>12.0f} MiB")
        print(f"{'proxylabel peak RSS (VmHWM) after the job':<46}{e2e['hwm_end'] / 1024:>12.0f} MiB")
        print(f"{'proxylabel RSS after the first part':<46}{e2e['rss_first_part'] / 1024:>12.0f} MiB")
        print(f"{'proxylabel max RSS sampled at progress events':<46}{e2e['rss_during'] / 1024:>12.0f} MiB")
        print(f"{'proxylabel RSS after the job':<46}{e2e['rss_end'] / 1024:>12.0f} MiB")
        print(f"{'shard on disk':<46}{scoring.stat().st_size / mib:>12.0f} MiB")
        print(f"{'shard embeddings decoded (rows × dim × 4)':<46}{emb_bytes / mib:>12.0f} MiB")
        if s.evaluation.rows_labelled:
            ev = s.evaluation
            print(
                f"{'evaluation (labelled rows)':<46}{ev.rows_labelled:>8} acc {ev.accuracy:.3f} "
                f"F1 {ev.macro_f1:.3f} MAE {ev.mean_absolute_error:.3f}"
            )
        print(f"{'output: every id exactly once':<46}{'yes' if ok else 'NO':>16}   ({detail})")
        results.record(
            "bench_shards",
            [
                results.row(
                    f"shard job through the gateway, {args.mode}, {args.rows:,} rows × {args.dim}-d, "
                    f"{args.labelled:,} labelled: rows/s vs faiss exact search alone",
                    e2e_rps,
                    "rows/s",
                    baseline=faiss_rps,
                    target="(not the target's case)" if args.quick else "≥ 0.8 (300k × 1024-d)",
                    meets_target=None if args.quick else e2e_rps / faiss_rps >= 0.8,
                ),
                results.row(
                    "proxylabel RSS after the job vs after the first part",
                    e2e["rss_end"] / 1024,
                    "MiB",
                    baseline=round(e2e["rss_first_part"] / 1024, 1),
                    target="independent of shard size",
                    note=f"max at progress events {e2e['rss_during'] / 1024:.0f} MiB, "
                    f"VmHWM {e2e['hwm_end'] / 1024:.0f} MiB",
                ),
                results.row(
                    "output: every id exactly once", None, target="yes", meets_target=ok, note=detail
                ),
            ],
            quick=args.quick,
            settings=f"{args.rows} rows, {args.labelled} labelled, {args.dim}-d, mode {args.mode}",
        )
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
