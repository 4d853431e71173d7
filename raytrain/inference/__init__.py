"""What a trained checkpoint is for. No Ray here, except in cluster.py.

    loading.py      load_model -> LoadedModel: a checkpoint checked and loaded, on any device
    image_model.py  the whole-image model (resize, normalise, tta) that predict and every export run
    prediction.py   predict: probabilities at each image's own size
    evaluation.py   evaluate: every metric of a checkpoint on a sharded split
    files.py        predict to mask and overlay PNGs, the output folder's record, PredictionSummary
    cluster.py      the same on a Ray cluster: a Ray Data pool of model actors (predict --workers)
    exporting.py    TorchScript, torch.export and ONNX files that run without raytrain

The choices below are read by the CLI, which must not import torch to build its parser.
"""
TTA_CHOICES = ("flip",)  # test-time augmentation: None, or one of these
EXPORT_FORMATS = ("torchscript", "torch.export", "onnx")
