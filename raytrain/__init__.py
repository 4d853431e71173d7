"""raytrain: road-segmentation training and hyperparameter search on Ray.

    raytrain.train(config)                      one DDP run on Ray Train
    raytrain.tune(config)                       a Ray Tune search of such runs
    raytrain.best_checkpoint(experiment_path)   .path, .config, .metrics of the best checkpoint
    raytrain.load_model(checkpoint)             the torch module, eval mode, no Ray needed
    raytrain.predict(model, images)             probabilities at each image's own size
"""
import importlib

__version__ = "0.1.0"

# Imported on first use: Ray Data tasks import raytrain.data.* and must not pay for torch and smp.
_EXPORTS = {
    "train": "raytrain.api",
    "tune": "raytrain.api",
    "best_checkpoint": "raytrain.api",
    "load_model": "raytrain.api",
    "predict": "raytrain.api",
    "Config": "raytrain.config",
    "load_config": "raytrain.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'raytrain' has no attribute {name!r}")
