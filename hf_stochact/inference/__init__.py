"""Inference: ``sparsify`` (exact sparse ReLU FFNs for CPU decoding)."""
