"""Salesforce connectivity: JWT bearer auth, the REST client, the Streaming API subscriber, Id checks."""

from provisioning.salesforce.auth import AccessToken, JWTBearerAuth
from provisioning.salesforce.client import ApiUsage, Order, OrderFieldNames, OrderItem, SalesforceClient
from provisioning.salesforce.errors import (
    InvalidSalesforceId,
    OrderNotFound,
    SalesforceAuthError,
    SalesforceConnectionError,
    SalesforceError,
    SalesforcePermanentError,
    SalesforceRequestError,
    SalesforceStreamingError,
    SalesforceTransientError,
    SalesforceUnavailable,
)
from provisioning.salesforce.ids import is_valid_id, normalize_id
from provisioning.salesforce.streaming import (
    REPLAY_EARLIEST,
    REPLAY_LATEST,
    Event,
    StreamCounters,
    StreamingClient,
)

__all__ = [
    "REPLAY_EARLIEST",
    "REPLAY_LATEST",
    "AccessToken",
    "ApiUsage",
    "Event",
    "InvalidSalesforceId",
    "JWTBearerAuth",
    "Order",
    "OrderFieldNames",
    "OrderItem",
    "OrderNotFound",
    "SalesforceAuthError",
    "SalesforceClient",
    "SalesforceConnectionError",
    "SalesforceError",
    "SalesforcePermanentError",
    "SalesforceRequestError",
    "SalesforceStreamingError",
    "SalesforceTransientError",
    "SalesforceUnavailable",
    "StreamCounters",
    "StreamingClient",
    "is_valid_id",
    "normalize_id",
]
