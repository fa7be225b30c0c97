"""Image towers: each maps images (batch, 3, H, W) to features (batch, output_dim).

Three kinds, picked by ``ImageTowerConfig.kind``:

* ``vit``: the built-in :class:`VisionTransformer` (CLIP-style ViT, class-token output; or SigLIP's layout,
  attention pooling without a class token).
* ``torchvision``: any torchvision classification model with its final classifier Linear replaced by Identity.
* ``timm``: any timm model created headless (``num_classes=0``).

``resolve_image_preprocess`` is the single place that decides resize size, interpolation and normalization
for a tower; the data transforms read it instead of guessing.
"""

from __future__ import annotations

import torch
from torch import nn

from clipforge.config import BUILTIN_VIT_IMAGE_SIZE, ConfigError, ImageTowerConfig
from clipforge.data.transforms import ImagePreprocess
from clipforge.model.backbone_names import check_timm_name, check_torchvision_name
from clipforge.model.hosted_open_clip import open_clip_image_size
from clipforge.model.pretrained import load_weights_file, local_weights_file, weights_key_order
from clipforge.model.towers import Tower, TransformerTower
from clipforge.model.transformer import DEFAULT_NORM_EPS, AttentionPool, Transformer
from clipforge.packaged import is_packaged

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_IMAGE_SIZE = 224  # every torchvision classification weight set was trained at 224 px
VIT_POOLS = ("cls", "map")


# ----------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------
def resolve_image_preprocess(cfg: ImageTowerConfig) -> ImagePreprocess:
    """Preprocessing for the tower ``cfg`` describes; never touches the network.

    Each of size, mean/std and interpolation is ``cfg``'s when set (``image_size``, ``mean``/``std``,
    ``interpolation``), else the tower's own: for timm the pretrained config of ``name`` (or ``name.tag``) from
    timm's local registry (falling back to 224 px, ImageNet mean/std, bicubic for a name it does not know); for
    torchvision 224 px, ImageNet mean/std, bilinear; for the built-in ViT 64 px, CLIP's mean/std, bicubic; for
    the NaFlex tower SigLIP's mean/std (0.5), bilinear.
    The resize rule is ``cfg``'s as it stands (``resize_mode``, ``resize_size``, ``crop_rounding``,
    ``resize_backend``; by default the short side to the size, torchvision's crop rounding, PIL's resize, as
    open_clip and timm evaluate): imports set it to their source's.
    """
    if cfg.kind == "vit":
        size, mean, std, interpolation = BUILTIN_VIT_IMAGE_SIZE, CLIP_MEAN, CLIP_STD, "bicubic"
    elif cfg.kind == "torchvision":
        size, mean, std, interpolation = TORCHVISION_IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, "bilinear"
    elif cfg.kind == "timm":
        size, mean, std, interpolation = _timm_preprocess(cfg)
    elif cfg.kind == "naflex":  # SigLIP 2's own
        size, mean, std, interpolation = BUILTIN_VIT_IMAGE_SIZE, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear"
    elif cfg.kind == "open_clip":  # open_clip's defaults: its config's size, OpenAI's mean/std, bicubic
        size, mean, std, interpolation = open_clip_image_size(cfg), CLIP_MEAN, CLIP_STD, "bicubic"
    else:
        raise ValueError(
            f"model.image.kind={cfg.kind!r} is unknown; choose one of ['vit', 'torchvision', 'timm', 'naflex', 'open_clip']"
        )
    if cfg.mean:
        mean, std = tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)
    size = cfg.image_size or size
    interpolation = cfg.interpolation or interpolation
    naflex = {"patch_size": cfg.patch_size, "max_num_patches": cfg.max_num_patches}  # the NaFlex resize's own
    return ImagePreprocess(
        image_size=size,
        mean=mean,
        std=std,
        interpolation=interpolation,
        resize_mode=cfg.resize_mode,
        resize_size=cfg.resize_size,
        crop_rounding=cfg.crop_rounding,
        resize_backend=cfg.resize_backend,
        **(naflex if cfg.resize_mode == "naflex" else {}),
    )


