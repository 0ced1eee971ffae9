"""Where on the schedule does the testbed's memorization signal live? Wen's `d` and the anisotropy cosine,
both evaluated on the same pure noise x_T at several timesteps, memorized vs held-out (AUC, n=4).

Exploratory: the timestep is chosen here on the very prompts it is scored on, so the best row is optimistic; no
detector uses it. About 1 min on 2 CPU cores:
    python tools/noise_level_sweep.py
"""

from __future__ import annotations

import torch

from diffmem.detectors.base import encode_text, initial_noise
from diffmem.measures.detection import roc_auc
from diffmem.models.epsilon import to_epsilon
from diffmem.models.loading import load_pipeline, quiet_diffusers
from diffmem.testbed.recipe import shipped_recipe


@torch.no_grad()
def terms(pipe, prompts: list[str], x: torch.Tensor, t: torch.Tensor, scheduler) -> tuple[torch.Tensor, ...]:
    """Mean over generations of `d` and of the channel cosine(eps_u, eps_c - eps_u), per prompt, at `t` on `x`."""
    n = x.shape[0]
    eps_u = to_epsilon(pipe.unet(x, t, encoder_hidden_states=encode_text(pipe, [""]).expand(n, -1, -1)).sample,
                       x, t, scheduler)
    d, cos = [], []
    for start in range(0, len(prompts), 64):
        chunk = prompts[start : start + 64]
        xs = x.repeat(len(chunk), 1, 1, 1)
        cond = encode_text(pipe, chunk).repeat_interleave(n, 0)
        diff = to_epsilon(pipe.unet(xs, t, encoder_hidden_states=cond).sample, xs, t, scheduler) - eps_u.repeat(
            len(chunk), 1, 1, 1)
        d.append(diff.flatten(1).norm(dim=1).reshape(-1, n).mean(1))
        cos.append(torch.nn.functional.cosine_similarity(eps_u.repeat(len(chunk), 1, 1, 1), diff, dim=1)
                   .mean(dim=(1, 2)).reshape(-1, n).mean(1))
    return torch.cat(d), torch.cat(cos)


def main() -> None:
    quiet_diffusers()
    pipe = load_pipeline("testbed", device="cpu", dtype=torch.float32)
    splits = shipped_recipe().splits()
    mem, held = [i.caption for i in splits.planted], [i.caption for i in splits.heldout]
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(50)
    x = initial_noise(pipe, 4, 0)
    print("timestep  AUC of d  AUC of cosine")
    for index in (0, 10, 20, 30, 40, 45, 47, 49):
        t = scheduler.timesteps[index]
        (dm, cm), (dh, ch) = terms(pipe, mem, x, t, scheduler), terms(pipe, held, x, t, scheduler)
        print(f"{int(t):8d}  {roc_auc(dm.numpy(), dh.numpy()):8.3f}  {roc_auc(cm.numpy(), ch.numpy()):13.3f}")


if __name__ == "__main__":
    main()
