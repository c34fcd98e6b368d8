"""Server interceptor: request metrics and the one place where exceptions become statuses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import grpc

from services.runtime import request_ids
from services.runtime.admission import Admission, Gate
from services.runtime.auth import Authorizer, current_identity
from services.runtime.errors import InvalidArgument, ServingError, status_of
from services.runtime.metrics import Metrics

log = logging.getLogger(__name__)

# Long-lived or operational calls that would drown the request metrics.
UNMEASURED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
REFLECTION_PREFIX = "/grpc.reflection."

_Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
# grpc-stubs types a handler's behaviours for the threaded server; under grpc.aio they are coroutine
# functions (one response) or async generators (streamed responses) that take an aio context.
_UnaryBehaviour: TypeAlias = "Callable[[Any, _Context], Awaitable[Any]]"
_StreamBehaviour: TypeAlias = "Callable[[Any, _Context], AsyncIterator[Any]]"

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # generic in grpc-stubs only
    _ServerInterceptor = grpc.aio.ServerInterceptor


class _Undecodable:
    """Stands in for request bytes that do not parse, so the handler (not gRPC's reader, which
    would answer UNKNOWN with a traceback) fails the call with INVALID_ARGUMENT."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # any parse failure is the caller's bad bytes
            return _Undecodable(f"{type(exc).__name__}: {exc}"[:200])

    return parse


def _decoded(request: Any, method: str) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(f"the {method} request is not a valid protobuf message ({request.reason})")
    return request


