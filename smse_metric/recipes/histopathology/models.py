"""EmbeddingNet: a timm backbone, an embedding head and a classifier head.

SMSE trains one network with two outputs: an embedding for the similarity loss and
class logits (from the embedding) for the reinforced focal loss.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import RecipeError

__all__ = [
    "FOUNDATION_MODELS",
    "POOLS",
    "EmbeddingNet",
    "SmallCNN",
    "backbone_data_config",
    "layer_kwargs",
    "load_backbone_weights",
]

#: backbones of this project (no timm name); everything else is created by timm
LOCAL_BACKBONES = ("smse-cnn",)
#: what the embedding head reads: the backbone's own pooled output, or (transformers)
#: the class token next to the mean of the patch tokens (Virchow's tile embedding)
POOLS = ("backbone", "cls_mean")
#: pathology foundation models whose layers differ from their architecture's default:
#: the ``timm.create_model`` arguments and pooling their model cards give, used where
#: ``model.backbone_kwargs`` / ``model.pool`` are empty (and written to the run's config)
FOUNDATION_MODELS: dict[str, tuple[dict[str, Any], str]] = {
    "hf-hub:MahmoodLab/uni": ({"init_values": 1e-5, "dynamic_img_size": True}, "backbone"),
    "hf-hub:MahmoodLab/UNI2-h": (
        {
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            "mlp_layer": "SwiGLUPacked",
            "act_layer": "SiLU",
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        "backbone",
    ),
    "hf-hub:bioptimus/H-optimus-0": (
        {"init_values": 1e-5, "dynamic_img_size": False},
        "backbone",
    ),
    "hf-hub:paige-ai/Virchow2": ({"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}, "cls_mean"),
}


def layer_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``model.backbone_kwargs`` for ``timm.create_model``: a string given for a
    ``*_layer`` argument names a class of ``timm.layers`` or ``torch.nn``
    (``mlp_layer = "SwiGLUPacked"``, ``act_layer = "SiLU"``), so that a TOML file can
    build the foundation models whose layers differ from their architecture's default.

    Args:
        kwargs: keyword arguments of ``timm.create_model``.

    Raises:
        RecipeError: naming the key, for a layer name neither module has.

    Examples:
        >>> kwargs = layer_kwargs({"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"})
        >>> kwargs["mlp_layer"].func.__name__, kwargs["act_layer"]
        ('GluMlp', <class 'torch.nn.modules.activation.SiLU'>)
    """
    import timm.layers

    out = dict(kwargs)
    for key, value in kwargs.items():
        if key.endswith("_layer") and isinstance(value, str):
            found = getattr(timm.layers, value, None) or getattr(nn, value, None)
            if not callable(found):
                raise RecipeError(
                    f"model.backbone_kwargs.{key}: {value!r} is not a layer of timm.layers "
                    "or torch.nn"
                )
            out[key] = found
    return out


class SmallCNN(nn.Module):
    """The SMSE paper's kind of network: six 3x3 convolutions with batch norm and PReLU,
    a max-pool after each pair, global average pooling; ``[B, 3, H, W] -> [B, 128]``.

    Small enough to train in seconds on a CPU, which is what the demo needs.

    Args:
        widths: output channels of the six convolutions (a max-pool after each pair).

    Examples:
        >>> SmallCNN()(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 128])
    """

    def __init__(self, widths: tuple[int, ...] = (32, 32, 64, 64, 128, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(widths):
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.PReLU(c)]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.num_features = c_in
        #: inputs as timm describes them: trained from scratch on images around 0.5
        self.pretrained_cfg = {
            "mean": (0.5, 0.5, 0.5),
            "std": (0.25, 0.25, 0.25),
            "interpolation": "bilinear",
        }

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).mean((2, 3))