def _timm_preprocess(cfg: ImageTowerConfig) -> tuple[int, tuple, tuple, str]:
    from timm.models import get_pretrained_cfg

    pretrained_cfg = get_pretrained_cfg(timm_model_name(cfg))  # a local table lookup: no download
    if pretrained_cfg is None:
        return TORCHVISION_IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, "bicubic"
    # the transforms know these three; timm's rare others ("random", "") fall back to bicubic
    interpolation = pretrained_cfg.interpolation
    interpolation = interpolation if interpolation in ("bicubic", "bilinear", "nearest") else "bicubic"
    size = int(pretrained_cfg.input_size[-1])
    return size, tuple(pretrained_cfg.mean), tuple(pretrained_cfg.std), interpolation


def timm_model_name(cfg: ImageTowerConfig) -> str:
    """``name`` or, when ``pretrained`` is a tag, ``name.tag`` (timm's way of naming one set of weights)."""
    if not _is_named_weights(cfg.pretrained):
        return cfg.name
    if "." in cfg.name:
        raise ValueError(
            f"model.image.name={cfg.name!r} already names a timm tag, and model.image.pretrained={cfg.pretrained!r} "
            f"names another; set pretrained to 'default' to use the tag in the name"
        )
    return f"{cfg.name}.{cfg.pretrained}"


def checked_timm_name(cfg: ImageTowerConfig) -> str:
    """:func:`timm_model_name`, after checking that timm knows the architecture and the tag (ConfigError)."""
    name = timm_model_name(cfg)
    check_timm_name(name, tag_field="model.image.name" if name == cfg.name else "model.image.pretrained")
    return name


# ----------------------------------------------------------------------------------------------
# Named weights: torchvision enums and timm tags
# ----------------------------------------------------------------------------------------------
def _is_named_weights(pretrained: str | None) -> bool:
    """A torchvision enum name or timm tag, i.e. not None, not "default", not packaged and not a local file."""
    return (
        pretrained is not None
        and pretrained != "default"
        and not is_packaged(pretrained)
        and local_weights_file(pretrained) is None
    )


