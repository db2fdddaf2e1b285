"""The Bayes-optimal single-object denoiser: exact on its candidates, and a perfect sampler on the DDIM grid."""

import numpy as np
import pytest
import torch

from pocketdiff.data.shapes import JITTER
from pocketdiff.eval.bayes import (BayesDenoiser, candidate_images, jitter_grid, object_loss_ratios, posterior_mean,
                                   sample_scenes, single_object_scenes)
from pocketdiff.eval.checker import check


def test_jitter_grid_spans_the_spec_range():
    g = jitter_grid(13)
    assert g.shape == (169, 2)
    assert np.isclose(g.min(), -JITTER) and np.isclose(g.max(), JITTER)
    assert np.isclose(np.diff(np.unique(g[:, 0])), 0.25).all()


def test_candidate_images_move_the_object_only():
    scene = single_object_scenes(1, seed=3)[0]
    ims = candidate_images(scene, points=3)
    assert ims.shape == (9, 64, 64, 3)
    assert len({im.tobytes() for im in ims}) == 9  # every jitter renders differently
    with pytest.raises(ValueError, match="single-object"):
        candidate_images(type(scene)(scene.objects * 2, scene.background))


def test_posterior_mean_limits():
    cands = torch.randn(2, 5, 4, 3, 3)  # (B, K, C, h, w)
    x = cands[:, 2] + 1e-3 * torch.randn(2, 4, 3, 3)
    assert torch.allclose(posterior_mean(x, 1e-2, cands), cands[:, 2], atol=1e-5)  # low noise: the nearest one
    assert torch.allclose(posterior_mean(x, 1e6, cands), cands.mean(1), atol=1e-5)  # high noise: the mean
    per_row = posterior_mean(x, torch.tensor([1e-2, 1e6]), cands)  # one sigma per row
    assert torch.allclose(per_row[0], cands[0, 2], atol=1e-5) and torch.allclose(per_row[1], cands[1].mean(0), atol=1e-5)
    assert BayesDenoiser(cands)(x, 1e-2).shape == x.shape


@pytest.fixture(scope="module")
def shapes_pipe():
    from pocketdiff import load_pipeline

    return load_pipeline("default", runner="eager")


def test_bayes_denoiser_scores_100_percent_on_the_ddim_grid(shapes_pipe):
    scenes = single_object_scenes(4, seed=11)
    images = sample_scenes(shapes_pipe, scenes, steps=50, sampler="ddim")
    assert all(check(im, s)["all_correct"] for im, s in zip(images, scenes))


def test_object_loss_ratio_is_above_one_for_a_trained_model(shapes_pipe):
    r = object_loss_ratios(shapes_pipe, single_object_scenes(3, seed=5), timesteps=(300,), points=5)
    assert set(r) == {300} and r[300]["bayes"] > 0
    assert r[300]["ratio"] > 1.0  # no model beats the posterior mean on its own data
