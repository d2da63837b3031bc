"""The network surface: gRPC services over the serving core."""
