"""`python -m services.engagement`: run the engagement service."""

from __future__ import annotations

import sys

from tessera.engagement.v1 import engagement_service_pb2_grpc as pb_grpc

from services.engagement.config import EngagementConfig
from services.engagement.servicer import SERVICE_NAME, EngagementServicer
from services.runtime.metrics import Metrics
from services.runtime.process import App, run
from services.runtime.server import Servicer


async def build(config: EngagementConfig, metrics: Metrics) -> App:
    return App([Servicer(SERVICE_NAME, EngagementServicer(config), pb_grpc.add_EngagementServiceServicer_to_server)])


def main() -> int:
    return run("engagement", EngagementConfig, build)


if __name__ == "__main__":
    sys.exit(main())
