"""The latency lookup table: a row per ResNet / transformer block with what removing it saves, the predicted step
of a removal set, JSON round trip, refusal of a file that is not a table, and the onnxruntime table."""

import json

import pytest

from pocketdiff.bench.lut import LatencyTable, arch_digest, measure_lut
from pocketdiff.blocks.skipping import skippable_blocks
from pocketdiff.models.tiny import tiny_components


@pytest.fixture(scope="module")
def unet():
    return tiny_components(0)["unet"].eval()


def test_table_has_every_block_and_predicts_by_subtraction(unet, tmp_path):
    lut = measure_lut(unet, resolution=32, runs=2, warmup=1, latent_factor=4)
    assert set(lut.blocks) == set(skippable_blocks(unet)) and lut.total_ms > 0
    assert lut.arch == arch_digest(unet) and lut.runtime == "torch" and lut.cfg
    for row in lut.blocks.values():
        assert 0 <= row["saving_ms"] <= row["ms"]
        assert row["removed_ms"] == 0.0 or row["type"] == "ResnetBlock2D"
    names = list(lut.blocks)[:3]
    assert lut.predict(names) == pytest.approx(lut.total_ms - sum(lut.blocks[n]["saving_ms"] for n in names))
    assert lut.predict([]) == lut.total_ms
    with pytest.raises(KeyError, match="no block"):
        lut.predict(["down_blocks.9.resnets.0"])
    back = LatencyTable.load(lut.save(tmp_path / "lut.json"))
    assert back == lut


def test_a_file_that_is_not_a_table_fails_in_one_line(tmp_path):
    from pocketdiff.errors import PocketdiffError

    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(PocketdiffError, match="not a latency table"):
        LatencyTable.load(bad)


def test_removed_blocks_are_not_in_the_table_and_the_arch_changes(unet):
    import copy

    from pocketdiff.blocks.surgery import remove_blocks

    cut = remove_blocks(copy.deepcopy(unet), [next(iter(skippable_blocks(unet)))])
    lut = measure_lut(cut, resolution=32, runs=1, warmup=0, latent_factor=4)
    assert len(lut.blocks) == len(skippable_blocks(unet)) - 1 and lut.arch != arch_digest(unet)


@pytest.mark.slow  # an ONNX export per block (~25 s): CI's separate slow step
def test_onnxruntime_table(unet):
    lut = measure_lut(unet, runtime="onnxruntime", resolution=32, runs=2, warmup=1, latent_factor=4)
    assert set(lut.blocks) == set(skippable_blocks(unet)) and lut.total_ms > 0 and lut.runtime == "onnxruntime"
