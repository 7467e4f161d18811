"""`tokenhive sidecar`: llmkit's stdio JSON-RPC sidecar onto the pool."""
