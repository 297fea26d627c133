"""Representation-alignment losses: the REPA projection loss (SiT features vs. encoder features)
and the VA-VAE vision-foundation (VF) loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from loss.gan import adaptive_weight
# The REPA projection loss is computed inside the SiT's training forward, and models do not
# import losses: it lives beside the layers and is re-exported here with the other alignment losses.
from models.layers import projection_loss  # noqa: F401


# --------------------------------------------------------------------------------------------
# VA-VAE vision-foundation (VF) loss
# --------------------------------------------------------------------------------------------
def vf_loss(z_proj: torch.Tensor, aux_feature: torch.Tensor, distmat_margin: float = 0.0, cos_margin: float = 0.0,
            distmat_weight: float = 1.0, cos_weight: float = 1.0) -> dict:
    """VA-VAE's VF loss between projected latents and foundation features on the same grid.

    z_proj (= linear_proj(z)), aux_feature: [B, C, h, w]. With zn, fn the features L2-normalised
    over C at each of the N = h*w positions (row-major):
      vf_loss_distmat = mean_{b,i,j} relu(|zn_i . zn_j - fn_i . fn_j| - distmat_margin)  (full N x N,
                        diagonal included: the marginal distance-matrix similarity)
      vf_loss_cos     = mean_{b,n} relu(1 - cos_margin - cos(f_n, z_n))  (marginal cosine similarity)
      vf_loss         = distmat_weight * vf_loss_distmat + cos_weight * vf_loss_cos
    Returns {"vf_loss", "vf_loss_distmat", "vf_loss_cos"} (0-d tensors). Margins let the latent
    deviate from the foundation structure by that much without penalty.
    """
    if z_proj.shape != aux_feature.shape:
        raise ValueError(f"vf_loss: projected latent {tuple(z_proj.shape)} and foundation features "
                         f"{tuple(aux_feature.shape)} differ (resize the features to the latent grid and set "
                         f"linear_proj's width to the foundation width)")
    aux_feature = aux_feature.to(z_proj.dtype)
    zn = F.normalize(z_proj.flatten(2), dim=1)  # [B, C, N]
    fn = F.normalize(aux_feature.flatten(2), dim=1)  # [B, C, N]
    z_sim = torch.bmm(zn.transpose(1, 2), zn)  # [B, N, N]
    f_sim = torch.bmm(fn.transpose(1, 2), fn)  # [B, N, N]
    distmat = F.relu((z_sim - f_sim).abs() - distmat_margin).mean()
    cos = F.relu(1 - cos_margin - F.cosine_similarity(aux_feature, z_proj, dim=1)).mean()  # over [B, h, w]
    return {"vf_loss": distmat * distmat_weight + cos * cos_weight, "vf_loss_distmat": distmat, "vf_loss_cos": cos}


def adaptive_vf_weight(nll_loss: torch.Tensor, vf: torch.Tensor, enc_last_layer: torch.Tensor,
                       vf_weight: float) -> torch.Tensor:
    """VA-VAE's adaptive VF weight: clamp(||d nll/d W|| / (||d vf/d W|| + 1e-4), 0, 1e8) * vf_weight,
    detached, with W = the ENCODER's `conv_out.weight` (the VF loss never reaches the decoder)."""
    return adaptive_weight(nll_loss, vf, enc_last_layer, max_weight=1e8) * vf_weight
