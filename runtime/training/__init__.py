"""Drafter training: ShareGPT prompts, self-distilled data, the objective, `leapfrog train`."""
