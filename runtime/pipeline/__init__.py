"""Modes `pipeline` and `async`: one reply on several workers, driven by an asyncio coordinator."""
