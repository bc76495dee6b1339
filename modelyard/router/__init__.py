"""The router: gRPC front ends (KServe v2 and modelyard.v1), routing decisions and forwarding."""
