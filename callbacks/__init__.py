"""Diagnostics: one small file per diagnostic, each a `actgrad.diagnostic.Diagnostic`.

In any Lightning project: `Trainer(callbacks=[actgrad.callbacks.default()])`, or single ones,
`Trainer(callbacks=[Activations(every_n_steps=100)])` (README, "Use the diagnostics in your own
Lightning project")."""


def default(num_classes: int | None = None):
    """What conf/callbacks/default.yaml lists, at its cadences, bundled into one callback
    (actgrad.diagnostic.Bundle: Lightning's per-callback cost paid once, one snapshot per watched step).
    `num_classes`: InitialLoss logs ln(num_classes) beside the first step's loss."""
    from actgrad.callbacks.activation_grads import ActivationGrads
    from actgrad.callbacks.activations import Activations
    from actgrad.callbacks.bn_calibration import BNCalibration
    from actgrad.callbacks.figures import DistributionFigures
    from actgrad.callbacks.histograms import Histograms
    from actgrad.callbacks.initial_loss import InitialLoss
    from actgrad.callbacks.param_grads import ParamGrads
    from actgrad.callbacks.update_ratio import UpdateRatio
    from actgrad.callbacks.update_ratio_figure import UpdateRatioFigure
    from actgrad.diagnostic import Bundle

    return Bundle([InitialLoss(num_classes), Activations(), ActivationGrads(), ParamGrads(), UpdateRatio(),
                   Histograms(), DistributionFigures(), UpdateRatioFigure(), BNCalibration()])
