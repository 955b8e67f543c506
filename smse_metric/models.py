"""EmbeddingNet: a timm backbone, an embedding head and a classifier head.

SMSE trains one network with two outputs: an embedding for the similarity loss and
class logits (from the embedding) for the reinforced focal loss.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["EmbeddingNet", "load_backbone_weights"]


def load_backbone_weights(module: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load a local ``.safetensors`` or ``.pt`` / ``.pth`` state dict into ``module``.

    ``.pt`` files are read with ``torch.load(weights_only=True)``. Classifier keys the
    backbone does not have are ignored; returns the ``missing`` and ``unexpected`` keys.

    Example:
        >>> import tempfile, pathlib
        >>> src = EmbeddingNet("resnet18", embedding_dim=8)
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "backbone.pt"
        >>> torch.save(src.backbone.state_dict(), path)
        >>> dst = EmbeddingNet("resnet18", embedding_dim=8)
        >>> load_backbone_weights(dst.backbone, path)
        {'missing': [], 'unexpected': []}
        >>> torch.equal(dst.backbone.conv1.weight, src.backbone.conv1.weight)
        True
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    result = module.load_state_dict(state, strict=False)
    shared = set(state) & set(module.state_dict())
    if not shared:
        raise ValueError(f"{path} shares no parameter names with the backbone")
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}


class EmbeddingNet(nn.Module):
    """``x -> (embeddings [B, embedding_dim], logits [B, num_classes])``.

    Args:
        backbone: any timm model name, ``hf-hub:`` names included.
        pretrained: download the backbone's pretrained weights (only when asked).
        embedding_dim: size of the embedding.
        num_classes: classes of the classifier head (on the embedding, as in SMSE).
        normalize: L2-normalise the embeddings.
        weights: a local ``.safetensors`` / ``.pt`` file to load into the backbone
            instead of downloading.

    Example:
        >>> net = EmbeddingNet("resnet18", embedding_dim=64, num_classes=2)
        >>> emb, logits = net(torch.randn(2, 3, 64, 64))
        >>> emb.shape, logits.shape
        (torch.Size([2, 64]), torch.Size([2, 2]))
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        pretrained: bool = False,
        embedding_dim: int = 128,
        num_classes: int = 2,
        normalize: bool = True,
        weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        import timm

        if embedding_dim < 1 or num_classes < 1:
            raise ValueError(
                f"embedding_dim and num_classes must be >= 1, got {embedding_dim}, {num_classes}"
            )
        try:
            self.backbone = timm.create_model(backbone, pretrained=pretrained, num_classes=0)
        except Exception as e:
            if "Unknown model" in str(e):
                raise ValueError(f"backbone {backbone!r} is not a timm model") from e
            if not pretrained:
                raise
            raise RuntimeError(
                f"could not download pretrained weights for {backbone!r} ({type(e).__name__}: "
                f"{e}). Use a local file with --weights FILE (.safetensors or .pt), or train "
                "from scratch with --no-pretrained."
            ) from e
        if weights is not None:
            self.weights_report = load_backbone_weights(self.backbone, weights)
        self.backbone_name = backbone
        self.normalize = normalize
        # the pooled output size: models with a pre-logits layer report it apart
        width = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.embed = nn.Linear(width, embedding_dim)
        self.head = nn.Linear(embedding_dim, num_classes)

    def embed_only(self, x: Tensor) -> Tensor:
        z = self.embed(self.backbone(x))
        return nn.functional.normalize(z, dim=1) if self.normalize else z

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.embed_only(x)
        return emb, self.head(emb)
