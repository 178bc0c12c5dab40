"""The committed Pub/Sub API modules are exactly what `make proto` generates from the committed proto."""

from __future__ import annotations

from pathlib import Path

from provisioning.salesforce.pubsub import generate
from provisioning.salesforce.pubsub import pubsub_api_pb2 as pb

PACKAGE = Path(generate.__file__).parent


def test_regenerating_the_stubs_gives_the_committed_files(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(generate.OUTPUTS)
    for path in written:
        assert path.read_text() == (PACKAGE / path.name).read_text(), f"{path.name} is stale: run make proto"


def test_the_wire_format_keeps_salesforces_field_numbers() -> None:
    numbers = {
        "FetchRequest": {
            "topic_name": 1,
            "replay_preset": 2,
            "replay_id": 3,
            "num_requested": 4,
            "auth_refresh": 5,
        },
        "FetchResponse": {"events": 1, "latest_replay_id": 2, "rpc_id": 3, "pending_num_requested": 4},
        "ConsumerEvent": {"event": 1, "replay_id": 2},
        "ProducerEvent": {"id": 1, "schema_id": 2, "payload": 3, "headers": 4},
        "SchemaInfo": {"schema_json": 1, "schema_id": 2, "rpc_id": 3},
        "TopicInfo": {
            "topic_name": 1,
            "tenant_guid": 2,
            "can_publish": 3,
            "can_subscribe": 4,
            "schema_id": 5,
            "rpc_id": 6,
        },
    }
    for message, fields in numbers.items():
        descriptor = pb.DESCRIPTOR.message_types_by_name[message]
        assert {f.name: f.number for f in descriptor.fields} == fields, message
    assert pb.DESCRIPTOR.package == "eventbus.v1"
    service = pb.DESCRIPTOR.services_by_name["PubSub"]
    assert {"Subscribe", "GetSchema", "GetTopic", "Publish"} <= {m.name for m in service.methods}
    assert (pb.LATEST, pb.EARLIEST, pb.CUSTOM) == (0, 1, 2)