def backbone_data_config(backbone: nn.Module) -> dict:
    """The input normalisation a backbone expects: ``{"mean", "std", "interpolation"}``
    from its timm ``pretrained_cfg`` (ImageNet's for most timm models).

    Args:
        backbone: a timm model (or any module with a ``pretrained_cfg``).

    Examples:
        >>> cfg = backbone_data_config(EmbeddingNet("resnet18").backbone)
        >>> cfg["mean"], cfg["interpolation"]
        ((0.485, 0.456, 0.406), 'bicubic')
    """
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(backbone)
    return {
        "mean": tuple(float(v) for v in cfg["mean"]),
        "std": tuple(float(v) for v in cfg["std"]),
        "interpolation": str(cfg.get("interpolation") or "bilinear"),
    }


def load_backbone_weights(module: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load a local ``.safetensors`` or ``.pt`` / ``.pth`` state dict into ``module``.

    ``.pt`` files are read with ``torch.load(weights_only=True)``. Classifier keys the
    backbone does not have are ignored; returns the ``missing`` and ``unexpected`` keys.

    Args:
        module: the backbone to load into (``EmbeddingNet.backbone``).
        path: a ``.safetensors``, ``.pt`` or ``.pth`` file holding a state dict.

    Examples:
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
        raise RecipeError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
    except pickle.UnpicklingError as e:  # weights_only refused an object: never load it
        raise RecipeError(
            f"weights file {path} holds objects other than tensors; give a "
            "state dict (.pt) or a .safetensors file"
        ) from e
    except Exception as e:  # empty, truncated, not a torch or safetensors file
        raise RecipeError(
            f"weights file {path} is empty, truncated or not a "
            f"{'safetensors' if path.suffix == '.safetensors' else 'torch'} "
            f"file ({type(e).__name__})"
        ) from e
    if not isinstance(state, dict):
        raise RecipeError(f"{path} does not hold a state dict")
    result = module.load_state_dict(state, strict=False)
    shared = set(state) & set(module.state_dict())
    if not shared:
        raise RecipeError(f"{path} shares no parameter names with the backbone")
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}


#: huggingface_hub's errors for a repository that needs access the caller lacks (a gated
#: model without a token, or without its terms accepted)
_HUB_REFUSALS = ("GatedRepoError", "RepositoryNotFoundError")


