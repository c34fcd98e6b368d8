"""A new version directory is picked up by a running service: no request fails, later ones
report the new version."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

from tessera_client import TesseraClient
from tests.helpers.suites import CACHE, start_suite
from tools.builders.blazeface import build_blazeface
from tools.builders.fer_student import build_fer_student


def test_new_version_swaps_in_under_load(tmp_path: Path, astronaut_jpeg: bytes) -> None:
    repo = tmp_path / "repo"
    build_fer_student(repo, CACHE)
    build_blazeface(repo, CACHE)  # the face detector
    suite = start_suite(
        tmp_path / "suite",
        repo,
        data_roots=(tmp_path,),
        extra_env={"TESSERA_EMOTION__REPOSITORY_POLL_SECONDS": "0.2"},
    )
    versions: list[str] = []
    errors: list[Exception] = []
    stop = threading.Event()

    def load() -> None:
        with TesseraClient(suite.gateway.target) as client:
            while not stop.is_set():
                try:
                    reply = client.classify([astronaut_jpeg], mode="student")
                    assert reply.images[0].faces[0].label == "Happy"
                    versions.append(reply.models[0].version)
                except Exception as exc:
                    errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        # Copy under a hidden name, then rename: the version appears whole.
        shutil.copytree(repo / "emotion_student" / "1", repo / "emotion_student" / ".2.tmp")
        (repo / "emotion_student" / ".2.tmp").rename(repo / "emotion_student" / "2")
        deadline = time.monotonic() + 20
        while not versions or versions[-1] != "2":
            assert time.monotonic() < deadline, "version 2 never served"
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        suite.stop()
    assert not errors, errors[:3]
    assert versions[0] == "1" and versions[-1] == "2"
    first_new = versions.index("2")
    assert set(versions[first_new + 3 :]) == {"2"}  # at most the in-flight ones finish on v1
