"""The per-mode decoding loops (ar, the pseudo-state and tree decoders) and the transformers peers."""
