"""Knowledge distillation of a compact UNet from its teacher (BK-SDM, Kim et al. 2023).

loss = w_task * |eps_s - target|^2 + w_out * |eps_s - eps_t|^2 + w_feat * sum_stages |f_s - f_t|^2

The stage features are the outputs of every down block, the mid block (when both have one) and every up
block, tapped with forward hooks on the *unwrapped* modules, so they keep working when accelerate wraps
the student in DistributedDataParallel. Which student stage is compared with which teacher stage is data
(:func:`feature_pairs`), shifted for BK-SDM-Tiny as its weight inheritance is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schedule import NoiseSchedule, target_for


@dataclass
class KDRecipe:
    student: str = "bk-tiny"  # a name of pocketdiff.models.compact.COMPACT_PRESETS
    task_weight: float = 1.0
    output_weight: float = 1.0
    feature_weight: float = 1.0
    caption_dropout: float = 0.1
    pool_size: int = 30_000
    inherit: bool = True  # seed the student with the teacher's weights (BK-SDM)


def feature_pairs(student: torch.nn.Module, teacher: torch.nn.Module) -> dict[str, str]:
    """Student stage module name -> teacher stage module name, matched by resolution (BK-SDM)."""
    n_s, n_t = len(student.down_blocks), len(teacher.down_blocks)
    shift = n_t - n_s  # Tiny drops the innermost stage: its up blocks start one later in the teacher
    # a down stage's output is after its downsampler: pair it only when both stages downsample alike
    # (Tiny's new last stage has none, so it is not compared with the teacher's downsampled one)
    pairs = {f"down_blocks.{i}": f"down_blocks.{i}" for i in range(n_s)
             if (student.down_blocks[i].downsamplers is None) == (teacher.down_blocks[i].downsamplers is None)}
    pairs.update({f"up_blocks.{i}": f"up_blocks.{i + shift}" for i in range(n_s)})
    if getattr(student, "mid_block", None) is not None and getattr(teacher, "mid_block", None) is not None:
        pairs["mid_block"] = "mid_block"
    return pairs


class FeatureTaps:
    """Forward hooks that keep the latest output tensor of named submodules."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        self.features: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            # down blocks return (hidden_states, residuals): the stage output is the first
            self.features[name] = output[0] if isinstance(output, tuple) else output

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def kd_loss(teacher: torch.nn.Module, student: torch.nn.Module, text_encoder: torch.nn.Module,
            schedule: NoiseSchedule, recipe: KDRecipe):
    """The BK-SDM loss as a recipe loss function ``(model, batch, step) -> (loss, terms)``.

    ``student`` is the unwrapped student (hooks live there); ``model`` passed in by the trainer may be its
    DDP wrapper and is what is called, so gradients synchronise.
    """
    pairs = feature_pairs(student, teacher)
    taps_s = FeatureTaps(student, list(pairs))
    taps_t = FeatureTaps(teacher, list(pairs.values()))
    abar = torch.as_tensor(schedule.alphas_cumprod, dtype=torch.float32)

    def loss_fn(model, batch: dict, step: int):
        x0 = batch["latents"]  # (B, 4, h, w)
        b = x0.shape[0]
        g = torch.Generator().manual_seed(int(batch["seed"]))
        t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].sqrt().view(b, 1, 1, 1)
        s = (1 - abar[t]).sqrt().view(b, 1, 1, 1)
        x_t = a * x0 + s * eps
        with torch.no_grad():
            states = text_encoder(batch["input_ids"])[0]  # (B, L, D)
            out_t = teacher(x_t, t, encoder_hidden_states=states).sample
        out_s = model(x_t, t, encoder_hidden_states=states).sample
        target = target_for(schedule.prediction_type, x0, eps, a, s)
        task = (out_s - target).pow(2).mean()
        out_kd = (out_s - out_t).pow(2).mean()
        feat = sum((taps_s.features[k] - taps_t.features[v].detach()).pow(2).mean() for k, v in pairs.items())
        loss = recipe.task_weight * task + recipe.output_weight * out_kd + recipe.feature_weight * feat
        return loss, {"task": float(task), "out_kd": float(out_kd), "feat_kd": float(feat)}

    loss_fn.taps = (taps_s, taps_t)  # kept alive with the closure; removable by the caller
    return loss_fn
