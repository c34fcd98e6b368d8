"""Server interceptor: request metrics and the one place where exceptions become statuses."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.runtime import request_ids
from services.runtime.errors import ServingError, status_of
from services.runtime.metrics import Metrics

log = logging.getLogger(__name__)

# Long-lived or operational calls that would drown the request metrics.
UNMEASURED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

Authenticator = Callable[[grpc.aio.ServicerContext], None]


def _split(full_method: str) -> tuple[str, str]:
    _, service, method = full_method.split("/", 2)
    return service, method


def _code_name(code: Any) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "UNKNOWN" if code is None else str(code)


class _Call:
    """Bookkeeping of one RPC: in-flight gauge, duration, final code."""

    def __init__(self, metrics: Metrics, service: str, method: str, context: grpc.aio.ServicerContext) -> None:
        self.metrics, self.service, self.method = metrics, service, method
        self.code = grpc.StatusCode.OK
        self.message = ""
        self.start = time.perf_counter()
        self.request_id = request_ids.begin(context.invocation_metadata())
        self.peer = context.peer()
        metrics.requests_in_flight.labels(service, method).inc()

    async def fail(self, exc: BaseException, context: grpc.aio.ServicerContext) -> None:
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

    def finish(self, context: grpc.aio.ServicerContext) -> None:
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
        log.info("%s %s id=%s peer=%s %.1f ms%s", self.method, name, self.request_id, self.peer, seconds * 1e3,
                 f": {self.message}" if self.message else "")


class ServingInterceptor(grpc.aio.ServerInterceptor):
    """Times every RPC, checks auth, and maps domain errors to statuses."""

    def __init__(self, metrics: Metrics, authenticate: Authenticator | None = None) -> None:
        self.metrics = metrics
        self.authenticate = authenticate

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(UNMEASURED_PREFIXES):
            return handler
        service, method = _split(details.method)
        metrics, authenticate = self.metrics, self.authenticate

        def check(context: grpc.aio.ServicerContext) -> None:
            if authenticate is not None:
                authenticate(context)

        if handler.unary_unary or handler.stream_unary:
            inner = handler.unary_unary or handler.stream_unary

            async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
                call = _Call(metrics, service, method, context)
                try:
                    check(context)
                    return await inner(request, context)
                except BaseException as exc:  # noqa: BLE001 - mapped, then re-raised by abort
                    await call.fail(exc, context)
                finally:
                    call.finish(context)

            factory = (grpc.unary_unary_rpc_method_handler if handler.unary_unary
                       else grpc.stream_unary_rpc_method_handler)
            return factory(unary_response, request_deserializer=handler.request_deserializer,
                           response_serializer=handler.response_serializer)

        inner_stream = handler.unary_stream or handler.stream_stream

        async def stream_response(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = _Call(metrics, service, method, context)
            try:
                check(context)
                async for item in inner_stream(request, context):
                    yield item
            except BaseException as exc:  # noqa: BLE001
                await call.fail(exc, context)
            finally:
                call.finish(context)

        factory = (grpc.unary_stream_rpc_method_handler if handler.unary_stream
                   else grpc.stream_stream_rpc_method_handler)
        return factory(stream_response, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)
