"""The diffusion MSE with optional Min-SNR weighting, shared by every objective.

Min-SNR (https://arxiv.org/abs/2303.09556) caps the per-timestep weight of the x0 loss at gamma. The
weight on the *chosen* target follows from SNR(t) = alpha_t^2 / sigma_t^2:

    sample (x0)   ->  min(SNR, gamma)
    epsilon       ->  min(SNR, gamma) / SNR
    v_prediction  ->  min(SNR, gamma) / (SNR + 1)

These are the weights the diffusers reference scripts compute (for the prior, whose scheduler
predicts `sample`, their code comment about noise prediction is stale; the numbers are right).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Per-sample loss weights [B] for the scheduler's prediction type."""
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
    noise_scheduler,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """Mean squared error in fp32; with `snr_gamma`, each sample's mean is Min-SNR weighted first."""
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")  # [B, ...]
    loss = loss.mean(dim=list(range(1, loss.ndim)))  # [B]
    return (loss * min_snr_weights(noise_scheduler, timesteps, snr_gamma)).mean()
