"""Version 1 of confide's gRPC APIs; the *_pb2* modules are generated (protos/generate.py)."""