# ----------------------------------------------------------------------------------------------
# Built-in ViT
# ----------------------------------------------------------------------------------------------
class VisionTransformer(TransformerTower):
    """CLIP-style ViT: conv patch embedding, class token, learned positions, pre-LN blocks.

    images (B, 3, S, S) -> patches (B, (S/p)^2, width) -> [class; patches] + positions -> ``ln_pre``
    -> blocks -> ``ln_post`` of the class token = features (B, width).
    The LayerNorm before the blocks (``ln_pre``) follows CLIP, so its checkpoints map onto this layout.

    ``pool="map"`` is SigLIP's layout instead: no class token (positions for the patches only), ``ln_post`` over
    every token, then :class:`~clipforge.model.transformer.AttentionPool` (a learned probe attends over them).
    ``pre_norm=False`` drops ``ln_pre`` (SigLIP has none); ``patch_bias`` gives the patch convolution a bias;
    ``act`` / ``norm_eps``: the blocks' MLP activation and every LayerNorm's epsilon.

    ``patch_dropout`` p: in training mode each image keeps ``max(1, round((1 - p) * grid^2))`` of its patch tokens,
    drawn uniformly without replacement after the positions are added (the class token always stays), so the blocks
    run on fewer tokens (FLIP, Li et al. 2023); in eval mode every patch is kept.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        *,
        act: str = "gelu",
        norm_eps: float = DEFAULT_NORM_EPS,
        pre_norm: bool = True,
        pool: str = "cls",
        patch_bias: bool = False,
        patch_dropout: float = 0.0,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"ViT image_size={image_size} must be a multiple of patch_size={patch_size}")
        if pool not in VIT_POOLS:
            raise ValueError(f"ViT pool={pool!r} is unknown; choose one of {list(VIT_POOLS)}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.output_dim = width
        self.pool = pool
        self.patch_dropout = patch_dropout
        # no bias by default: the learned positional embedding already adds a per-token offset
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=patch_bias)
        if pool == "cls":
            self.class_embedding = nn.Parameter(torch.empty(width))
        else:
            self.register_parameter("class_embedding", None)
        prefix_tokens = 1 if pool == "cls" else 0
        self.positional_embedding = nn.Parameter(torch.empty(self.grid_size**2 + prefix_tokens, width))
        self.ln_pre = nn.LayerNorm(width, eps=norm_eps) if pre_norm else nn.Identity()
        self.transformer = Transformer(width, depth, heads, mlp_ratio, act, norm_eps)
        self.ln_post = nn.LayerNorm(width, eps=norm_eps)
        self.attn_pool = AttentionPool(width, heads, mlp_ratio, act, norm_eps) if pool == "map" else None
        if self.class_embedding is not None:
            nn.init.normal_(self.class_embedding, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.02)

    def forward(
        self, images: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """images (B, 3, S, S) -> features (B, width), plus per-layer attention (B, heads, T, T) if asked.

        T = 1 + (S / patch_size)^2; token 0 is the class token, the rest are patches in row-major order.
        """
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"this ViT expects images of shape (batch, 3, {self.image_size}, {self.image_size}), "
                f"got {tuple(images.shape)}; resize with the tower's preprocessing (resolve_image_preprocess)"
            )
        tokens = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, grid^2, width)
        if self.class_embedding is not None:
            class_token = self.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
            tokens = torch.cat([class_token, tokens], dim=1)
        tokens = tokens + self.positional_embedding.to(tokens.dtype)
        if self.training and self.patch_dropout > 0:
            tokens = self._drop_patches(tokens)
        tokens = self.ln_pre(tokens)
        if return_attention:
            tokens, attentions = self.transformer(tokens, return_attention=True)
            return self._pool(tokens), attentions
        if self.attn_pool is None:  # the class token alone is read: the last block runs for it only
            class_rows = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
            return self.ln_post(self.transformer.forward_one_token(tokens, class_rows))
        return self._pool(self.transformer(tokens))

    def _drop_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, prefix + N, width) -> (B, prefix + K, width): the prefix (class token) and, per image, K
        patches chosen uniformly at random (the ranks of i.i.d. uniform scores), in their original order."""
        prefix = 1 if self.class_embedding is not None else 0
        patches = tokens[:, prefix:]
        batch, count, width = patches.shape
        keep = max(1, round((1 - self.patch_dropout) * count))
        chosen = torch.rand(batch, count, device=tokens.device).topk(keep, dim=1).indices.sort(dim=1).values
        kept = patches.gather(1, chosen.unsqueeze(-1).expand(-1, -1, width))  # (B, K, width)
        return torch.cat([tokens[:, :prefix], kept], dim=1)

    def _pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Block outputs (B, T, width) -> features (B, width): ``ln_post`` of the class token, or attention pooling
        of every token after ``ln_post``."""
        if self.attn_pool is None:
            return self.ln_post(tokens[:, 0])
        return self.attn_pool(self.ln_post(tokens))

    @property
    def supports_attention_maps(self) -> bool:
        # explanations read the class token's row; attention pooling has no class token
        return self.attn_pool is None

    def forward_with_attention(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(features (B, width), per-layer attention (B, heads, T, T))``: token 0 is the class token, then the
        ``grid_size x grid_size`` patches in row-major order."""
        if not self.supports_attention_maps:
            raise TypeError("a ViT with attention pooling (pool='map') has no class token to explain")
        return self(images, return_attention=True)


