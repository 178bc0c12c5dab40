"""The listener's event source: the transport ``SF_EVENTS_TRANSPORT`` names, built from the settings.

The factory lives with its caller, not beside the seam: the seam
(:mod:`provisioning.salesforce.events`) imports only models, and each transport imports the
seam, so a factory in the seam's module would make the seam import its transports (an import
cycle). Here, above both, it may import either (only the one in use is loaded: Pub/Sub brings
gRPC).
"""

from __future__ import annotations

from provisioning.core.replay_id import Transport
from provisioning.core.settings import Settings
from provisioning.salesforce.auth import JWTBearerAuth
from provisioning.salesforce.events import EventSource


def make_event_source(settings: Settings, *, auth: JWTBearerAuth | None = None) -> EventSource:
    """The event source ``SF_EVENTS_TRANSPORT`` names (sharing ``auth`` when given)."""
    if Transport(settings.sf_events_transport) is Transport.COMETD:
        from provisioning.salesforce.streaming import StreamingClient

        return StreamingClient.from_settings(settings, auth=auth)
    from provisioning.salesforce.pubsub import PubSubClient

    return PubSubClient.from_settings(settings, auth=auth)
