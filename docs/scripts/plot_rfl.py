"""Draw docs/img/rfl.png: loss and gradient of the reinforced focal loss against
cross-entropy and the focal loss, as functions of the true class's probability.

    python docs/scripts/plot_rfl.py            (run by `make docs`)
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from smse_metric.functional import focal_loss, reinforced_focal_loss

OUT = Path(__file__).resolve().parents[1] / "img" / "rfl.png"


def curves(p: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (loss, dloss/dz)} for two-class logits [z, 0], where p = sigmoid(z)."""
    z = torch.logit(p).double().requires_grad_()
    logits = torch.stack([z, torch.zeros_like(z)], dim=1)
    target = torch.zeros(len(p), dtype=torch.long)
    losses = {
        "cross-entropy": torch.nn.functional.cross_entropy(logits, target, reduction="none"),
        "focal, gamma = 2": focal_loss(logits, target, gamma=2.0, reduction="none"),
        "RFL, alpha = 2, gamma = 1.5": reinforced_focal_loss(
            logits, target, 2.0, 1.5, reduction="none"
        ),
        "RFL, alpha = 2, gamma = 0.5": reinforced_focal_loss(
            logits, target, 2.0, 0.5, reduction="none"
        ),
    }
    out = {}
    for name, loss in losses.items():
        (grad,) = torch.autograd.grad(loss.sum(), z)
        out[name] = (loss.detach(), grad)
    return out


def main(out: Path = OUT) -> Path:
    p = torch.linspace(0.005, 0.995, 400, dtype=torch.float64)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, (loss, grad) in curves(p).items():
        a.plot(p, loss, label=name)
        b.plot(p, -grad, label=name)
    a.set(xlabel="probability of the true class", ylabel="loss", ylim=(0, 4), title="loss")
    b.set(
        xlabel="probability of the true class",
        ylabel="-dL / d logit",
        title="push on the true logit",
    )
    a.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
