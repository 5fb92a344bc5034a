"""Moving a request's KV blocks from prefill to decode: codecs (none, fp8, int8, int4, lossless),
the framed wire format, transports (local, shared memory / CUDA IPC, gRPC, Ray), sender/receiver."""
