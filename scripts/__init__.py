"""Repository tools: generated code, the local cluster."""
