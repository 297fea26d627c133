"""The whole forward of one `train_ldm_only.py` step as one module: posterior sample, latent
normalisation, noising, network and losses (SiT: denoising + REPA projection loss; LightningDiT /
DiT^DH: flow matching + the velocity-direction term).

`--compile` compiles this module once, so the loss's many small elementwise ops and reductions
are traced with the network (one graph, fused by the compiler) and AOTAutograd compiles their
backward too; the optimizer step, clipping, EMA and logging stay outside.

Every random number of the step is drawn by `draw`, outside the forward, with the calls and in
the order of the eager trainer (posterior noise, training time, interpolation noise, label
dropout). A compiled step therefore consumes the global generator exactly as the eager one does
(inductor would otherwise draw in-graph from its own Philox stream), whatever the backend.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn

from models.diffusion import LatentNormalizer, VelocityModel, flow_matching_loss
from models.sit import sample_time as sit_sample_time
from transport import Transport


class LatentDiffusionLoss(nn.Module):
    """loss dict of a training step on cached posteriors: `forward(mean, std, labels, zs, draws)`
    with `draws = draw(mean, labels)`.

    family "sit": the SiT's own training forward on raw z (its input BatchNorm normalises), loss =
    mean denoising loss + proj_coeff * REPA loss; other families: z normalised by `normalizer`, time
    from `transport`, loss = mean of `flow_matching_loss` (+ direction_weight x direction term).
    Returns {"loss" (with grad), and detached terms for the logs}."""

    def __init__(self, net: nn.Module, family: str, normalizer: Optional[LatentNormalizer] = None,
                 transport: Optional[Transport] = None, data_at_one: bool = False, weighting: str = "uniform",
                 path_type: str = "linear", prediction: str = "v", proj_coeff: float = 0.0,
                 direction_weight: float = 0.0):
        super().__init__()
        if family != "sit" and (normalizer is None or transport is None):
            raise ValueError(f"LatentDiffusionLoss: family {family!r} needs a latent normalizer and a transport")
        # the network is reached through its velocity wrapper only, so it is registered once
        self.field = VelocityModel(net, data_at_one)
        self.family = family
        self.normalizer = normalizer if family != "sit" else None  # the SiT's BatchNorm normalises
        self.transport = transport
        self.sit_loss_kwargs = dict(weighting=weighting, path_type=path_type, prediction=prediction)
        self.proj_coeff = float(proj_coeff)
        self.direction_weight = float(direction_weight)

    @property
    def net(self) -> nn.Module:
        return self.field.net

    def draw(self, mean: torch.Tensor, labels: torch.Tensor) -> Dict[str, Optional[torch.Tensor]]:
        """The step's random inputs, in the eager trainer's order: eps (posterior sample, float32 like
        mean), t (SiT: its time [B,1,1,1]; others: the uniform draw [B] that `Transport.sample_time`
        maps), noise (float32 like mean), drop (label-dropout mask [B] bool, None in eval mode or
        without dropout)."""
        eps = torch.randn_like(mean, dtype=torch.float32)
        n = mean.shape[0]
        if self.family == "sit":
            kw = self.sit_loss_kwargs
            t = sit_sample_time(n, kw["weighting"], kw["path_type"], mean.device, torch.float32)
        else:
            t = torch.rand(n, device=mean.device)
        noise = torch.randn_like(mean, dtype=torch.float32)
        y_emb = self.net.y_embedder
        drop = y_emb.draw_drop_mask(labels) if self.net.training and y_emb.dropout_prob > 0 else None
        return {"eps": eps, "t": t, "noise": noise, "drop": drop}

    def forward(self, mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor, zs: Sequence[torch.Tensor],
                draws: Dict[str, Optional[torch.Tensor]]) -> Dict[str, torch.Tensor]:
        # posterior sample in float32 whatever the stored dtype; std = 0 for deterministic tokenizers
        z = mean.float() + std.float() * draws["eps"]
        if self.family == "sit":
            out = self.net(z, labels, zs, loss_kwargs=self.sit_loss_kwargs, time_input=draws["t"],
                           noises=draws["noise"], force_drop_ids=draws["drop"])
            denoising = out["denoising_loss"].mean()
            loss = denoising + self.proj_coeff * out["proj_loss"]
            return {"loss": loss, "denoising_loss": denoising.detach(), "proj_loss": out["proj_loss"].detach()}
        x = self.normalizer(z)
        t = self.transport.sample_time(draws["t"])
        per_sample, logs = flow_matching_loss(self.field, x, labels, t, draws["noise"], self.direction_weight,
                                              force_drop_ids=draws["drop"])
        losses = {"loss": per_sample.mean(), "mse": logs["mse"]}
        if "direction" in logs:
            losses["direction_loss"] = logs["direction"]
        return losses
