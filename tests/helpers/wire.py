"""Every public RPC of the gateway and of each service, from the API's descriptors."""

from __future__ import annotations

from tessera.emotion.v1 import emotion_service_pb2
from tessera.engagement.v1 import engagement_service_pb2
from tessera.gateway.v1 import gateway_service_pb2
from tessera.proxylabel.v1 import proxylabel_service_pb2

SERVICES = {
    "gateway": gateway_service_pb2.DESCRIPTOR.services_by_name["GatewayService"],
    "emotion": emotion_service_pb2.DESCRIPTOR.services_by_name["EmotionService"],
    "engagement": engagement_service_pb2.DESCRIPTOR.services_by_name["EngagementService"],
    "proxylabel": proxylabel_service_pb2.DESCRIPTOR.services_by_name["ProxyLabelService"],
}


METHODS = [(process, method) for process, service in SERVICES.items() for method in service.methods]
