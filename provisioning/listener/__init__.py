"""The listener: Platform Events in, one run (its first step task) per event out, no event lost.

A package of one concern per module:

- :mod:`.service`: the loop. Leadership, then the event source's batches: validate,
  record, publish, and only then one checkpoint per batch.
- :mod:`.validation`: what makes an event well-formed (and the run it asks for).
- :mod:`.leadership`: one active listener per channel, hot standbys.
- :mod:`.reconciling`: the leader's reconciler sweeps, on their intervals.
- :mod:`.metrics` and :mod:`.health`: ``/metrics``, ``/healthz``, ``/livez``.
- :mod:`.command`: ``provisioning listen`` and its signals.

The event sources (Pub/Sub, CometD) live in :mod:`provisioning.salesforce`, behind
:class:`provisioning.salesforce.events.EventSource`: the listener does not know which it reads.
"""

from provisioning.listener.command import listen
from provisioning.listener.service import Listener
from provisioning.listener.validation import Rejected, validate_event

__all__ = ["Listener", "Rejected", "listen", "validate_event"]
