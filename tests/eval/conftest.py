"""Fixtures of the evaluation tests."""

import pytest
import torch


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory):
    """Random FID Inception weights, saved as the converted checkpoint would be (fp16 to keep it small)."""
    from safetensors.torch import save_file

    from pocketdiff.eval.inception import FIDInceptionV3

    torch.manual_seed(0)
    state = {k: v.half() for k, v in FIDInceptionV3().state_dict().items()}
    path = tmp_path_factory.mktemp("inception") / "inception-2015-12-05.safetensors"
    save_file(state, str(path))
    return path
