"""A diagnostic with state: the share of ReLU units that have never fired since the start.

A unit counts as fired once its output has been > 0 for some example of some watched
step since training began; act/never_fired/layerN is the share of units that have not.
"""

from actgrad.diagnostic import Diagnostic


class NeverFired(Diagnostic):
    needs = {"layers"}  # snapshot.layers[name].out: each hidden layer's output on watched steps
    charts = {"act/never_fired: share of units never > 0 since the start": ["act/never_fired$"]}

    def __init__(self, every_n_steps: int = 1000):
        super().__init__(every_n_steps)
        self.fired = {}  # layer name -> one bool per unit

    def compute(self, snapshot):
        shares = {}
        for name, layer in snapshot.layers.items():
            self.fired[name] = self.fired.get(name, False) | (layer.out > 0).any(0)
            shares[f"act/never_fired/{name}"] = 1 - self.fired[name].float().mean()
        return shares
