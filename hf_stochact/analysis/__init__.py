"""Analysis: FFN sparsity monitors, perplexity, CETT and reuse across tokens (ReLU² Wins-style reports)."""
