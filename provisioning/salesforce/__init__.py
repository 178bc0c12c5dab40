"""Salesforce connectivity: JWT bearer auth, the REST client, the Streaming API subscriber, Id checks."""

from provisioning.order import Order, OrderItem
from provisioning.salesforce.auth import AccessToken, JWTBearerAuth
from provisioning.salesforce.client import OrderFieldNames, SalesforceClient
from provisioning.salesforce.errors import (
    InvalidSalesforceId,
    OrderNotFound,
    SalesforceAuthError,
    SalesforceConnectionError,
    SalesforceEndpointError,
    SalesforceError,
    SalesforcePermanentError,
    SalesforceRequestError,
    SalesforceStreamingError,
    SalesforceTransientError,
    SalesforceUnavailable,
)
from provisioning.salesforce.ids import is_valid_id, normalize_id
from provisioning.salesforce.streaming import Event, StreamCounters, StreamingClient
from provisioning.settings import REPLAY_EARLIEST, REPLAY_LATEST

__all__ = [
    "REPLAY_EARLIEST",
    "REPLAY_LATEST",
    "AccessToken",
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
    "SalesforceEndpointError",
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
