"""Per-block latency table (SnapFusion's latency lookup table) on a tiny UNet."""

import json

from pocketdiff.bench.blocks import blocks_markdown, by_type_and_resolution, per_block_latency, unet_blocks
from pocketdiff.cli import main
from pocketdiff.models.tiny import tiny_components


def test_every_block_is_timed_with_its_real_shape():
    unet = tiny_components(0)["unet"]
    rows = per_block_latency(unet, resolution=32, batch=1, runs=2, warmup=0, latent_factor=2, seq_len=16)
    names = {r["block"] for r in rows}
    assert names == {n for n, _ in unet_blocks(unet)}
    types = {r["type"] for r in rows}
    assert {"ResnetBlock2D", "Transformer2DModel", "Downsample2D", "Upsample2D"} <= types
    res = {r["block"]: r["resolution"] for r in rows}
    assert res["down_blocks.0.resnets.0"] == 16 and res["down_blocks.1.resnets.0"] == 8  # 32 px / f=2, then /2
    assert all(r["median_ms"] > 0 and r["params"] >= 0 for r in rows)
    assert sum(r["macs"] for r in rows if r["type"] == "ResnetBlock2D") > 0
    table = blocks_markdown(rows)
    assert "down_blocks.1.attentions.0" in table
    totals = by_type_and_resolution(rows)
    assert sum(t["blocks"] for t in totals) == len(rows)


def test_cli_per_block_json(tiny_folder, tmp_path, capsys):
    out = tmp_path / "blocks.json"
    assert main(["bench", "--model", str(tiny_folder), "--per-block", "--runs", "1", "--warmup", "0",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert any(r["type"] == "Transformer2DModel" for r in rows)
    assert "| block |" in capsys.readouterr().out


def test_cli_per_block_rejects_non_unet(capsys):
    assert main(["bench", "--arch", "sd15-vae", "--per-block"]) == 2
    assert "needs a UNet" in capsys.readouterr().err
