"""confide's own gRPC APIs (`confide.protos`): .proto sources and their generated modules."""
