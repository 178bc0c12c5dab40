"""Salesforce connectivity: JWT bearer auth, the REST client, the event sources, Id checks.

The event-source seam lives in :mod:`.events`; its transports are :mod:`.streaming` (CometD)
and :mod:`.pubsub` (the Pub/Sub API, imported on demand: it loads gRPC), sharing the reconnect
policy of :mod:`.reconnect`. The listener builds the one in use
(:func:`provisioning.listener.sources.make_event_source`).
"""

from provisioning.salesforce.auth import AccessToken, JWTBearerAuth
from provisioning.salesforce.client import OrderFieldNames, SalesforceClient
from provisioning.salesforce.errors import (
    InvalidSalesforceId,
    OrderNotFound,
    SalesforceAuthError,
    SalesforceConnectionError,
    SalesforceEndpointError,
    SalesforceError,
    SalesforceEventNotFound,
    SalesforceEventPermissionError,
    SalesforcePermanentError,
    SalesforceRequestError,
    SalesforceStreamingError,
    SalesforceTransientError,
    SalesforceUnavailable,
)
from provisioning.salesforce.events import (
    EARLIEST,
    LATEST,
    Batch,
    Event,
    EventSource,
    ReplayId,
    ReplayPreset,
    ReplayStart,
    Transport,
)
from provisioning.salesforce.ids import is_valid_id, normalize_id
from provisioning.salesforce.streaming import StreamCounters, StreamingClient
from provisioning.step.order import Order, OrderItem

__all__ = [
    "EARLIEST",
    "LATEST",
    "AccessToken",
    "Batch",
    "Event",
    "EventSource",
    "InvalidSalesforceId",
    "JWTBearerAuth",
    "Order",
    "OrderFieldNames",
    "OrderItem",
    "OrderNotFound",
    "ReplayId",
    "ReplayPreset",
    "ReplayStart",
    "SalesforceAuthError",
    "SalesforceClient",
    "SalesforceConnectionError",
    "SalesforceEndpointError",
    "SalesforceError",
    "SalesforceEventNotFound",
    "SalesforceEventPermissionError",
    "SalesforcePermanentError",
    "SalesforceRequestError",
    "SalesforceStreamingError",
    "SalesforceTransientError",
    "SalesforceUnavailable",
    "StreamCounters",
    "StreamingClient",
    "Transport",
    "is_valid_id",
    "normalize_id",
]
