"""Models: ``create_model(name, num_classes, **kwargs)`` -> a module returning logits.

Every model maps (N, in_channels, H, W) images to LOGITS (N, num_classes, H, W) at the input's size;
``to_probabilities`` turns them into probabilities (sigmoid for the single road channel, softmax
over the channels otherwise).

Names: ``simple`` and ``unet`` (the lab's models, lab.py) and ``smp:<Arch>`` for the architectures of
segmentation-models-pytorch (smp_adapter.py). ``depth`` is a knob of every model; ``allowed_depths(name)``
tells its range. registry.py holds the names; pruning.py keeps every model trainable under DDP;
``to_model_input`` (inputs.py) is how uint8 images become what every model takes; ``normalise`` its last step, which training takes after its device-side augmentation.
"""
from raytrain.models.registry import (
    allowed_depths,
    count_parameters,
    create_model,
    list_models,
    register,
    to_probabilities,
)

from raytrain.models.inputs import normalise, to_model_input

# Importing these also registers their names ("simple", "unet", "smp:<Arch>").
from raytrain.models.lab import SimpleNet, UNet
from raytrain.models.smp_adapter import SMP_PREFIX

__all__ = [
    "SMP_PREFIX",
    "SimpleNet",
    "UNet",
    "allowed_depths",
    "count_parameters",
    "create_model",
    "list_models",
    "register",
    "normalise",
    "to_model_input",
    "to_probabilities",
]
