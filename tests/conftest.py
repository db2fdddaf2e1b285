import os
import tempfile
import warnings

import pytest
import torch

# --backend auto caches ONNX exports: the tests' go to a scratch folder of this run, never the user's cache
os.environ["POCKETDIFF_CACHE"] = tempfile.mkdtemp(prefix="pocketdiff-test-cache-")

warnings.filterwarnings("ignore")
# Tiny models: one thread is as fast, and avoids OpenMP oversubscription when other jobs share the CPU.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A saved tiny random diffusers-format folder (epsilon prediction, DDIM scheduler config)."""
    from pocketdiff.folder import save_components
    from pocketdiff.models.tiny import tiny_components

    c = tiny_components(0)
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_components(path, c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler_config"])
    return path
