"""raytrain: road-segmentation training and hyperparameter search on Ray.

    raytrain.train(config)                      one DDP run on Ray Train, in a new experiment directory
    raytrain.tune(config)                       a Ray Tune search of such runs, in a new experiment directory
    raytrain.runs(storage)                      the experiments in a storage folder, newest first
    raytrain.best_checkpoint(experiment)        .path, .config, .metrics of an experiment's best checkpoint
    raytrain.load_model(checkpoint)             a LoadedModel: .module (eval mode), .config, .classes; no Ray needed
    raytrain.predict(model, images)             probabilities at each image's own size
    raytrain.serve(checkpoint)                  the checkpoint (or an experiment's best) over HTTP on Ray Serve
    raytrain.predict_folder(ckpt, inputs, out)  mask and overlay PNGs; workers=N: on the Ray cluster
    raytrain.evaluate / export / report / shard / synth / quickstart / list_configs / show_config

Every `raytrain` command has its twin here, with the same arguments (raytrain.api).
"""
import importlib

__version__ = "0.2.0"

# Imported on first use: Ray Data tasks import raytrain.data.* and must not pay for torch and smp.
_EXPORTS = {
    **dict.fromkeys(
        ["train", "tune", "runs", "best_checkpoint", "load_model", "predict", "predict_folder", "evaluate", "export",
         "report", "shard", "synth", "quickstart", "list_configs", "show_config", "serve"],
        "raytrain.api",
    ),
    "Config": "raytrain.config",
    "load_config": "raytrain.config",
    "CheckpointInfo": "raytrain.checkpoints",
    "LoadedModel": "raytrain.inference.loading",
    "PredictionSummary": "raytrain.inference.files",
    "RaytrainError": "raytrain.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'raytrain' has no attribute {name!r}")
