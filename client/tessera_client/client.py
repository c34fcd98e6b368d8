"""A typed Python client of the gateway, for client apps, the demo, CLIs, benchmarks and tests.

It imports only the generated stubs (and numpy / OpenCV for pixels and video files).
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tessera.common.v1 import common_pb2
from tessera.gateway.v1 import gateway_service_pb2 as pb
from tessera.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from tessera.proxylabel.v1 import proxylabel_service_pb2 as proxylabel_pb

ImageLike = str | Path | bytes | np.ndarray | common_pb2.Image
MODES = {
    None: pb.EMOTION_MODE_UNSPECIFIED,
    "ensemble": pb.EMOTION_MODE_ENSEMBLE,
    "student": pb.EMOTION_MODE_STUDENT,
}


class ItemError(Exception):
    """One item of a batch failed; the others were answered."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def _check_fps(fps: float) -> None:
    """The services refuse a clip without a positive, finite frame rate; say so before sending."""
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive finite number, got {fps!r}")


def status_code(value: int) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == value), grpc.StatusCode.UNKNOWN)


def to_image(
    image: ImageLike, *, face_crop: bool = False, boxes: Sequence[tuple[int, int, int, int]] = ()
) -> common_pb2.Image:
    """A path or encoded bytes (JPEG/PNG), or a pixel array (gray HxW, BGR HxWx3, RGBA HxWx4)."""
    if isinstance(image, common_pb2.Image):
        return image
    faces = [common_pb2.BoundingBox(x=x, y=y, width=w, height=h) for x, y, w, h in boxes]
    if isinstance(image, (str, Path)):
        return common_pb2.Image(encoded=Path(image).read_bytes(), faces=faces, is_face_crop=face_crop)
    if isinstance(image, bytes):
        return common_pb2.Image(encoded=image, faces=faces, is_face_crop=face_crop)
    array = np.ascontiguousarray(image, dtype=np.uint8)
    formats = {
        2: common_pb2.PIXEL_FORMAT_GRAY8,
        3: common_pb2.PIXEL_FORMAT_BGR8,
        4: common_pb2.PIXEL_FORMAT_RGBA8,
    }
    channels = 2 if array.ndim == 2 else array.shape[2] if array.ndim == 3 else 0
    if channels not in formats:
        raise ValueError(f"pixel array of shape {array.shape}: expected HxW, HxWx3 (BGR) or HxWx4 (RGBA)")
    raw = common_pb2.RawImage(
        height=array.shape[0], width=array.shape[1], format=formats[channels], data=array.tobytes()
    )
    return common_pb2.Image(raw=raw, faces=faces, is_face_crop=face_crop)


@dataclass(frozen=True)
class Face:
    box: tuple[int, int, int, int]
    label: str
    probabilities: dict[str, float]
    detection_score: float


def video_frames(path: str | Path) -> tuple[float, Iterator[np.ndarray]]:
    """A video file's frame rate (0.0 when the file does not say) and its BGR frames, read lazily
    (the file is closed when they run out). Needs OpenCV (`tessera-client[video]`)."""
    import cv2  # only callers with video files need OpenCV

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise FileNotFoundError(f"cannot open video {path}")

    def frames() -> Iterator[np.ndarray]:
        try:
            while True:
                ok, frame = capture.read()
                if not ok:
                    return
                yield frame
        finally:
            capture.release()

    return float(capture.get(cv2.CAP_PROP_FPS) or 0.0), frames()


