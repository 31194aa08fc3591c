"""What a pass of several replies' steps costs, learnt from the passes run (runtime.batching.step_batcher)."""

from __future__ import annotations

import torch

PASS_KEEP = 0.98  # a memory of ~50 passes
PASS_COST_AFTER = 16  # passes of several steps before PassCost is read
PASS_RIDGE = 1e-3  # the least squares' ridge that keeps them solvable


class PassCost:
    """ms of a pass of two or more steps, by its rows and steps: a + b * rows + c * steps,
    fitted by least squares over the passes run, each weighing PASS_KEEP of the one after
    it (it follows the machine's load). Rows are counted as the steps' senders count them
    (Lane.forward: pseudo states at their share of a row). On this CPU a row in a pass of
    several requests costs more than the device's one-request curve t(n) says (each
    request's attention, and the rows' Python), so load-aware sizing reads this instead."""

    def __init__(self):
        self.xtx = torch.zeros(3, 3, dtype=torch.float64)
        self.xty = torch.zeros(3, dtype=torch.float64)
        self.passes = 0
        self.coef: torch.Tensor | None = None

    @property
    def ready(self) -> bool:
        return self.coef is not None

    def observe(self, ms: float, rows: float, steps: int) -> None:
        x = torch.tensor([1.0, rows, steps], dtype=torch.float64)
        self.xtx = PASS_KEEP * self.xtx + torch.outer(x, x)
        self.xty = PASS_KEEP * self.xty + ms * x
        self.passes += 1
        if self.passes >= PASS_COST_AFTER:
            # A little ridge, never decayed: passes whose rows always equal their steps (every
            # step one row) leave rows and steps collinear, which alone would be singular.
            coef = torch.linalg.solve(self.xtx + PASS_RIDGE * torch.eye(3, dtype=torch.float64), self.xty)
            self.coef = coef if coef[1] > 0 else self.coef  # a row never makes a pass cheaper

    def __call__(self, rows: float, steps: int) -> float:
        a, b, c = self.coef.tolist()
        return max(a + b * rows + c * steps, 0.1)
