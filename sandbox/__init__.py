"""corral's kernel mechanisms: one module per mechanism, synchronous, daemon-agnostic."""