@dataclass(frozen=True)
class ClientTls:
    """TLS to a gateway (or any tessera process): its CA (None: the system's roots), a client
    certificate and key for mutual TLS, and the name expected in the server's certificate when
    the target's host differs."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_files(
        cls,
        ca_file: Path | None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        server_name: str | None = None,
    ) -> ClientTls | None:
        """From PEM files; None without a CA file (plaintext). Raises OSError for an unreadable file."""
        if ca_file is None:
            return None
        return cls(
            ca_file.read_bytes(),
            cert_file.read_bytes() if cert_file else None,
            key_file.read_bytes() if key_file else None,
            server_name,
        )

    def channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )
        name = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return grpc.secure_channel(target, creds, options=[*options, *name])


class TesseraClient:
    """Blocking client of the gateway. Use as a context manager, or call close()."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool | ClientTls = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        server_name: str | None = None,
        timeout: float = 30.0,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        """`tls`: a `ClientTls`, or True for TLS with the keyword arguments (implied by
        `root_certificates` or `certificate_chain`): `root_certificates` the CA (None: the system's
        roots), `certificate_chain` + `private_key` a client certificate for mutual TLS,
        `server_name` the name expected in the server's certificate when the target's host differs."""
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if not isinstance(tls, ClientTls) and (
            tls or root_certificates is not None or certificate_chain is not None
        ):
            tls = ClientTls(root_certificates, certificate_chain, private_key, server_name)
        if isinstance(tls, ClientTls):
            self.channel = tls.channel(target, options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.GatewayServiceStub(self.channel)
        self.timeout = timeout
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()

    def __enter__(self) -> TesseraClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _kw(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": self.metadata}

    # Emotion ---------------------------------------------------------------------------------
    def classify(
        self,
        images: Sequence[ImageLike],
        *,
        mode: str | None = None,
        return_member_logits: bool = False,
        face_crop: bool = False,
        timeout: float | None = None,
        ensemble: str | None = None,
    ) -> pb.ClassifyEmotionResponse:
        """Every face of every image. `ensemble` names an ensemble of the gateway's fusion rules
        (e.g. "pretrained", "research"; implies mode "ensemble"); None: the rules' default one."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(k for k in MODES if k)} or None")
        request = pb.ClassifyEmotionRequest(
            images=[to_image(i, face_crop=face_crop) for i in images],
            mode=MODES[mode],
            return_member_logits=return_member_logits,
            ensemble=ensemble or "",
        )
        reply: pb.ClassifyEmotionResponse = self.stub.ClassifyEmotion(request, **self._kw(timeout))
        return reply

    def classify_image(
        self,
        image: ImageLike,
        *,
        mode: str | None = None,
        face_crop: bool = False,
        timeout: float | None = None,
    ) -> list[Face]:
        """Every face of one image; raises ItemError when the image itself was refused."""
        reply = self.classify([image], mode=mode, face_crop=face_crop, timeout=timeout)
        result = reply.images[0]
        if result.status.code != 0:
            raise ItemError(status_code(result.status.code), result.status.message)
        return [
            Face(
                (f.box.x, f.box.y, f.box.width, f.box.height),
                f.label,
                dict(zip(reply.class_names, f.probabilities, strict=True)),
                f.detection_score,
            )
            for f in result.faces
        ]

    # Engagement ------------------------------------------------------------------------------
    @staticmethod
    def _clip_messages(
        message: type, frames: Iterable[ImageLike], fps: float, clip_id: str, return_member_outputs: bool
    ) -> Iterator[Any]:
        header = pb.ClipHeader(
            clip_id=clip_id, fps=fps, options=pb.ClipOptions(return_member_outputs=return_member_outputs)
        )
        yield message(header=header)
        for i, frame in enumerate(frames):
            stamp = int(i * 1e6 / fps)
            yield message(frame=common_pb2.VideoFrame(timestamp_us=stamp, image=to_image(frame)))

    def score_clip(
        self,
        frames: Iterable[ImageLike],
        *,
        fps: float = 30.0,
        clip_id: str = "",
        return_member_outputs: bool = False,
        timeout: float | None = None,
    ) -> pb.ScoreClipResponse:
        _check_fps(fps)
        messages = self._clip_messages(pb.ScoreClipRequest, frames, fps, clip_id, return_member_outputs)
        reply: pb.ScoreClipResponse = self.stub.ScoreClip(messages, **self._kw(timeout))
        return reply

    def score_video_file(self, path: str | Path, **kwargs: Any) -> pb.ScoreClipResponse:
        fps, frames = video_frames(path)
        return self.score_clip(frames, fps=fps or 30.0, clip_id=Path(path).name, **kwargs)

    def stream_video(
        self,
        frames: Iterable[ImageLike],
        *,
        fps: float = 30.0,
        stream_id: str = "",
        timeout: float | None = None,
        reconnect_seconds: float = 60.0,
    ) -> Iterator[pb.StreamVideoResponse]:
        """One answer per frame, in order. When the stream is cut with UNAVAILABLE (a gateway or
        service restarting, a drain), it is reopened with the same stream id for up to
        `reconnect_seconds` (0: never) and the frames not yet answered are sent again, so every
        frame gets exactly one answer. Server-side state (the tracked face, the engagement window
        and its smoothing) starts afresh on the new stream."""
        _check_fps(fps)
        return _ResumableStream(
            self, frames, fps, stream_id or uuid.uuid4().hex, timeout, reconnect_seconds
        ).answers()

    def stream_webcam(self, device: int = 0, **kwargs: Any) -> Iterator[pb.StreamVideoResponse]:
        import cv2

        capture = cv2.VideoCapture(device)

        def frames() -> Iterator[bytes]:
            try:
                while capture.isOpened():
                    ok, frame = capture.read()
                    if not ok:
                        return
                    yield cv2.imencode(".jpg", frame)[1].tobytes()  # ~10x smaller than raw pixels
            finally:
                capture.release()

        return self.stream_video(frames(), fps=capture.get(cv2.CAP_PROP_FPS) or 30.0, **kwargs)

    # Proxy labels ----------------------------------------------------------------------------
    def score_texts(
        self, rows: Sequence[dict[str, Any] | proxylabel_pb.TextRow], *, timeout: float | None = None
    ) -> pb.ScoreTextsResponse:
        """rows: TextRow messages or dicts with id, text, optional response / embedding / embedder."""
        msgs = [r if isinstance(r, proxylabel_pb.TextRow) else proxylabel_pb.TextRow(**r) for r in rows]
        reply: pb.ScoreTextsResponse = self.stub.ScoreTexts(
            pb.ScoreTextsRequest(rows=msgs), **self._kw(timeout)
        )
        return reply

    def score_shard(
        self,
        input_path: str | Path,
        output_path: str | Path,
        *,
        batch_rows: int = 0,
        timeout: float | None = None,
    ) -> grpc.CallIterator[pb.ScoreShardResponse]:
        """Start the shard job, or re-attach to it (the same request is the same job): progress
        events (the first names the job: `progress.job`), then the summary. The job runs in the
        service: it goes on when this stream ends; call again to re-attach
        (`tessera_client.score_shard` does it by itself)."""
        request = pb.ScoreShardRequest(
            input_path=str(input_path), output_path=str(output_path), batch_rows=batch_rows
        )
        events: grpc.CallIterator[pb.ScoreShardResponse] = self.stub.ScoreShard(
            request, **self._kw(timeout or 24 * 3600.0)
        )
        return events

    def get_shard_job(self, job_id: str, *, timeout: float | None = None) -> proxylabel_pb.ShardJob:
        """A shard job's state (RUNNING, SUCCEEDED, FAILED, CANCELLED, ORPHANED), rows, owner. A job
        belongs to the token that started it (`started_by`): another token's job is NOT_FOUND,
        unless this token has the admin scope."""
        reply: pb.GetShardJobResponse = self.stub.GetShardJob(
            pb.GetShardJobRequest(job_id=job_id), **self._kw(timeout)
        )
        return reply.job

    def list_shard_jobs(self, *, timeout: float | None = None) -> list[proxylabel_pb.ShardJob]:
        """This token's shard jobs (every job for an admin token) under the proxylabel service's
        output roots, most recently updated first."""
        return list(self.stub.ListShardJobs(pb.ListShardJobsRequest(), **self._kw(timeout)).jobs)

    def cancel_shard_job(self, job_id: str, *, timeout: float | None = None) -> proxylabel_pb.ShardJob:
        """Stop a shard job at its next part boundary (finished parts stay; the same ScoreShard
        resumes it). Returns the job: CANCELLED, or RUNNING with cancel_requested until it stops.
        Only the token that started the job, or an admin token, may (PERMISSION_DENIED)."""
        reply: pb.CancelShardJobResponse = self.stub.CancelShardJob(
            pb.CancelShardJobRequest(job_id=job_id), **self._kw(timeout)
        )
        return reply.job

    # Operations ------------------------------------------------------------------------------
    def status(self, *, timeout: float | None = None) -> pb.GetStatusResponse:
        reply: pb.GetStatusResponse = self.stub.GetStatus(pb.GetStatusRequest(), **self._kw(timeout))
        return reply

    def health(self, service: str = "", *, timeout: float = 5.0) -> str:
        reply = health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


class _ResumableStream:
    """A StreamVideo call that reopens itself on UNAVAILABLE without losing or repeating a frame."""

    def __init__(
        self,
        client: TesseraClient,
        frames: Iterable[ImageLike],
        fps: float,
        stream_id: str,
        timeout: float | None,
        reconnect_seconds: float,
    ) -> None:
        self.client = client
        self.frames = iter(frames)
        self.fps = fps
        self.stream_id = stream_id
        self.timeout = timeout
        self.reconnect_seconds = reconnect_seconds
        self.sent = 0
        self.unanswered: deque[pb.StreamVideoRequest] = deque()  # sent, answer not yet received
        self.lock = threading.Lock()  # the state above, shared with the thread reading answers
        # One reader of the caller's frames at a time (a superseded call's reader may still be in
        # it), and never under `lock`: a camera or a paced source blocks until its next frame,
        # and an answer that arrived meanwhile must not wait for it.
        self.source_lock = threading.Lock()
        self.carried: ImageLike | None = None  # read by a superseded call's reader: sent next
        self.generation = 0
        self.reconnects = 0

    def _messages(self, generation: int) -> Iterator[pb.StreamVideoRequest]:
        """One call's requests: the header, the frames an earlier call left unanswered, then new ones.
        gRPC reads this in its own thread; a superseded call's reader stops taking frames."""
        yield pb.StreamVideoRequest(header=pb.ClipHeader(clip_id=self.stream_id, fps=self.fps))
        with self.lock:
            resend = list(self.unanswered)
        yield from resend
        while (message := self._next_frame(generation)) is not None:
            yield message

    def _next_frame(self, generation: int) -> pb.StreamVideoRequest | None:
        """The next frame as a request of call `generation`; None when the frames are over or
        that call is superseded."""
        with self.source_lock:
            with self.lock:
                if generation != self.generation:
                    return None
            frame = self.carried if self.carried is not None else next(self.frames, None)
            self.carried = None
            if frame is None:
                return None
            with self.lock:
                if generation != self.generation:
                    self.carried = frame  # the call ended while the source was read: the next one sends it
                    return None
                stamp = int(self.sent * 1e6 / self.fps)
                message = pb.StreamVideoRequest(
                    frame=common_pb2.VideoFrame(timestamp_us=stamp, image=to_image(frame))
                )
                self.sent += 1
                self.unanswered.append(message)
            return message

    def answers(self) -> Iterator[pb.StreamVideoResponse]:
        give_up_at: float | None = None
        backoff = 0.1
        while True:
            call = self.client.stub.StreamVideo(
                self._messages(self.generation), **self.client._kw(self.timeout or 24 * 3600.0)
            )
            try:
                for reply in call:
                    with self.lock:
                        if self.unanswered:
                            self.unanswered.popleft()
                    give_up_at, backoff = None, 0.1  # answers flow again: a later cut gets a new budget
                    yield reply
                return
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or self.reconnect_seconds <= 0:
                    raise
                now = time.monotonic()
                give_up_at = now + self.reconnect_seconds if give_up_at is None else give_up_at
                if now >= give_up_at:
                    raise
                with self.lock:
                    self.generation += 1
                self.reconnects += 1
                time.sleep(min(backoff, max(0.0, give_up_at - now)))
                backoff = min(backoff * 2, 2.0)
            finally:
                call.cancel()
