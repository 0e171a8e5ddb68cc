"""Generate spiffeproto/ from proto/spiffeproto/*.proto when the sources have changed.

The generated modules are committed, so the project installs without protoc; this script keeps
them in step with their sources. It hashes every .proto file and compares the digest with the
one recorded at the last generation (spiffeproto/GENERATED_FROM), so it regenerates exactly when
a source changed, whatever the files' timestamps after a clone.

    python proto/generate.py            regenerate if stale
    python proto/generate.py --force    regenerate anyway
    python proto/generate.py --check    exit 1 if stale, change nothing
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "proto"
OUTPUT = ROOT / "spiffeproto"
STAMP = OUTPUT / "GENERATED_FROM"


def source_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(SOURCES.rglob("*.proto")):
        digest.update(path.relative_to(SOURCES).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def generate() -> None:
    protos = [path.relative_to(SOURCES).as_posix() for path in sorted(SOURCES.rglob("*.proto"))]
    scripts = Path(sys.executable).parent  # mypy-protobuf's plugins sit beside our interpreter
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={SOURCES}",
        f"--plugin=protoc-gen-mypy={scripts / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={scripts / 'protoc-gen-mypy_grpc'}",
        f"--python_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        f"--mypy_out={ROOT}",
        f"--mypy_grpc_out={ROOT}",
        *protos,
    ]
    subprocess.run(command, check=True, cwd=SOURCES)  # noqa: S603 - fixed argv, our own interpreter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--force", action="store_true", help="regenerate even if the sources are unchanged")
    mode.add_argument("--check", action="store_true", help="only report whether the generated code is stale")
    args = parser.parse_args(argv)
    digest = source_digest()
    recorded = STAMP.read_text().strip() if STAMP.exists() else ""
    stale = digest != recorded
    if args.check:
        print("spiffeproto is stale: run python proto/generate.py" if stale else "spiffeproto is up to date")
        return 1 if stale else 0
    if stale or args.force:
        generate()
        STAMP.write_text(digest + "\n")
        print(f"generated spiffeproto/ from {digest[:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
