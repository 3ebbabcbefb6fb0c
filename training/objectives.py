"""Training objectives as pure functions of denoising errors: SFT, Diffusion-DPO, Diffusion-KTO.

Every objective works on per-example denoising errors, mean((prediction - target)^2) over
(C, H, W), for the adapter model and (for DPO/KTO) the reference: the same UNet with the
adapter switched off. A lower error is read as a higher likelihood, which is how the diffusion
versions of DPO (Wallace et al. 2023) and KTO (Li et al. 2024) turn preference losses on
log-probabilities into losses on errors.

Each returns (loss, metrics): metrics are plain floats for the progress bar and the report.
Each takes optional per-example loss weights, (B,) (the dataset's "weight" column: curation's
confidence in the example's label); the loss is the weighted mean, the metrics stay unweighted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def denoising_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example mean squared error: (B, C, H, W) -> (B,), computed in fp32."""
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def min_snr_weights(snr: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): easy, low-noise timesteps stop dominating."""
    clipped = torch.clamp(snr, max=gamma)
    # For v-prediction the loss is already scaled by (snr + 1) relative to epsilon.
    return clipped / (snr + 1) if v_prediction else clipped / snr


def sft(model_error: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain denoising loss on the dataset's images, optionally Min-SNR weighted."""
    return _weighted_mean(model_error, weights), {}


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return (values * weights).mean() if weights is not None else values.mean()


def dpo(model_preferred: torch.Tensor, model_rejected: torch.Tensor, reference_preferred: torch.Tensor,
        reference_rejected: torch.Tensor, beta: float,
        weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Diffusion-DPO: lower the preferred image's error more than the rejected one's, relative to the reference.

    Both images of a pair share noise and timestep, so their errors are comparable. Ties are
    dropped when the dataset loads; a margin of exactly zero (the very first step, when the
    adapter is still zero) counts as half right, the way a coin flip would.
    """
    model_margin = model_preferred - model_rejected
    reference_margin = reference_preferred - reference_rejected
    inside = -0.5 * beta * (model_margin - reference_margin)
    loss = _weighted_mean(-F.logsigmoid(inside), weights)
    accuracy = ((inside > 0).float() + 0.5 * (inside == 0).float()).mean()
    return loss, {
        "implicit_acc": accuracy.item(),
        # Negative: the adapter separates preferred from rejected more than the base model does.
        "ref_gap": (model_margin - reference_margin).mean().item(),
    }


def kto(model_error: torch.Tensor, reference_error: torch.Tensor, desirable: torch.Tensor, beta: float,
        kl_estimate: float, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float], float]:
    """Diffusion-KTO: raise the implicit reward of liked images above a reference point, lower disliked ones.

    The implicit reward is beta x (reference error - model error). The reference point is an
    estimate of the KL between adapter and base model; we keep it as a running mean of the
    batch rewards (clamped at zero, no gradient), which works at batch size 1 where the
    per-batch estimate would cancel the reward exactly. Returns the updated estimate too.
    """
    reward = beta * (reference_error - model_error)
    new_kl = 0.9 * kl_estimate + 0.1 * max(reward.detach().mean().item(), 0.0)
    desirable = desirable.to(reward.dtype)
    value = desirable * torch.sigmoid(reward - new_kl) + (1 - desirable) * torch.sigmoid(new_kl - reward)
    loss = _weighted_mean(1 - value, weights)
    correct = torch.where(desirable > 0, reward > 0, reward < 0).float() + 0.5 * (reward == 0).float()
    metrics = {
        "implicit_acc": correct.mean().item(),
        # Negative: the adapter denoises these images better than the base model does.
        "ref_gap": (model_error - reference_error).mean().item(),
    }
    return loss, metrics, new_kl
