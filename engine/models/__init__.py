"""Model definitions: plain single-device PyTorch, attention through engine.attention.PagedAttention."""
