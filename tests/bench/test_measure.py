import json

import pytest
import torch
import torch.nn.functional as F

from pocketdiff.bench.measure import (bench_component, bench_pipeline, component_call, count_macs, count_params,
                                      format_table, peak_memory_mb, rows_to_markdown, time_call)
from pocketdiff.models import presets
from pocketdiff.models.tiny import tiny_components

ROW_FIELDS = {"name", "component", "resolution", "batch", "params", "macs", "gmacs", "median_ms", "min_ms",
              "max_ms", "peak_mb", "runs", "threads", "torch"}


@pytest.fixture(scope="module")
def tiny():
    return tiny_components(0)


def test_count_macs_linear_is_analytic():
    x = torch.randn(3, 7)  # (N, in)
    assert count_macs(torch.nn.Linear(7, 5), x) == 3 * 7 * 5


def test_count_macs_conv2d_is_analytic():
    x = torch.randn(2, 3, 10, 10)  # (B, C, H, W)
    # one MAC per output element per kernel tap per input channel
    assert count_macs(torch.nn.Conv2d(3, 8, 3, padding=1), x) == (2 * 8 * 10 * 10) * (3 * 3 * 3)


def test_count_macs_counts_cpu_attention():
    q = torch.randn(2, 4, 16, 8)  # (B, heads, L, E)
    # q @ k^T and attn @ v: 2 * B * heads * L * L * E
    assert count_macs(F.scaled_dot_product_attention, q, q, q) == 2 * (2 * 4 * 16 * 16 * 8)


def test_count_macs_on_meta_matches_cpu(tiny):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    fn, inputs = component_call("unet", tiny["unet"], resolution=16, latent_factor=2, seq_len=16)
    with init_empty_weights():
        meta = UNet2DConditionModel(**tiny["unet"].config)
    fn_meta, inputs_meta = component_call("unet", meta, resolution=16, latent_factor=2, seq_len=16)
    assert inputs_meta[0].is_meta
    assert count_macs(fn_meta, *inputs_meta) == count_macs(fn, *inputs) > 0


def test_count_params():
    assert count_params(torch.nn.Linear(7, 5)) == 7 * 5 + 5


def test_count_params_counts_int8_weights_of_a_quantized_model():
    from pocketdiff.quant.core import quantize_module

    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Conv2d(3, 4, 3))
    before = count_params(model)
    assert quantize_module(model) and count_params(model) == before


def test_time_call_fields():
    calls = []
    t = time_call(lambda: calls.append(1), runs=4, warmup=2)
    assert len(calls) == 6
    assert t["runs"] == 4
    assert 0 <= t["min_ms"] <= t["median_ms"] <= t["max_ms"] < 1000


def test_peak_memory_sees_a_100mb_allocation_and_not_a_noop():
    assert peak_memory_mb(lambda: torch.empty(25_000_000).fill_(1)) >= 80  # 100 MB of float32
    assert peak_memory_mb(lambda: None) < 40


@pytest.mark.parametrize("kind", ["unet", "vae", "text_encoder"])
def test_bench_component_tiny(tiny, kind):
    row = bench_component(f"tiny-{kind}", kind, tiny[kind], resolution=16, latent_factor=2, runs=2, warmup=1)
    assert set(row) == ROW_FIELDS
    assert row["component"] == kind and row["resolution"] == 16 and row["runs"] == 2
    for key in ("params", "macs", "median_ms", "min_ms", "max_ms", "threads"):
        assert row[key] > 0, key
    assert row["peak_mb"] >= 0
    assert json.loads(json.dumps(row)) == row


def test_component_call_unet_inputs(tiny):
    _, (sample, t, text) = component_call("unet", tiny["unet"], resolution=16, batch=3, latent_factor=2, seq_len=5)
    assert sample.shape == (6, 4, 8, 8) and t.shape == (6,) and text.shape == (6, 5, 32)
    _, (sample, *_) = component_call("unet", tiny["unet"], resolution=16, batch=3, latent_factor=2, cfg=False)
    assert sample.shape[0] == 3
    with pytest.raises(ValueError):
        component_call("unet", tiny["unet"], resolution=15, latent_factor=2)


def test_component_call_lcm_unet_has_timestep_cond():
    unet = tiny_components(0, time_cond_proj_dim=8)["unet"]
    fn, inputs = component_call("unet", unet, resolution=16, latent_factor=2)
    assert inputs[-1].shape == (2, 8)
    assert fn(*inputs).shape == (2, 4, 8, 8)


def test_bench_pipeline_and_tables(tiny):
    from pocketdiff.pipeline import Pipeline

    pipe = Pipeline(tiny["unet"], tiny["vae"], tiny["text_encoder"], tiny["tokenizer"], tiny["scheduler_config"],
                    runner="eager", name="tiny")
    rows = bench_pipeline(pipe, runs=1, warmup=0)
    assert [r["component"] for r in rows] == ["text_encoder", "unet", "vae"]
    assert all(r["resolution"] == pipe.default_size for r in rows)
    table, md = format_table(rows), rows_to_markdown(rows)
    for r in rows:
        assert r["component"] in table and r["component"] in md
    assert len(table.splitlines()) == 2 + len(rows)
    assert md.splitlines()[1].startswith("| :---")


def test_sd15_unet_preset_has_sd15_parameter_count():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**presets.SD15_UNET)
    assert next(unet.parameters()).is_meta
    assert count_params(unet) == 859_520_964


def test_peak_memory_sampling_fallback(monkeypatch):
    from pocketdiff.bench import measure

    import time

    monkeypatch.setattr(measure, "_reset_peak_rss", lambda: False)  # as where clear_refs isn't writable

    def hold_100mb():  # a peak held for 50 ms: a sampler on a busy CPU may not run during a shorter one
        t = torch.empty(25_000_000).fill_(1)
        time.sleep(0.05)
        return t.sum()

    assert peak_memory_mb(hold_100mb) >= 80


def test_gemm_peak_and_the_share_of_it_a_row_reaches():
    from pocketdiff.bench.measure import gemm_peak, with_peak

    peak = gemm_peak(sizes=(64, 128), runs=2)
    assert peak["gflops"] > 0 and peak["size"] in (64, 128) and peak["threads"] >= 1
    rows = with_peak([{"macs": 5e9, "median_ms": 100.0}], {"gflops": 200.0})
    assert rows[0]["gflops"] == 100.0 and rows[0]["peak_pct"] == 50.0  # 2 x 5 GMAC in 0.1 s = 100 GFLOP/s
