"""`python -m services.proxylabel`: run the proxylabel service."""

from __future__ import annotations

import sys

from services.proxylabel.config import ProxyLabelConfig
from services.proxylabel.servicer import SERVICE_NAME, ProxyLabelServicer
from services.runtime.metrics import Metrics
from services.runtime.process import App, run
from services.runtime.server import Servicer
from tessera.proxylabel.v1 import proxylabel_service_pb2_grpc as pb_grpc


async def build(config: ProxyLabelConfig, metrics: Metrics) -> App:
    return App([Servicer(SERVICE_NAME, ProxyLabelServicer(config), pb_grpc.add_ProxyLabelServiceServicer_to_server)])


def main() -> int:
    return run("proxylabel", ProxyLabelConfig, build)


if __name__ == "__main__":
    sys.exit(main())