def _refused_by_hub(e: BaseException | None) -> bool:
    """Whether ``e`` or an exception it was raised from is the Hub refusing access."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        status = getattr(getattr(e, "response", None), "status_code", None)
        if type(e).__name__ in _HUB_REFUSALS or status in (401, 403):
            return True
        e = e.__cause__ or e.__context__
    return False


class EmbeddingNet(nn.Module):
    """``x -> (embeddings [B, embedding_dim], logits [B, num_classes])``.

    Args:
        backbone: any timm model name, ``hf-hub:`` names included, or ``"smse-cnn"``
            (`SmallCNN`).
        pretrained: download the backbone's pretrained weights (only when asked).
        embedding_dim: size of the embedding.
        num_classes: classes of the classifier head (on the embedding, as in SMSE).
        normalize: L2-normalise the embeddings.
        weights: a local ``.safetensors`` / ``.pt`` file to load into the backbone
            instead of downloading.
        freeze_backbone: train the heads only: the backbone's parameters do not require
            gradients, it stays in eval mode (its normalisation statistics and dropout
            fixed) and runs under ``torch.no_grad``.
        backbone_kwargs: more keyword arguments of ``timm.create_model`` (`layer_kwargs`
            turns layer names into classes), e.g. ``{"init_values": 1e-5}`` for UNI;
            None or empty: those of `FOUNDATION_MODELS` for a model it names, else none.
        pool: ``"backbone"`` (its pooled output) or ``"cls_mean"``: a vision
            transformer's class token concatenated with the mean of its patch tokens;
            None: `FOUNDATION_MODELS`'s for a model it names, else ``"backbone"``.

    Examples:
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
        freeze_backbone: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        pool: str | None = None,
    ) -> None:
        super().__init__()
        import timm

        if embedding_dim < 1 or num_classes < 1:
            raise RecipeError(
                f"embedding_dim and num_classes must be >= 1, got {embedding_dim}, {num_classes}"
            )
        known_kwargs, known_pool = FOUNDATION_MODELS.get(backbone, ({}, "backbone"))
        #: the backbone's arguments and pooling as used (a run's config records them)
        self.backbone_kwargs: dict[str, Any] = dict(backbone_kwargs or known_kwargs)
        pool = known_pool if pool is None else pool
        if pool not in POOLS:
            raise RecipeError(f"model.pool must be one of {list(POOLS)}, got {pool!r}")
        extra = layer_kwargs(self.backbone_kwargs)
        if pool == "cls_mean":
            extra["global_pool"] = ""  # every token out; pooled in `features`
        if backbone in LOCAL_BACKBONES:
            if extra:
                raise RecipeError(
                    f"backbone {backbone!r} takes no model.backbone_kwargs nor model.pool"
                )
            if pretrained:
                raise RecipeError(f"backbone {backbone!r} has no pretrained weights")
            self.backbone = SmallCNN()
        elif not timm.is_model(backbone) and not backbone.startswith("hf-hub:"):
            raise RecipeError(
                f"backbone {backbone!r} is not a timm model nor one of {list(LOCAL_BACKBONES)}"
            )
        else:
            try:
                self.backbone = timm.create_model(
                    backbone, pretrained=pretrained, num_classes=0, **extra
                )
            except TypeError as e:  # an argument the architecture does not take
                raise RecipeError(f"model.backbone_kwargs for {backbone!r}: {e}") from e
            except Exception as e:
                if not pretrained:
                    raise
                if _refused_by_hub(e):
                    raise RecipeError(
                        f"the Hugging Face Hub refused {backbone!r} ({type(e).__name__}): a "
                        "gated model needs its terms accepted on the Hub and a token in "
                        "HF_TOKEN (or a login with the Hub's command line); or pass "
                        "--weights FILE (a local .safetensors / .pt)"
                    ) from e
                # one line the CLI can print: what failed and what to do instead
                raise RecipeError(
                    f"could not download pretrained weights for {backbone!r} "
                    f"({type(e).__name__}); offline, pass --weights FILE (a local "
                    ".safetensors / .pt) or --no-pretrained"
                ) from e
        if weights is not None:
            self.weights_report = load_backbone_weights(self.backbone, weights)
        self.backbone_name = backbone
        self.normalize = normalize
        # the pooled output size: models with a pre-logits layer report it apart
        width = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.pool = pool
        if pool == "cls_mean":
            prefix = getattr(self.backbone, "num_prefix_tokens", None)
            if not prefix:
                raise RecipeError(
                    f'model.pool = "cls_mean" needs a vision transformer with a class '
                    f"token; {backbone!r} has none"
                )
            self.prefix_tokens = int(prefix)
            width = 2 * self.backbone.num_features
        self.embed = nn.Linear(width, embedding_dim)
        self.head = nn.Linear(embedding_dim, num_classes)
        self.freeze_backbone = bool(freeze_backbone)
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> EmbeddingNet:
        super().train(mode)
        if self.freeze_backbone:  # a frozen backbone's batch norm keeps its statistics
            self.backbone.eval()
        return self

    def features(self, x: Tensor) -> Tensor:
        """The backbone's pooled features [B, F] (without autograd when frozen)."""
        if self.freeze_backbone:
            with torch.no_grad():
                return self._pooled(x)
        return self._pooled(x)

    def _pooled(self, x: Tensor) -> Tensor:
        out = self.backbone(x)
        if self.pool == "cls_mean":  # tokens [B, T, F]: class, registers, patches
            out = torch.cat([out[:, 0], out[:, self.prefix_tokens :].mean(1)], dim=1)
        return out

    def embed_only(self, x: Tensor) -> Tensor:
        """Embeddings of images [B, 3, H, W], or of the backbone's features [B, F]
        already computed (a frozen backbone's, from the feature cache)."""
        z = self.embed(x if x.ndim == 2 else self.features(x))
        return nn.functional.normalize(z, dim=1) if self.normalize else z

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.embed_only(x)
        return emb, self.head(emb)
