"""User plug-ins for tests, imported by name (``plugins:regression``) as a user's would be."""

import numpy as np


def regression(samples: int = 40, inputs: int = 3, outputs: int = 2, seed: int = 0) -> dict:
    """Random linear-regression data: float targets, so the loss must be ``mse``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, inputs))
    y = x @ rng.normal(size=(inputs, outputs)) + 0.3 * rng.normal(size=(samples, outputs))
    return {"train_x": x, "train_y": y, "test_x": x[:10], "test_y": y[:10], "num_classes": outputs}
