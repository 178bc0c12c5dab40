"""A Salesforce org simulator: JWT bearer login, the REST calls the worker makes, the Streaming API.

One :class:`SalesforceSimulator` serves both the login URL and the instance URL
(``instance_url`` is the origin the client called). Use it with
:class:`~provisioning.sandbox.common.ServerThread` and
:class:`~provisioning.sandbox.common.SandboxTLS` (simple-salesforce only builds
``https://`` URLs)::

    sim = SalesforceSimulator(workdir)
    server = ServerThread(ssl_context=tls.server_context)
    server.add_app("salesforce", sim.build_app())
    server.start()
    env = sim.env(server.url("salesforce"))   # SF_LOGIN_URL, SF_CLIENT_ID, SF_USERNAME, ...

:class:`.driver.SalesforceDriver` drives a running simulator from outside (admin calls, signed
assertions, raw REST and CometD requests) for tests, the demo and benchmarks.

The org is set up as ``salesforce/`` deploys it (:mod:`.org`, from
:mod:`provisioning.salesforce.metadata`): its custom fields, Platform Event, permission set and
flows (run around a save by :mod:`.flows`); ``/__admin/org`` takes pieces away for a test.

API (what real Salesforce does; field names are the project defaults)
----------------------------------------------------------------------
- ``POST /services/oauth2/token`` form ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<RS256 JWT>``
  → 200 ``{access_token, scope: "api", instance_url, id, token_type: "Bearer", issued_at, signature}``.
  400 ``{"error", "error_description"}``: ``invalid_client_id``/``client identifier invalid`` (iss),
  ``invalid_grant``/``invalid assertion`` (signature, alg, malformed, no exp), ``audience is invalid``
  (aud is not this base URL, trailing slash allowed), ``user hasn't approved this consumer`` (sub),
  ``expired authorization code`` (exp passed; a string exp is accepted), ``unsupported_grant_type``/
  ``grant type not supported``. Tokens live ``token_lifetime_s`` (absolute).
- REST ``/services/data/v{20.0..api_version}/`` (``Authorization: Bearer``; every answer carries
  ``Sforce-Limit-Info: api-usage=N/LIMIT``; errors are ``[{"message", "errorCode", "fields"?}]``):
  401 ``INVALID_SESSION_ID`` "Session expired or invalid"; 403 ``REQUEST_LIMIT_EXCEEDED``
  "TotalRequests Limit exceeded." once ``api_used`` reaches ``api_limit``; 404 ``NOT_FOUND`` otherwise.

  - ``GET query?q=`` (or ``query/``): see :mod:`.soql`. ``WHERE Id = '<bad id>'`` → 400
    ``INVALID_QUERY_FILTER_OPERATOR`` "invalid ID field: …"; an unknown Id → ``totalSize: 0``;
    15- and 18-character Ids match on the case-sensitive first 15.
  - ``GET sobjects/Order/{id}[?fields=a,b]`` → the record with ``attributes``.
  - ``PATCH sobjects/Order/{id}`` JSON → 204. ``INVALID_FIELD`` (unknown), ``INVALID_FIELD_FOR_INSERT_UPDATE``
    (read-only), ``INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST`` (Activation_Status__c: Pending, Activating,
    Activated, Failed; SIM_Type__c: eSIM, Physical), ``STRING_TOO_LONG`` (EID__c 32, WHMCS_Order_ID__c 40,
    ESIM_ICCID__c 22, Activation_Error__c 255), ``JSON_PARSER_ERROR`` (bad JSON or datetime).
  - Ids in the path: not Id-shaped → 404 ``NOT_FOUND`` "Provided external ID field does not exist or is
    not accessible: …"; bad checksum → 400 ``MALFORMED_ID`` "malformed id …"; another object's prefix →
    400 ``MALFORMED_ID`` "Order ID: id value of incorrect type: …"; unknown → 404 ``NOT_FOUND``.
  - ``POST sobjects/OrderProvisionRequested__e`` ``{"OrderId__c" (Text 18, required), "IdemKey__c"? (Text 80)}``
    → 201 ``{"id": "e00xx…", "success": true, "errors": []}``; published on ``/event/OrderProvisionRequested__e``.
    OrderId__c is a text field: a malformed Id is accepted and published, as in a real org.
  - ``GET sobjects/{Order,Account,Contact,OrderItem,Product2,OrderProvisionRequested__e}/describe``: the
    fields the integration user may read, ``updateable`` where it may edit; 404 ``NOT_FOUND`` for an
    object it may not read or the org does not have. ``GET limits``: ``DailyApiRequests`` Max and
    Remaining. ``GET tooling/query?q=``: ``FlowDefinition`` / ``FlowDefinitionView`` of the project's
    flows (``ActiveVersionId`` null when inactive).
- Streaming ``POST /cometd/{version}``: see :mod:`.cometd`. JSON array body (else HTTP 400), bearer
  token (none → HTTP 401 ``401::Request requires authentication``; invalid → handshake ``403::Handshake
  denied`` with ``ext.sfdc.failureReason``, other messages ``401::Authentication invalid`` advice none).
  The first connect after a handshake is answered at once with ``advice {interval: 0, timeout:
  long_poll_s*1000, reconnect: "retry"}``; later connects are held up to ``long_poll_s`` and answered as
  soon as events are pending: up to 500 events, then the connect reply, in one array. Replay ids grow
  by 1-3 (never contiguous); replay ``N`` must be the replayId of a retained event. Subscribing to a
  channel that is not ``/event/<Name>__e`` → ``403::Unknown channel``; to an event the org does not
  have (any but ``/event/OrderProvisionRequested__e``) → ``400::The channel you requested to subscribe
  to does not exist {<channel>}``. A client silent for 40 s after a response is forgotten
  (``403::Unknown client``).
- Pub/Sub: see :mod:`.pubsub`; a topic the org does not have is NOT_FOUND ``…topic.not.found``.

Fault-injector operations (``/__admin/faults``, ``/__admin/calls``): ``token``, ``query``, ``order_get``,
``order_patch``, ``event_publish``, ``describe``, ``limits``, ``tooling_query``, ``other`` (unknown REST paths), ``cometd_handshake``,
``cometd_subscribe``, ``cometd_unsubscribe``, ``cometd_connect``, ``cometd_disconnect``. Injected REST
errors by ``error_status``: 200 → 400 ``UNABLE_TO_LOCK_ROW``; 429 → 403 ``REQUEST_LIMIT_EXCEEDED``;
500 → 500 ``UNKNOWN_EXCEPTION``; 502/503/504 → that status, ``SERVER_UNAVAILABLE``. Token errors: 400
(for 200) or the status, ``{"error": "unknown_error", "error_description": "retry your request"}``.
CometD operations get only latency unless named in ``operations`` or forced; their injected error is
that HTTP status with ``"error": "<status>::Server unavailable"`` replies.

Admin routes (JSON, no auth, never faulted)
-------------------------------------------
- ``POST /__admin/orders`` body: one order or a list. Keys (all optional): ``id`` (a valid 801 Id),
  ``order_number``, ``status`` (Draft), ``effective_date``, ``activation_status`` (Activating),
  ``sim_type`` (eSIM), ``eid`` (a valid random EID for eSIM, else null), ``whmcs_order_id``,
  ``esim_iccid``, ``activation_error``, ``activated_at``, ``whmcs_client_id`` ("1"), ``account_name``,
  ``account: null`` (no Account), ``email``, ``first_name``, ``last_name``, ``contact: null`` (no
  BillToContact), ``items`` (``[{"quantity": 1, "whmcs_product_id": "1", "product_name"?, "unit_price"?}]``;
  ``[]`` for none); Order API names are accepted too.
  → 200 ``{"ids": ["801…"], "orders": [<order view>]}``; 400 ``{"error"}`` on an unknown key or bad value.
- ``GET /__admin/orders`` → ``{"orders": [<order view>]}``.
- ``POST /__admin/orders/{id}/approve`` → ``{"order", "flows", "events"}``: Status becomes Activated and
  the active flows run around the save as their files say.
- ``GET /__admin/org``, ``POST /__admin/org`` body (any subset) ``{"removed_fields", "unreadable_fields",
  "read_only_fields", "unreadable_objects", "inactive_flows"}`` (lists of ``Object.Field``, objects,
  flows) → the knobs, the permission set's name and each flow's state.
- ``GET /__admin/orders/{id}`` (15 or 18 chars) → ``<order view>``: every Order field by API name,
  ``Account`` {Id, Name, WHMCS_Client_ID__c} or null, ``BillToContact`` {Id, Email, FirstName, LastName}
  or null, ``OrderItems`` [{Id, Quantity, UnitPrice, Product2 {Id, Name, ProductCode,
  WHMCS_Product_ID__c}}], ``patches`` [{"at", "source": "api" | "admin", "fields"}] (every write, in
  order: count effects with it); 404 ``{"error"}``.
- ``PATCH /__admin/orders/{id}`` body ``{field: value}`` (API names or seed keys) → ``<order view>``.
- ``POST /__admin/events[?channel=/event/X__e]`` body: one payload object or a list (published as
  given, no validation: e.g. ``{"OrderId__c": "801…", "IdemKey__c": "k1"}``) → ``{"events": [{"channel",
  "replayId", "EventUuid"}]}``.
- ``GET /__admin/events[?channel=&after=<replayId>]`` → ``{"channels": {name: {"retained", "published",
  "oldest_replay_id", "latest_replay_id"}}, "events": [<CometD event message>]}`` (retained only).
- ``GET /__admin/streaming`` → ``{"unknown_client": n, "auth_invalid": n, "daily_limit": n | true}``.
  ``POST /__admin/streaming`` body (any subset) → the same:
  ``unknown_client: n`` the next n connects answer ``403::Unknown client`` (advice handshake; the client
  is forgotten); ``auth_invalid: n`` the next n connects answer ``401::Authentication invalid`` (advice
  none; that token is revoked); ``daily_limit: n`` one-shot or ``true`` (until ``false``): connects answer
  ``403::Organization total events daily limit exceeded`` (advice none); ``expire_retention: true``
  drops every retained event (their replay ids become invalid); ``forget_clients: true`` forgets every
  client. A held connect notices at once.
- ``POST /__admin/tokens/revoke`` → ``{"revoked": n}``: every token stops working (REST 401, CometD 401).
- ``GET /__admin/app`` → ``{"foreign_certificate": false}``; ``POST /__admin/app`` body
  ``{"foreign_certificate": true}``: the Connected App holds the certificate of another key, so every
  login with the key file is refused (400 ``invalid_grant``/``invalid assertion``, as when the
  certificate uploaded to the app is not the key's) until ``false``; tokens already issued stay valid.
- ``GET /__admin/limits`` → ``{"api_used", "api_limit"}``; ``POST /__admin/limits`` body
  ``{"api_used"?, "api_limit"?}`` → the same.
- ``GET /__admin/stats`` → ``{"handshakes", "handshakes_denied", "subscribes", "subscribe_failures",
  "connects", "disconnects", "unknown_client", "auth_invalid", "daily_limit", "missing_cookie",
  "events_published", "events_delivered", "events_expired", "clients": [{"clientId", "replay",
  "subscriptions": {channel: last delivered replayId}, "holding", "delivered"}], "tokens_issued",
  "tokens_active", "orders", "api_used", "api_limit"}``.
- ``POST /__admin/reset`` → ``{"reset": true, "at"}``: drops orders, events, clients, streaming knobs,
  stats, API usage, the app's certificate, fault settings, call counts and forced faults (replay ids
  keep growing; tokens stay valid).
- ``GET/POST /__admin/faults``, ``GET /__admin/calls``, ``POST /__admin/calls/reset``: see
  :mod:`provisioning.sandbox.common`.
"""

from provisioning.sandbox.salesforce.simulator import (
    DEFAULT_USERNAME,
    EVENT_CHANNEL,
    EVENT_SOBJECT,
    SalesforceSimulator,
)

__all__ = ["DEFAULT_USERNAME", "EVENT_CHANNEL", "EVENT_SOBJECT", "SalesforceSimulator"]
