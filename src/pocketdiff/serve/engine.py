"""The model behind the server: one loaded pipeline, the sizes it serves, and a batch of jobs -> PNG bytes."""

from __future__ import annotations

from dataclasses import dataclass

from .batcher import Job


class Cancelled(Exception):
    """Every job of a running batch was cancelled: sampling stops at the next step."""


@dataclass
class Engine:
    pipe: object  # a pocketdiff Pipeline (torch or onnxruntime backend)
    name: str  # the model's name as the client names it (a shipped name or the folder's name)

    @property
    def sizes(self) -> list[str]:
        """The sizes served, "WxH": the model's native size (64x64 for the Shapes models)."""
        side = self.pipe.default_size
        return [f"{side}x{side}"]

    def batch_key(self, steps: int | None, sampler: str | None, guidance: float | None, width: int,
                  height: int) -> tuple:
        """What a job runs with (the model card's settings where the request leaves them out), which jobs must
        share to run in one batch: (sampler, steps, guidance, height, width)."""
        chosen = self.pipe.settings(steps, sampler, guidance)
        return chosen.sampler, chosen.steps, chosen.guidance, height, width

    def run(self, jobs: list[Job]) -> list[list[bytes]]:
        """One pipeline call for all images of ``jobs`` (same key); each job's PNGs, with generate's metadata."""
        import torch

        from ..images import image_metadata, png_bytes

        sampler, steps, guidance, height, width = jobs[0].key
        chosen = self.pipe.settings(steps, sampler, guidance)
        prompts = [p for j in jobs for p in j.prompts]
        negatives = [j.negative_prompt or "" for j in jobs for _ in j.prompts]
        gens = [torch.Generator().manual_seed(s) for j in jobs for s in j.seeds]

        def on_step(_info) -> None:
            for j in jobs:
                j.step += 1
            if not any(j.live() for j in jobs):
                raise Cancelled

        try:
            result = self.pipe(prompts, negative_prompt=negatives, steps=steps, sampler=sampler, guidance=guidance,
                               generator=gens, height=height, width=width, callback=on_step)
        except Cancelled:
            return [Cancelled() for _ in jobs]
        images = iter(result.images)
        out = []
        for j in jobs:
            out.append([png_bytes(im, image_metadata(p, j.negative_prompt, s, chosen, self.name, im))
                        for p, s, im in zip(j.prompts, j.seeds, images)])
        return out
