"""Drafters: the pseudo-state family (ht, medusa, pass) and those that draft from outside the forward pass."""
