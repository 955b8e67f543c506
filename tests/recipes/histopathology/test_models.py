"""EmbeddingNet on timm backbones: shapes, normalisation, local weights, clear errors."""

import pytest
import torch
from safetensors.torch import save_file

from smse_metric.recipes.histopathology.errors import RecipeError
from smse_metric.recipes.histopathology.models import EmbeddingNet, load_backbone_weights


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenetv3_small_050"])
def test_outputs_and_normalisation(backbone):
    net = EmbeddingNet(backbone, embedding_dim=32, num_classes=3).eval()
    emb, logits = net(torch.randn(2, 3, 64, 64))
    assert emb.shape == (2, 32) and logits.shape == (2, 3)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    raw = EmbeddingNet(backbone, embedding_dim=32, normalize=False).eval()
    assert not torch.allclose(raw(torch.randn(2, 3, 64, 64))[0].norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_weights_load_into_the_backbone(tmp_path, suffix):
    src = EmbeddingNet("resnet18", embedding_dim=8)
    state = {k: v.contiguous() for k, v in src.backbone.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    net = EmbeddingNet("resnet18", embedding_dim=8, weights=path)
    for k, v in net.backbone.state_dict().items():
        torch.testing.assert_close(v, state[k])
    assert net.weights_report == {"missing": [], "unexpected": []}
    with pytest.raises(ValueError, match="shares no parameter names"):
        torch.save({"something": torch.zeros(1)}, tmp_path / "x.pt")
        load_backbone_weights(net.backbone, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="does not exist"):
        EmbeddingNet("resnet18", weights=tmp_path / "missing.pt")


def test_failed_download_suggests_local_weights_or_no_pretrained(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ValueError, match=r"--weights FILE.*--no-pretrained") as e:
        EmbeddingNet("resnet18", pretrained=True)
    assert "\n" not in str(e.value)  # one line for the CLI


def test_pretrained_offline_is_one_line_from_the_cli(monkeypatch, tmp_path, capsys):
    import timm

    from smse_metric.recipes.histopathology.cli import main

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    out = tmp_path / "run"
    assert main(["train", "--synthetic", "--pretrained", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--no-pretrained" in err
    assert not out.exists()  # refused before anything was written


def test_small_cnn_and_its_input_config():
    from smse_metric.recipes.histopathology.models import SmallCNN, backbone_data_config

    net = EmbeddingNet("smse-cnn", embedding_dim=8, num_classes=3)
    emb, logits = net(torch.randn(4, 3, 32, 32))
    assert emb.shape == (4, 8) and logits.shape == (4, 3)
    assert isinstance(net.backbone, SmallCNN)
    assert backbone_data_config(net.backbone)["std"] == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match="no pretrained weights"):
        EmbeddingNet("smse-cnn", pretrained=True)


def test_unknown_backbone_and_bad_sizes():
    with pytest.raises(ValueError, match="not a timm model"):
        EmbeddingNet("resnet_does_not_exist")
    with pytest.raises(ValueError, match="embedding_dim"):
        EmbeddingNet("resnet18", embedding_dim=0)


@pytest.mark.parametrize("backbone", ["resnet18", "smse-cnn"])
def test_a_frozen_backbone_keeps_its_weights_and_statistics_and_the_heads_learn(backbone):
    from smse_metric.recipes.histopathology import load_config
    from smse_metric.recipes.histopathology.build import make_optimizer

    torch.manual_seed(0)
    net = EmbeddingNet(backbone, embedding_dim=8, num_classes=2, freeze_backbone=True).train()
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}  # + BN statistics
    heads = [p.clone() for p in (*net.embed.parameters(), *net.head.parameters())]
    assert not net.backbone.training and net.embed.training  # train() keeps it in eval
    grads = []
    net.backbone.register_forward_hook(lambda m, i, out: grads.append(out.requires_grad))
    optimizer, _ = make_optimizer(load_config(overrides={"data": {"synthetic": True}}).optim, net)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in (*net.embed.parameters(), *net.head.parameters())
    }
    for _ in range(2):
        _, logits = net(torch.randn(4, 3, 32, 32))
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1])).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert grads == [False, False]  # no autograd graph through the backbone
    for k, v in net.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    after = (*net.embed.parameters(), *net.head.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(after, heads, strict=True))
    thawed = EmbeddingNet(backbone, embedding_dim=8, num_classes=2).train()
    assert thawed.backbone.training and all(p.requires_grad for p in thawed.parameters())


