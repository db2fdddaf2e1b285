"""Helpers for pocketdiff's tests (and for users testing their own recipes against the CLI)."""

from __future__ import annotations

from pathlib import Path


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """Run ``pocketdiff ARGV`` in-process; (exit code, stdout, stderr). argparse's own exits count too."""
    from .cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors exit from inside parse_args
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def tree(folder: Path) -> list[str]:
    """Every path below ``folder`` (hidden temp folders included), sorted: to assert nothing was left behind."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


# Bad inputs to ``pocketdiff generate`` (extra arguments after a prompt and -o; None: no prompt at all; "{tmp}" is
# a scratch folder holding empty.txt and folder.png/). Each must end in one error line and exit 2, writing nothing:
# tests/test_cli.py checks that, and benchmarks/bad_inputs.py tabulates the messages for docs/RESULTS.md.
BAD_GENERATE_INPUTS: dict[str, list | None] = {
    "steps-0": ["--steps", 0],
    "guidance-nan": ["--guidance", "nan"],
    "guidance-inf": ["--guidance", "inf"],
    "sampler-unknown": ["--sampler", "nope"],
    "height-33": ["--height", 33],
    "height-0": ["--height", 0],
    "lcm-more-steps-than-distilled": ["--sampler", "lcm", "--steps", 60],
    "steps-over-train-timesteps": ["--steps", 2000],
    "num-images-0": ["--num-images", 0],
    "png-in-missing-folder": ["-o", "{tmp}/missing/x.png"],
    "missing-output-folder": ["-o", "{tmp}/missing"],
    "missing-prompt": None,
    "missing-prompts-file": ["--prompts-file", "{tmp}/nope.txt"],
    "empty-prompts-file": ["--prompts-file", "{tmp}/empty.txt"],
    "unknown-model": ["--model", "{tmp}/no-such-model"],
    "attention-chunk-0": ["--attention-chunk", 0],
    "vae-tile-not-multiple": ["--vae-tile", 12],
    "seed-too-large": ["--seed", 99999999999999999999],
    "seed-negative": ["--seed", -1],
    "size-beyond-memory": ["--height", 100000, "--width", 100000],
    "unsupported-extension": ["-o", "{tmp}/x.gif"],
    "output-png-is-a-folder": ["-o", "{tmp}/folder.png", "--overwrite"],
}


def write_tiny_sd(path) -> Path:
    """A random-weight folder with Stable Diffusion v1's layout at toy widths (``models.tiny.tiny_sd_components``:
    128 px, 77-token tokenizer, PNDM scheduler config): to try the SD commands without an SD download."""
    from .folder import save_components
    from .models.tiny import tiny_sd_components

    c = tiny_sd_components(0)
    save_components(Path(path), c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler_config"])
    return Path(path)


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving ``app`` in a thread; ``url`` is its base URL."""

    def __init__(self, app):
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        import time

        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def unet_output(unet, seed: int = 0):
    """One no-grad call of a tiny test UNet (4 latent channels, 32-wide text states) on fixed seeded inputs: two
    8x8 latents at t = 10 and 500; what block-surgery tests compare."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=text).sample
