"""The public gRPC API's contract: the stubs generate and load, messages round-trip, and its
sampling fields are exactly the engine's SamplingParams (so neither side can drift silently)."""

from __future__ import annotations

import dataclasses

from engine.sampling_params import SamplingParams
from kv_transfer.stubs import load


def test_stubs_generate_and_load():
    pb2, pb2_grpc = load("serving")
    assert pb2.DESCRIPTOR.package == "pdserve.v1"
    service = pb2.DESCRIPTOR.services_by_name["PDServe"]
    assert service.methods_by_name["Generate"].server_streaming
    assert not service.methods_by_name["Generate"].client_streaming
    assert hasattr(pb2_grpc, "PDServeServicer") and hasattr(pb2_grpc, "PDServeStub")


def test_sampling_fields_match_the_engine():
    pb2, _ = load("serving")
    proto_fields = {f.name for f in pb2.SamplingParams.DESCRIPTOR.fields}
    engine_fields = {f.name for f in dataclasses.fields(SamplingParams)}
    assert proto_fields == engine_fields


def test_messages_round_trip():
    pb2, _ = load("serving")
    request = pb2.GenerateRequest(
        model="smollm2-135m",
        messages=pb2.ChatMessages(messages=[pb2.ChatMessage(role="user", content="Hi")]),
        sampling=pb2.SamplingParams(temperature=0.0, max_tokens=8, stop=["\n"]),
    )
    back = pb2.GenerateRequest.FromString(request.SerializeToString())
    assert back.WhichOneof("input") == "messages" and back.messages.messages[0].content == "Hi"
    assert back.sampling.HasField("temperature") and back.sampling.temperature == 0.0
    assert not back.sampling.HasField("top_p")  # unset: the engine's default applies
    final = pb2.GenerateResponse(final=pb2.Final(finish_reason="stop", usage=pb2.Usage(prompt_tokens=3)))
    assert pb2.GenerateResponse.FromString(final.SerializeToString()).final.usage.prompt_tokens == 3
