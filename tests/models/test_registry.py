"""Model names and the sampling settings every command takes from a model's card."""

import pytest

from pocketdiff.models.registry import FALLBACK_SAMPLING, sampling_settings


def test_given_values_win_then_the_card_then_the_fallback():
    card = {"steps": 2, "sampler": "lcm", "guidance": 4}
    s = sampling_settings(card, steps=None, sampler=None, guidance=1.5)
    assert (s.steps, s.sampler, s.guidance) == (2, "lcm", 1.5)
    assert s.source == {"steps": "card", "sampler": "card", "guidance": "given"}
    s = sampling_settings({}, None, None, None)
    assert (s.steps, s.sampler, s.guidance) == tuple(FALLBACK_SAMPLING.values())
    assert set(s.source.values()) == {"fallback"} and "25 steps (fallback)" in s.line()


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_commands_sample_with_the_lcm_card_and_say_so(command, tmp_path, capsys):
    from pocketdiff.testing import run_cli

    args = {"generate": ["generate", "a large blue heart in the center on a white background", "-o",
                         tmp_path / "x.png"],
            "eval": ["eval", "--n", 2, "--batch-size", 2]}[command]
    code, out, err = run_cli([*args, "--model", "shapes-lcm", "--no-progress"], capsys)
    assert code == 0, err
    assert "sampling: 2 steps (card), lcm (card)" in out


def test_the_python_api_takes_the_card_defaults():
    from pocketdiff import load_pipeline

    pipe = load_pipeline("shapes-lcm", runner="eager")
    r = pipe("a large blue heart in the center on a white background", output_type="latent")
    assert r.settings.steps == 2 and r.settings.sampler == "lcm" and len(r.timings.unet_steps) == 2
