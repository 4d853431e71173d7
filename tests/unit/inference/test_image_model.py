"""inference/image_model: whole-image probabilities at each image's size, and flip test-time
augmentation: tta="flip" is the mean of the image's and its mirror image's probabilities."""

import numpy as np
import pytest
import torch

import raytrain
from tests.helpers import shards
from tests.helpers import batches, make_checkpoint


def test_flip_tta_is_the_mean_of_the_image_and_its_mirror_image(tmp_path):
    model = raytrain.load_model(make_checkpoint(tmp_path))
    images = [image for batch in batches(2) for image in batch]
    mirrored = [image[:, ::-1].copy() for image in images]
    plain, of_mirrored = raytrain.predict(model, images), raytrain.predict(model, mirrored)
    for got, one, other in zip(raytrain.predict(model, images, tta="flip"), plain, of_mirrored):
        np.testing.assert_allclose(got, (one + other[:, ::-1]) / 2, atol=1e-6)
        assert np.abs(got - one).max() > 1e-2
    with pytest.raises(raytrain.RaytrainError, match="'mirror'"):
        raytrain.predict(model, images, tta="mirror")


def test_evaluate_with_flip_tta_scores_the_averaged_probabilities(tmp_path):
    data, ckpt = shards(tmp_path), make_checkpoint(tmp_path)
    plain = raytrain.evaluate(ckpt, data)
    flipped = raytrain.evaluate(ckpt, data, tta="flip")
    assert flipped["samples"] == plain["samples"] > 0 and flipped["ap"] != plain["ap"]


def test_image_model_gives_probabilities_at_each_images_size():
    from raytrain.inference.image_model import ImageModel, check_tta
    from raytrain.models import create_model

    torch.manual_seed(0)
    model = ImageModel(create_model("simple", num_classes=3, depth=1).eval(), size=(64, 32))
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 45, 70, 3), dtype=np.uint8))
    with torch.no_grad():
        probabilities = model(images)
    assert probabilities.shape == (2, 3, 45, 70)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(2, 45, 70))
    assert check_tta(None) is None and check_tta("flip") == "flip"
    with pytest.raises(raytrain.RaytrainError, match="not 'mirror'"):
        ImageModel(model.module, (64, 32), tta="mirror")
