"""Layer 2, math: pure tensor functions (tensors in, tensors or numbers out)."""