def build_vit_tower(cfg: ImageTowerConfig) -> VisionTransformer:
    """The built-in ViT; ``pretrained`` may only be None or a local state dict file."""
    size = cfg.image_size or BUILTIN_VIT_IMAGE_SIZE
    tower = VisionTransformer(
        size,
        cfg.patch_size,
        cfg.width,
        cfg.depth,
        cfg.heads,
        cfg.mlp_ratio,
        act=cfg.act,
        norm_eps=cfg.norm_eps,
        pre_norm=cfg.pre_norm,
        pool=cfg.pool,
        patch_bias=cfg.patch_bias,
        patch_dropout=cfg.patch_dropout,
    )
    if cfg.pretrained is None:
        return tower
    path = local_weights_file(cfg.pretrained)
    if path is None:
        raise ValueError(
            f"model.image.pretrained={cfg.pretrained!r}: the built-in ViT has no named weights; use null (random "
            f"init) or a local .pt/.safetensors state dict (CLIP checkpoints go through clipforge.interop)"
        )
    load_weights_file(
        tower, path, f"the built-in ViT (width={cfg.width}, depth={cfg.depth})", key_order=weights_key_order(cfg)
    )
    return tower


# ----------------------------------------------------------------------------------------------
# torchvision and timm backbones
# ----------------------------------------------------------------------------------------------
class BackboneTower(Tower):
    """A headless library backbone with the ``output_dim`` the heads need; ``backbone`` keeps the library's
    own parameter names, so its state dicts load unchanged.

    Gradient checkpointing is the library's own switch where it has one (timm's ``set_grad_checkpointing``,
    per block); torchvision models have none. The backbone is one FSDP unit and has no attention maps.

    A convolutional backbone (more than one ``Conv2d``; a ViT's patch embedding is one) gets its images in
    channels-last layout: oneDNN and cuDNN then run every convolution in NHWC. On the CPU, EfficientNet-Lite0
    embedding ran 1.01-1.14x faster with it (1.4-2.2x with glibc's default heap, whose page faults hit the NCHW
    path harder; benchmarks/README.md). Only the input is converted; the weights keep their layout, so state
    dicts, FSDP's flattening and checkpoints are as before, and the values are the same up to float rounding.
    """

    def __init__(self, backbone: nn.Module, output_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.output_dim = output_dim
        self.channels_last = sum(isinstance(m, nn.Conv2d) for m in backbone.modules()) > 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> features (B, output_dim)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"image tower expects images of shape (batch, 3, H, W), got {tuple(images.shape)}")
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone(images)

    def set_grad_checkpointing(self, enabled: bool = True) -> bool:
        switch = getattr(self.backbone, "set_grad_checkpointing", None)  # timm models have it
        if switch is None:
            return False
        try:
            switch(enabled)
        except (AssertionError, NotImplementedError):  # timm's way of saying "not for this architecture"
            return False
        return True

    def describe(self) -> str:
        return type(self.backbone).__name__


# attribute names torchvision classification models give their final classifier
_TORCHVISION_CLASSIFIERS = ("fc", "classifier", "heads", "head")


def strip_torchvision_classifier(model: nn.Module, name: str) -> tuple[str, int]:
    """Replace the model's final classifier Linear by Identity, in place.

    Returns (the replaced Linear's state-dict prefix, e.g. "fc" or "classifier.1", its in_features).
    In a Sequential classifier only the last Linear goes: the layers before it (ConvNeXt's LayerNorm +
    Flatten, EfficientNet's Dropout, MobileNetV3's hidden Linear) are part of the feature path.
    """
    for attribute in _TORCHVISION_CLASSIFIERS:
        layer = getattr(model, attribute, None)
        if isinstance(layer, nn.Linear):
            setattr(model, attribute, nn.Identity())
            return attribute, layer.in_features
        if isinstance(layer, nn.Sequential):
            linear_names = [child for child, module in layer.named_children() if isinstance(module, nn.Linear)]
            if linear_names:
                last = linear_names[-1]
                in_features = getattr(layer, last).in_features
                setattr(layer, last, nn.Identity())
                return f"{attribute}.{last}", in_features
    raise ValueError(
        f"torchvision model {name!r} has no final Linear classifier in {list(_TORCHVISION_CLASSIFIERS)}; "
        f"use a classification model (resnet50, efficientnet_b0, convnext_tiny, ...) or model.image.kind='timm'"
    )


