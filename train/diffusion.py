"""The diffusion math every objective shares: the noise/timestep draw, the target, the (Min-SNR) MSE.

An objective (train/prior.py, train/decoder.py) only says what is noised (normalised CLIP image
embeddings, MoVQ latents) and how its model is called; what happens around that call is here, once:

- `draw_noise_and_timesteps`: the reference scripts' `torch.randn_like(x)` then
  `torch.randint(0, num_train_timesteps, (B,))`, in that order, on the global torch RNG (which
  accelerate checkpoints, so a resumed run draws the same noise);
- `prediction_target`: what the model predicts under the scheduler's `prediction_type`;
- `diffusion_mse` with `min_snr_weights`: Min-SNR (https://arxiv.org/abs/2303.09556) caps the
  per-timestep weight of the x0 loss at gamma. The weight on the *chosen* target follows from
  SNR(t) = alpha_t^2 / sigma_t^2:

      sample (x0)   ->  min(SNR, gamma)
      epsilon       ->  min(SNR, gamma) / SNR
      v_prediction  ->  min(SNR, gamma) / (SNR + 1)

  These are the weights the diffusers reference scripts compute (for the prior, whose scheduler
  predicts `sample`, their code comment about noise prediction is stale; the numbers are right).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


def draw_noise_and_timesteps(clean: torch.Tensor, num_train_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise shaped like `clean` [B, ...] and timesteps [B] (int64) in [0, num_train_timesteps).

    Noise first, then timesteps, both from the global torch RNG on `clean.device`: the order of the
    reference scripts, which exact resume and the loss-equality tests rely on.
    """
    noise = torch.randn(clean.shape, device=clean.device)  # [B, ...]
    timesteps = torch.randint(0, num_train_timesteps, (clean.shape[0],), device=clean.device).long()  # [B]
    return noise, timesteps


def prediction_target(noise_scheduler: DDPMScheduler, clean: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor) -> torch.Tensor:
    """What the model predicts for `clean` [B, ...] noised with `noise` [B, ...] at `timesteps` [B].

    epsilon -> `noise`; v_prediction -> `get_velocity(clean, noise, t)`; sample -> `clean` (the prior).
    Raises ValueError for any other `prediction_type`.
    """
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(clean, noise, timesteps)
    if prediction_type == "sample":
        return clean
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def min_snr_weights(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Per-sample loss weights [B] for `timesteps` [B] under the scheduler's prediction type (see module doc).

    Raises ValueError for a prediction type without a Min-SNR weighting.
    """
    snr = compute_snr(noise_scheduler, timesteps)  # [B]
    clipped = snr.clamp(max=snr_gamma)  # [B] min(SNR, gamma)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "sample":
        return clipped
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"no Min-SNR weighting for prediction_type {prediction_type!r}")


def diffusion_mse(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler: DDPMScheduler,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """Scalar mean squared error in fp32 of `model_pred` vs `target` [B, ...].

    With `snr_gamma`, each sample's mean is first weighted by `min_snr_weights` for `timesteps` [B],
    as the reference scripts do.
    """
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")  # [B, ...]
    loss = loss.mean(dim=list(range(1, loss.ndim)))  # [B]
    return (loss * min_snr_weights(noise_scheduler, timesteps, snr_gamma)).mean()