async def _decoded_stream(requests: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    index = 0
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise InvalidArgument(
                f"message {index} of the {method} stream is not a valid protobuf message ({request.reason})"
            )
        index += 1
        yield request


def _deadline(context: _Context) -> float | None:
    """The call's deadline on the monotonic clock (None: the caller set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _split(full_method: str) -> tuple[str, str]:
    _, service, method = full_method.split("/", 2)
    return service, method


def _code_name(code: Any) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "UNKNOWN" if code is None else str(code)


class _Call:
    """Bookkeeping of one RPC: in-flight gauge, duration, final code."""

    def __init__(self, metrics: Metrics, service: str, method: str, context: _Context) -> None:
        self.metrics, self.service, self.method = metrics, service, method
        self.code = grpc.StatusCode.OK
        self.message = ""
        self.start = time.perf_counter()
        self.request_id = request_ids.begin(context.invocation_metadata())
        self.peer = context.peer()
        metrics.requests_in_flight.labels(service, method).inc()

    async def fail(self, exc: BaseException, context: _Context) -> None:
        """Record the status for exc and abort the RPC with it (raises)."""
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            self.code = grpc.StatusCode.CANCELLED
            raise exc
        if isinstance(exc, grpc.aio.AbortError):
            # The handler aborted itself; its code is already on the context.
            self.code = context.code() or grpc.StatusCode.UNKNOWN
            raise exc
        code, message = status_of(exc)
        if not isinstance(exc, (ServingError, grpc.RpcError)):
            log.error("unhandled error in %s id=%s", self.method, self.request_id, exc_info=exc)
        self.code, self.message = code, message
        await context.abort(code, message)

    def finish(self, context: _Context) -> None:
        if self.code is grpc.StatusCode.OK and context.code() not in (None, grpc.StatusCode.OK):
            self.code = context.code()
        name = _code_name(self.code)
        seconds = time.perf_counter() - self.start
        m = self.metrics
        m.requests_in_flight.labels(self.service, self.method).dec()
        m.request_duration.labels(self.service, self.method, name).observe(seconds)
        if name != "OK":
            m.request_errors.labels(self.service, self.method, name).inc()
        # One line per call, findable by its id in the gateway's and the service's logs alike.
        identity = current_identity()
        log.info(
            "%s %s id=%s peer=%s%s %.1f ms%s",
            self.method,
            name,
            self.request_id,
            self.peer,
            f" caller={identity.name}" if identity else "",
            seconds * 1e3,
            f": {self.message}" if self.message else "",
        )


class ServingInterceptor(_ServerInterceptor):
    """Times every RPC, checks auth, and maps domain errors to statuses."""

    def __init__(
        self, metrics: Metrics, authorizer: Authorizer | None = None, admission: Admission | None = None
    ) -> None:
        self.metrics = metrics
        self.authorizer = authorizer
        self.admission = admission
        # grpc.aio asks for a handler on every call; the wrapped one depends on the method only.
        # Only methods some servicer has are kept, so the map is as small as the API.
        self._wrapped: dict[str, _Handler] = {}

    # grpc-stubs leaves out the None that grpc.aio passes for a method no servicer has.
    async def intercept_service(  # type: ignore[override]
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None:
                return handler
            wrapped = self._wrapped[details.method] = self._wrap(details.method, handler)
        return wrapped

    def _wrap(self, full_method: str, handler: _Handler) -> _Handler:
        if full_method.startswith(REFLECTION_PREFIX) and self.authorizer is not None:
            return _reflection_behind_auth(handler, self.authorizer)
        if full_method.startswith(UNMEASURED_PREFIXES):
            return handler  # health stays open: probes carry no token
        service, method = _split(full_method)
        metrics, authorizer, admission = self.metrics, self.authorizer, self.admission

        @contextlib.asynccontextmanager
        async def served(
            request: Any,
            context: _Context,
            streaming_request: bool,
            gate: Gate | None,
            typical: Callable[[], float],
        ) -> AsyncIterator[Any]:
            """One call around its handler: auth, the request decoded, admission, then the
            handler's outcome mapped to a status and measured. Yields the decoded request."""
            call = _Call(metrics, service, method, context)
            admitted = False
            try:
                if authorizer is not None:
                    authorizer.check(context, method)
                request = _decoded_stream(request, method) if streaming_request else _decoded(request, method)
                if gate is not None:
                    await gate.enter(method, _deadline(context), typical())
                    admitted = True
                yield request
            except BaseException as exc:  # mapped, then re-raised by abort
                await call.fail(exc, context)
            finally:
                if admitted and gate is not None:
                    gate.leave()
                call.finish(context)

        unary = handler.unary_unary or handler.stream_unary
        if unary is not None:
            inner = cast(_UnaryBehaviour, unary)
            streaming_request = handler.stream_unary is not None
            gate = admission.gate(method, streaming_request) if admission else None

            def typical() -> float:
                return admission.typical(method) if admission is not None else 0.0

            async def unary_response(request: Any, context: _Context) -> Any:
                async with served(request, context, streaming_request, gate, typical) as decoded:
                    start = time.perf_counter()
                    result = await inner(decoded, context)
                    if admission is not None and not streaming_request:
                        admission.observe(method, time.perf_counter() - start)
                    return result

            factory = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary
                else grpc.stream_unary_rpc_method_handler
            )
            return factory(
                unary_response,
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )

        streamed = handler.unary_stream or handler.stream_stream
        if streamed is None:
            raise TypeError(f"the handler of {full_method} has no behaviour")
        inner_stream = cast(_StreamBehaviour, streamed)
        streaming = handler.stream_stream is not None
        stream_gate = admission.gate(method, True) if admission else None

        async def stream_response(request: Any, context: _Context) -> AsyncIterator[Any]:
            async with served(request, context, streaming, stream_gate, lambda: 0.0) as decoded:
                async for item in inner_stream(decoded, context):
                    yield item

        factory = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream
            else grpc.stream_stream_rpc_method_handler
        )
        return factory(
            stream_response,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


def _reflection_behind_auth(handler: _Handler, authorizer: Authorizer) -> _Handler:
    """Server reflection tells the API to whoever asks: only with the reflection scope, unless open."""
    if handler.stream_stream is None:
        raise TypeError("server reflection is not a stream-stream method")
    inner = cast(_StreamBehaviour, handler.stream_stream)

    async def reflect(requests: AsyncIterator[Any], context: _Context) -> AsyncIterator[Any]:
        try:
            authorizer.check(context, "ServerReflectionInfo", reflection=True)
        except ServingError as exc:
            await context.abort(exc.code, exc.message)
        async for reply in inner(requests, context):
            yield reply

    return grpc.stream_stream_rpc_method_handler(
        reflect,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