@pytest.mark.parametrize("refusal", ["GatedRepoError", "RepositoryNotFoundError", "status 401"])
def test_a_gated_hub_model_without_a_token_names_hf_token_and_weights(monkeypatch, refusal):
    import timm

    class Response:
        status_code = 401

    class HubError(Exception):
        response = Response() if refusal == "status 401" else None

    HubError.__name__ = refusal if refusal != "status 401" else "HfHubHTTPError"

    def gated(*args, **kwargs):
        try:
            raise HubError("Access to model MahmoodLab/UNI is restricted")
        except HubError as inner:  # as timm raises it: from within its own handling
            raise RuntimeError("could not load") from inner

    monkeypatch.setattr(timm, "create_model", gated)
    with pytest.raises(ValueError, match=r"HF_TOKEN.*--weights FILE") as e:
        EmbeddingNet("hf-hub:MahmoodLab/UNI", pretrained=True)
    assert "\n" not in str(e.value) and "'hf-hub:MahmoodLab/UNI'" in str(e.value)


VIT = {"img_size": 32, "patch_size": 8}  # vit_tiny at 32 px: a ViT in milliseconds


def test_backbone_kwargs_build_layers_named_in_a_config():
    """UNI2-h / Virchow2-style arguments from TOML: layer names become timm / torch
    classes; a name neither has, or an argument the architecture refuses, is one line."""
    kwargs = {**VIT, "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU", "reg_tokens": 2}
    net = EmbeddingNet("vit_tiny_patch16_224", embedding_dim=8, backbone_kwargs=kwargs)
    mlp = net.backbone.blocks[0].mlp
    assert type(mlp).__name__ == "GluMlp" and isinstance(mlp.act, torch.nn.SiLU)
    assert net.backbone.num_prefix_tokens == 3  # the class token and two registers
    with pytest.raises(RecipeError, match=r"model\.backbone_kwargs\.mlp_layer: 'NoSuch'"):
        EmbeddingNet("vit_tiny_patch16_224", backbone_kwargs={"mlp_layer": "NoSuch"})
    with pytest.raises(RecipeError, match=r"model\.backbone_kwargs for 'resnet18'"):
        EmbeddingNet("resnet18", backbone_kwargs={"reg_tokens": 2})
    with pytest.raises(RecipeError, match=r"takes no model\.backbone_kwargs"):
        EmbeddingNet("smse-cnn", backbone_kwargs={"img_size": 32})


def test_cls_mean_pool_is_the_class_token_next_to_the_mean_patch_token():
    net = EmbeddingNet(
        "vit_tiny_patch16_224",
        embedding_dim=8,
        backbone_kwargs={**VIT, "reg_tokens": 4},
        pool="cls_mean",
        freeze_backbone=True,
    )
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = net.backbone.forward_features(x)  # [B, 1 + 4 + 16, 192]
    assert tokens.shape == (3, 21, 192)
    for b in range(3):  # a naive loop: token 0, then the mean of tokens 5..20
        patch_mean = sum(tokens[b, t] for t in range(5, 21)) / 16
        want = torch.cat([tokens[b, 0], patch_mean])
        torch.testing.assert_close(net.features(x)[b], want, rtol=1e-5, atol=1e-6)
    assert net.embed.in_features == 384 and net(x)[0].shape == (3, 8)
    with pytest.raises(RecipeError, match="needs a vision transformer with a class token"):
        EmbeddingNet("resnet18", pool="cls_mean")


def test_a_known_foundation_model_gets_its_model_cards_arguments(monkeypatch):
    """Virchow2 by name: timm is asked with its card's layers and every token out, the
    heads read class token + patch mean, and the run's config records both (a stand-in
    ViT is built instead of downloading)."""
    import timm

    from smse_metric.recipes.histopathology import load_config
    from smse_metric.recipes.histopathology.build import build_model, resolve_inputs
    from smse_metric.recipes.histopathology.models import FOUNDATION_MODELS

    asked = []
    real = timm.create_model

    def stand_in(name, **kwargs):
        asked.append((name, kwargs))
        return real("vit_tiny_patch16_224", **{**kwargs, **VIT, "reg_tokens": 4})

    monkeypatch.setattr(timm, "create_model", stand_in)
    name = "hf-hub:paige-ai/Virchow2"
    cfg = load_config(overrides={"data": {"synthetic": True}, "model": {"backbone": name}})
    net = build_model(cfg)
    (called, kwargs), card = asked[0], FOUNDATION_MODELS[name][0]
    assert called == name and kwargs["global_pool"] == ""
    assert {k: kwargs[k] for k in card if k not in ("mlp_layer", "act_layer")} == {
        k: v for k, v in card.items() if k not in ("mlp_layer", "act_layer")
    }
    assert isinstance(net.backbone.blocks[0].mlp.act, torch.nn.SiLU) and net.pool == "cls_mean"
    resolved = resolve_inputs(cfg, net)
    assert resolved.model.backbone_kwargs == card and resolved.model.pool == "cls_mean"
    own = {"backbone": name, "backbone_kwargs": {"init_values": 1e-5}, "pool": "backbone"}
    cfg = load_config(overrides={"data": {"synthetic": True}, "model": own})
    assert build_model(cfg).pool == "backbone"  # the config's own arguments win
    assert asked[-1][1]["init_values"] == 1e-5 and "mlp_layer" not in asked[-1][1]
