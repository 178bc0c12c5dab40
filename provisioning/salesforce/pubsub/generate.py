"""Generate the Pub/Sub API modules from ``pubsub_api.proto`` (``make proto``; needs grpcio-tools).

``python -m provisioning.salesforce.pubsub.generate OUT_DIR`` writes ``pubsub_api_pb2.py``,
``pubsub_api_pb2.pyi`` and ``pubsub_api_pb2_grpc.py`` into OUT_DIR. The grpc module's
``import pubsub_api_pb2`` is rewritten to a package-relative import so the output works inside
the package. A test regenerates into a temporary directory and compares with the committed files.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO = Path(__file__).with_name("pubsub_api.proto")
OUTPUTS = ("pubsub_api_pb2.py", "pubsub_api_pb2.pyi", "pubsub_api_pb2_grpc.py")
_ABSOLUTE_IMPORT = "import pubsub_api_pb2 as pubsub__api__pb2"
_RELATIVE_IMPORT = "from . import pubsub_api_pb2 as pubsub__api__pb2"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) on the proto; the files written."""
    try:
        from grpc_tools import protoc
    except ImportError:
        raise SystemExit("grpcio-tools is missing: pip install -e '.[dev]'") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO.parent}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO),
        ]
    )
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}")
    grpc_module = out_dir / "pubsub_api_pb2_grpc.py"
    text = grpc_module.read_text()
    if _ABSOLUTE_IMPORT not in text:
        raise SystemExit(f"unexpected protoc output: {_ABSOLUTE_IMPORT!r} not found in {grpc_module}")
    grpc_module.write_text(text.replace(_ABSOLUTE_IMPORT, _RELATIVE_IMPORT))
    return [out_dir / name for name in OUTPUTS]


def main(argv: list[str]) -> None:
    out_dir = Path(argv[1]) if len(argv) > 1 else PROTO.parent
    for path in generate(out_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv)
