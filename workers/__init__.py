"""The device side: everything that touches model tensors. Imports nothing from runtime/."""
