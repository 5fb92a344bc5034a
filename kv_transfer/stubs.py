"""The Python stubs of `proto/*.proto`, generated on first use and never committed or edited.

`proto/` holds only `.proto` files: it is not a Python package, because the name `proto` is taken
by `proto-plus` (installed with Ray's dependencies). `load("kv_transfer")` compiles
`proto/kv_transfer.proto` with grpc_tools into the ignored `proto/gen/` when the stubs are missing
or older than the `.proto` (into a private temporary folder, then renamed file by file, so racing
processes see old or new files whole), and imports them under private module names.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

PROTO_DIR = Path(__file__).resolve().parent.parent / "proto"
GEN_DIR = PROTO_DIR / "gen"


def _is_fresh(proto: Path, outputs: list[Path]) -> bool:
    source = proto.stat().st_mtime_ns
    return all(out.exists() and out.stat().st_mtime_ns >= source for out in outputs)


def _module_name(file: str) -> str:
    return f"_pdserve_stubs_{file}"


def _generate(name: str) -> None:
    from grpc_tools import protoc

    GEN_DIR.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=GEN_DIR))
    try:
        include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
        args = [f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={tmp}", f"--grpc_python_out={tmp}"]
        status = protoc.main(["grpc_tools.protoc", *args, str(PROTO_DIR / f"{name}.proto")])
        if status != 0:
            raise RuntimeError(f"grpc_tools.protoc failed on proto/{name}.proto (exit status {status})")
        # protoc writes `import <name>_pb2`; point it at the private name the messages load under.
        grpc_stub = tmp / f"{name}_pb2_grpc.py"
        text = grpc_stub.read_text()
        private = _module_name(f"{name}_pb2")
        grpc_stub.write_text(text.replace(f"\nimport {name}_pb2 as", f"\nimport {private} as"))
        for file in (f"{name}_pb2.py", f"{name}_pb2_grpc.py"):  # the grpc stub last
            os.replace(tmp / file, GEN_DIR / file)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _import(file: str) -> ModuleType:
    name = _module_name(file)
    spec = importlib.util.spec_from_file_location(name, GEN_DIR / f"{file}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@functools.cache
def load(name: str) -> tuple[ModuleType, ModuleType]:
    """(messages module, grpc module) of `proto/<name>.proto`, generated first if needed."""
    proto = PROTO_DIR / f"{name}.proto"
    if not proto.is_file():
        raise FileNotFoundError(f"{proto} is missing; the checkout is incomplete")
    if not _is_fresh(proto, [GEN_DIR / f"{name}_pb2.py", GEN_DIR / f"{name}_pb2_grpc.py"]):
        _generate(name)
    return _import(f"{name}_pb2"), _import(f"{name}_pb2_grpc")
