"""CPU and quality of scoring's Platt scaling: the online Newton step against the window refit it replaced; prints JSON.

The same synthetic stream of (logit, label) mini-batches (the model hands Platt MINI_BATCH at a
time) goes through both, side by side in one run: `PlattScaling.observe` as shipped, and the
former method (a ring buffer of the newest 50,000 pairs, refitted by 8 Newton iterations every
5,000), kept here as the reference. The labels follow a drifting miscalibration (intercept
-1 -> -0.5 halfway) so both have to move; quality is the prequential log-loss of the
calibrated probability (each mini-batch scored before it is observed).

    .venv/bin/python bench/bench_platt_calibration.py [--examples 400000]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from services.scoring.model import CALIBRATION_RIDGE, CALIBRATION_WINDOW, MINI_BATCH, PlattScaling


class WindowRefit:
    """The former Platt scaling: refit by Newton on the newest `window` pairs every `refit_every`."""

    def __init__(self, window: int = CALIBRATION_WINDOW, refit_every: int = 5_000) -> None:
        self.window, self.refit_every = window, refit_every
        self.logits, self.labels = np.zeros(window), np.zeros(window)
        self.seen = self.since_fit = 0
        self.params = np.array([1.0, 0.0])

    def observe(self, logits: np.ndarray, labels: np.ndarray) -> None:
        positions = (self.seen + np.arange(len(logits))) % self.window
        self.logits[positions], self.labels[positions] = logits, labels
        self.seen += len(logits)
        self.since_fit += len(logits)
        if self.since_fit >= self.refit_every:
            self.since_fit = 0
            filled = min(self.seen, self.window)
            x, y = self.logits[:filled], self.labels[:filled]
            params = self.params
            for _ in range(8):
                p = 1.0 / (1.0 + np.exp(-(params[0] * x + params[1])))
                weight = p * (1.0 - p)
                gradient = np.array([np.dot(p - y, x), np.sum(p - y)]) + CALIBRATION_RIDGE * (params - [1.0, 0.0])
                hessian = np.array([[np.dot(weight, x * x), np.dot(weight, x)], [np.dot(weight, x), np.sum(weight)]])
                params = params - np.linalg.solve(hessian + CALIBRATION_RIDGE * np.eye(2), gradient)
            self.params = params

    def apply(self, logits: np.ndarray) -> np.ndarray:
        return self.params[0] * logits + self.params[1]


def run(examples: int) -> dict[str, object]:
    rng = np.random.default_rng(7)
    logits = rng.normal(-1.0, 1.5, examples)
    shift = np.where(np.arange(examples) < examples // 2, -1.0, -0.5)
    labels = (rng.random(examples) < 1.0 / (1.0 + np.exp(-(0.8 * logits + shift)))).astype(float)
    result: dict[str, object] = {"examples": examples, "mini_batch": MINI_BATCH}
    for name, platt in (("online_newton", PlattScaling()), ("window_refit", WindowRefit())):
        loss, cpu = 0.0, 0.0
        for start in range(0, examples, MINI_BATCH):
            x, y = logits[start:start + MINI_BATCH], labels[start:start + MINI_BATCH]
            p = np.clip(1.0 / (1.0 + np.exp(-platt.apply(x))), 1e-9, 1 - 1e-9)
            loss -= float(np.sum(y * np.log(p) + (1 - y) * np.log(1 - p)))
            began = time.process_time()
            platt.observe(x, y)
            cpu += time.process_time() - began
        result[name] = {"cpu_us_per_mini_batch": round(1e6 * cpu / (examples / MINI_BATCH), 1),
                        "prequential_log_loss": round(loss / examples, 5)}
    result["load_average"] = [round(v, 2) for v in os.getloadavg()]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=400_000)
    print(json.dumps(run(parser.parse_args().examples), indent=2))


if __name__ == "__main__":
    main()