def build_torchvision_tower(cfg: ImageTowerConfig) -> BackboneTower:
    """``torchvision.models.get_model(cfg.name, weights=...)`` without its classifier.

    pretrained: None -> random; "default" -> weights="DEFAULT"; a local file -> random, then that state dict;
    another string -> that weights enum name (e.g. "IMAGENET1K_V2").
    """
    from torchvision.models import get_model

    check_torchvision_name(cfg.name)
    path = local_weights_file(cfg.pretrained)
    if cfg.pretrained is None or path is not None:
        weights = None
    else:
        weights = "DEFAULT" if cfg.pretrained == "default" else cfg.pretrained
    model = get_model(cfg.name, weights=weights)
    in_order = path is not None and weights_key_order(cfg) == "in_order"
    if in_order:  # by position, the file's classifier meets the model's: load before it goes
        load_weights_file(model, path, f"torchvision model {cfg.name!r}", key_order="in_order")
    classifier_prefix, output_dim = strip_torchvision_classifier(model, cfg.name)
    if path is not None and not in_order:
        load_weights_file(model, path, f"torchvision model {cfg.name!r}", drop_prefixes=(classifier_prefix,))
    return BackboneTower(model, output_dim)


def build_timm_tower(cfg: ImageTowerConfig) -> BackboneTower:
    """``timm.create_model(cfg.name, pretrained=..., num_classes=0)``; output_dim = the pooled feature size.

    pretrained: None -> random; "default" -> timm's default tag; a local file or ``package:<name>`` -> random,
    then that state dict (its classifier keys dropped; with ``in_order`` keys, mapped by position onto the model
    with its classifier, which then goes); another string -> the tag, ``timm.create_model(f"{name}.{tag}", True)``.
    Models that only take one input size (ViTs) are built for ``cfg.image_size`` (timm resamples the
    pretrained position embeddings).
    """
    from timm.models import get_pretrained_cfg

    path = local_weights_file(cfg.pretrained)
    name = checked_timm_name(cfg)
    kwargs = {}
    pretrained_cfg = get_pretrained_cfg(name)
    if pretrained_cfg is not None and pretrained_cfg.fixed_input_size and cfg.image_size is not None:
        if tuple(pretrained_cfg.input_size[-2:]) != (cfg.image_size, cfg.image_size):
            kwargs["img_size"] = cfg.image_size
    pretrained = cfg.pretrained is not None and path is None
    if cfg.patch_dropout > 0:  # timm's vision transformers drop patch tokens in training mode only
        kwargs["patch_drop_rate"] = cfg.patch_dropout
    if path is not None and weights_key_order(cfg) == "in_order":
        # by position, the file's classifier meets the model's: build with it, load, then go headless
        model = _create_timm(name, False, kwargs)
        load_weights_file(model, path, f"timm model {cfg.name!r}", key_order="in_order")
        model.reset_classifier(0)
        path = None
    else:
        model = _create_timm(name, pretrained, {**kwargs, "num_classes": 0})
    if path is not None:
        classifier = model.pretrained_cfg.get("classifier") or ()
        classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        load_weights_file(model, path, f"timm model {cfg.name!r}", drop_prefixes=classifier)
    # head_hidden_size, where timm sets it, is the pooled output size: MobileNetV3 keeps its 1x1 conv head
    # (e.g. 288 -> 1024) when num_classes=0, so num_features alone would be wrong there
    output_dim = getattr(model, "head_hidden_size", None) or model.num_features
    return BackboneTower(model, output_dim)


def _create_timm(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    """``timm.create_model(name, pretrained, **kwargs)``; a ``patch_drop_rate`` the architecture does not take (it has
    no patch tokens) is a ConfigError naming ``model.image.patch_dropout``."""
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as error:
        if "patch_drop_rate" not in kwargs or "patch_drop_rate" not in str(error):
            raise
        raise ConfigError(
            f"model.image.patch_dropout={kwargs['patch_drop_rate']}: timm model {name!r} has no patch tokens to drop "
            "(only its vision transformers do); set it to 0"
        ) from None
