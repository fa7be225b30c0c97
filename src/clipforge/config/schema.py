"""The schema: one typed dataclass per section of a run config, with each field's meaning in its docstring.

The data section is one dataclass per data kind: :mod:`clipforge.config.data_kinds`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from clipforge.config.data_kinds import DataConfig, EmojiData

# the built-in ViT's input size when model.image.image_size is null
BUILTIN_VIT_IMAGE_SIZE = 64


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
@dataclass
class TokenizerConfig:
    """How text becomes token ids.

    ``bpe``: a byte-level BPE trained on the *training* captions at the start of a run (held-out
    captions never shape the vocabulary) and saved inside every checkpoint.
    ``hf``: a Hugging Face tokenizer by hub id or local folder (``name``; empty means the text
    tower's ``name``). A text tower with pretrained Hugging Face weights needs ``hf``: its embeddings know
    only their own tokenizer's ids (validation refuses ``bpe`` there).
    ``padding``: ``longest`` pads a batch to its longest caption (never beyond ``context_length``);
    ``max_length`` pads every caption to ``context_length`` (SigLIP, whose bidirectional text tower reads the
    padding too and pools the last position).
    """

    kind: Literal["bpe", "hf"] = "bpe"
    name: str = ""
    vocab_size: int = 2048
    lowercase: bool = True
    padding: Literal["longest", "max_length"] = "longest"


@dataclass
class LoraConfig:
    """Low-rank adapters on a tower (LoRA, through the ``peft`` library: ``pip install 'clipforge[lora]'``).

    ``rank`` r > 0 turns them on: each targeted linear map ``y = W x + b`` becomes
    ``y = W x + b + (alpha / r) * B A dropout(x)`` with ``A`` (r, in) and ``B`` (out, r), ``B`` starting at zero so
    training starts from the tower as it is. The tower's own weights are frozen; only ``A`` and ``B`` (and the heads,
    the temperature) train. ``targets``: which linear maps of the tower's blocks, by role: ``attention`` (query, key,
    value and output projections) and ``mlp`` (the feed-forward layers) (``clipforge.model.lora``). ``dropout``: on the
    adapters' input, training only. Checkpoints keep the adapters apart; every model load (eval, embed, export, merge)
    folds them into the weights, W + (alpha / r) B A, so what is used or exported is a plain model.
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[Literal["attention", "mlp"]] = field(default_factory=lambda: ["attention", "mlp"])

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclass
class ImageTowerConfig:
    """The image tower: a built-in ViT, a torchvision model, any timm model, or an imported model's own tower
    (open_clip's, or SigLIP 2's NaFlex ViT from transformers).

    ``pretrained``: where the weights come from. ``None`` = random init; ``"default"`` = the standard
    weights for ``name`` (torchvision's DEFAULT enum, timm's default tag); ``"package:<name>"`` = weights
    shipped inside a pip package (``package:efficientnet-lite0``, see ``clipforge.packaged``);
    ``"file:<path>"`` or a value that reads as a path (a folder separator, a leading ``.`` or ``~``, a ``.pt`` /
    ``.pth`` / ``.bin`` / ``.safetensors`` suffix) = a local state dict file, which must exist; any other string is a
    torchvision weights enum name (``IMAGENET1K_V2``) or a timm pretrained tag (``in1k``). What a value is is told
    from the value, never from whether a file of that name happens to exist.
    ``pretrained_keys``: how a file's tensors meet the model's: ``by_name`` (the same names) or ``in_order``
    (another naming of the same architecture: the i-th tensor of the file is the model's i-th, shapes checked).
    ``image_size``: null = the tower's own (its pretrained config's input size for timm, 224 for torchvision,
    64 for the built-in ViT). ``mean``/``std``: normalization; empty = the tower's own (timm's pretrained
    config, ImageNet for torchvision, CLIP's for the built-in ViT).
    ``lock``: ``false`` (train the tower), ``true`` (no gradient, eval mode: BatchNorm statistics and dropout
    frozen, LiT) or ``"all-but-last-N"`` (only the last N blocks and what follows them train).
    ``lr_scale``: the tower's learning rate is ``lr_scale * optim.lr``; ``layer_decay`` < 1 scales it down
    by that factor per block towards the input (layer-wise lr decay for fine-tuning pretrained towers).
    ``interpolation``: the resize filter (``bicubic``, ``bilinear``, ``nearest``); null = the tower's own.
    ``resize_mode`` (evaluation; training takes a random resized crop): ``shortest`` resizes the short side to
    ``resize_size`` (null = ``image_size``; the long side to ``int(resize_size * long / short)``, truncated, as
    torchvision and transformers do), then center-crops ``image_size`` x ``image_size``; ``squash`` resizes the
    whole image to ``image_size`` x ``image_size`` (SigLIP; aspect not kept, nothing cropped).
    ``crop_rounding``: how the center crop's offset (resized - crop) / 2 is rounded when it is a half: ``round`` =
    Python's round, halves to even (torchvision's CenterCrop: open_clip, timm) or ``floor`` (transformers'
    image processors); 640 x 427 resized to 335 x 224 crops from column 56 or 55.
    ``resize_backend``: the library that resizes: ``pil`` (``PIL.Image.resize``: open_clip, timm, transformers'
    ``backend="pil"``) or ``torchvision`` (torchvision's kernels on a uint8 tensor, antialiased: transformers'
    default backend). The two differ by at most one level in a few pixels; imports pick their source's.
    ``head_bias``: a ``linear`` head with a bias (y = W x + b).
    ``open_clip`` (kind ``open_clip`` only): open_clip's own image tower, hosted as it is (a timm trunk with
    open_clip's pooling and projection, a ModifiedResNet, a ViT layout the built-in one has not); this field is the
    JSON that builds it offline, ``{"embed_dim": ..., "quick_gelu": ..., "vision_cfg": {...}}`` (open_clip's model
    config keys). An open_clip import writes it (``clipforge.interop.open_clip``); the projection is inside the tower,
    so its head is ``identity``. Needs ``pip install 'clipforge[open_clip]'``.
    ``lora``: low-rank adapters (:class:`LoraConfig`; off unless ``lora.rank`` > 0).
    ``patch_dropout``: while training, each image keeps a random ``1 - patch_dropout`` of its patch tokens (the
    class token always stays; FLIP): fewer tokens, faster steps. Off in evaluation. ViT towers only (the built-in
    ``vit``, and timm's vision transformers through their ``patch_drop_rate``).

    Built-in ViT (``vit``) only, defaults = CLIP's layout: ``act`` the MLP activation (``gelu``; ``quick_gelu``
    = x sigmoid(1.702 x), OpenAI's CLIP; ``gelu_tanh``, SigLIP); ``norm_eps`` every LayerNorm's epsilon;
    ``pre_norm`` the LayerNorm before the blocks (``ln_pre``, CLIP has it, SigLIP not); ``pool``: ``cls`` (a class
    token, ``ln_post`` on it) or ``map`` (SigLIP: no class token, ``ln_post`` over all tokens, then multihead
    attention pooling with a learned probe); ``patch_bias``: a bias in the patch convolution (SigLIP).

    ``naflex``: SigLIP 2's NaFlex ViT (variable resolution), transformers' ``Siglip2VisionModel`` hosted as a tower
    (imported with ``hf:``, :mod:`clipforge.model.hosted_hf`): the ViT fields ``patch_size``, ``width``, ``depth``,
    ``heads``, ``mlp_ratio``, ``act``, ``norm_eps`` describe it, ``image_size`` is the square its position table was
    learned at ((image_size / patch_size)^2 positions, resized to each image's grid), and ``resize_mode: naflex``
    with ``max_num_patches`` (the patch budget each image is resized to, aspect kept) is its preprocessing.
    """

    kind: Literal["vit", "torchvision", "timm", "naflex", "open_clip"] = "vit"
    name: str = ""
    pretrained: str | None = None
    pretrained_keys: Literal["by_name", "in_order"] = "by_name"
    image_size: int | None = None
    open_clip: str = ""
    # built-in ViT only
    patch_size: int = 8
    width: int = 192
    depth: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0
    act: Literal["gelu", "quick_gelu", "gelu_tanh"] = "gelu"
    norm_eps: float = 1e-5
    pre_norm: bool = True
    pool: Literal["cls", "map"] = "cls"
    patch_bias: bool = False
    # naflex only
    max_num_patches: int | None = None
    # shared
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    interpolation: Literal["bicubic", "bilinear", "nearest"] | None = None
    resize_mode: Literal["shortest", "squash", "naflex"] = "shortest"
    resize_size: int | None = None
    crop_rounding: Literal["round", "floor"] = "round"
    resize_backend: Literal["pil", "torchvision"] = "pil"
    lock: bool | str = False
    lr_scale: float = 1.0
    layer_decay: float = 1.0
    head: Literal["linear", "mlp", "identity"] = "linear"
    head_init: Literal["normal", "identity"] = "normal"
    head_bias: bool = False
    head_dropout: float = 0.1
    lora: LoraConfig = field(default_factory=LoraConfig)
    patch_dropout: float = 0.0


@dataclass
class TextTowerConfig:
    """The text tower: a built-in CLIP-style causal transformer, a Hugging Face encoder, or open_clip's own tower.

    ``pooling``: ``eot`` (the last non-padding token: the built-in transformer's end-of-text),
    ``cls`` (the first token), ``mean`` (mean over non-padding tokens), ``eos`` (the first token whose id is
    ``eos_token_id``: Hugging Face CLIP's rule), ``argmax`` (the token with the largest id: CLIP's end-of-text,
    OpenAI's and open_clip's rule) or ``last`` (position ``L - 1``, padding or not: SigLIP); ``auto`` = ``eot``
    for the built-in tower, ``cls`` for Hugging Face encoders. ``eos_token_id``: the id ``eos`` pooling finds.
    ``pretrained`` (``hf``): ``true`` (the default) = the weights of ``name``; ``false`` = random init from
    ``name``'s config (the architecture only); another string = a hub id or local folder to load the weights
    from (``name`` still names the tokenizer when ``tokenizer.name`` is empty). ``"default"`` is the older spelling of ``true``, and
    ``null`` of ``false`` (checkpoints load with it: their own weights replace the tower's). ``name`` and
    ``pretrained`` may also be ``"package:<name>"``, a model folder shipped inside a pip package
    (``package:all-minilm-l6-v2``, see ``clipforge.packaged``). The built-in ``transformer`` has no
    pretrained weights: ``true``/``false``/``null`` all start it at random.
    A pretrained ``hf`` tower needs its own tokenizer (``tokenizer.kind: hf``): a BPE trained here would give
    ids its embeddings never saw, and validation refuses the pair.
    ``lock``, ``lr_scale``, ``layer_decay``: as for the image tower (blocks = the encoder's layers).
    ``head``: ``identity`` keeps the tower's own space (needs ``embed_dim`` = the tower's width);
    ``head_init: identity`` starts a ``linear`` head at the identity (near-identity: it keeps the pretrained space
    to begin with and trains from there), else normal(0, in_dim^-1/2). ``head_bias``: a ``linear`` head with a
    bias (SigLIP's text head). ``lora``: low-rank adapters, as for the image tower.

    Built-in transformer only, defaults = CLIP's layout: ``act`` and ``norm_eps`` as for the ViT; ``causal``:
    causal attention (CLIP) or, false, bidirectional attention over every position, padding included (SigLIP:
    it needs ``tokenizer.padding: max_length``, so a caption always meets the same padding); ``vocab_size``: the
    embedding rows, null = the tokenizer's vocabulary size (an imported model may have more rows than ids).

    ``open_clip`` (kind ``open_clip`` only): open_clip's own text tower, hosted as it is (CoCa's text transformer
    with its appended class token, or a Hugging Face encoder with open_clip's pooler and projection); the JSON
    ``{"embed_dim": ..., "quick_gelu": ..., "text_cfg": {...}}`` that builds it (a Hugging Face encoder's own config
    travels in the checkpoint, so it rebuilds offline). It reads its padding from the token ids, as open_clip does;
    its head is ``identity``. Needs ``pip install 'clipforge[open_clip]'``.
    """

    kind: Literal["transformer", "hf", "open_clip"] = "transformer"
    name: str = ""
    pretrained: bool | str | None = True
    open_clip: str = ""
    pooling: Literal["auto", "eot", "cls", "mean", "eos", "argmax", "last"] = "auto"
    context_length: int = 32
    # built-in transformer only
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    act: Literal["gelu", "quick_gelu", "gelu_tanh"] = "gelu"
    norm_eps: float = 1e-5
    causal: bool = True
    vocab_size: int | None = None
    # shared
    eos_token_id: int | None = None
    lock: bool | str = False
    lr_scale: float = 1.0
    layer_decay: float = 1.0
    head: Literal["linear", "mlp", "identity"] = "linear"
    head_init: Literal["normal", "identity"] = "normal"
    head_bias: bool = False
    head_dropout: float = 0.1
    lora: LoraConfig = field(default_factory=LoraConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    @staticmethod
    def resolve_weights(name: str, pretrained: bool | str | None) -> str | None:
        """Where a Hugging Face tower's weights come from: ``name`` (``pretrained`` true or ``"default"``),
        the folder or hub id ``pretrained`` names, or None (false or null: random init from ``name``'s config)."""
        if pretrained is True or pretrained == "default":
            return name
        if pretrained is False or pretrained is None:
            return None
        return pretrained

    def weights_location(self) -> str | None:
        """:meth:`resolve_weights` of this tower's ``name`` and ``pretrained``."""
        return self.resolve_weights(self.name, self.pretrained)


@dataclass
class ModelConfig:
    """The two-tower model; ``embed_dim`` is the shared space both heads project into.

    ``init``: start training from released or earlier weights: ``hf:<folder or hub id>`` (a Hugging Face two-tower
    model of a type ``clipforge.interop.hf_types`` reads: CLIP, SigLIP, SigLIP 2, ...), ``open_clip:...`` (an
    open_clip model: ``open_clip:NAME[:WEIGHTS]``, ``open_clip:CONFIG.json:WEIGHTS``, ``open_clip:local-dir:FOLDER``,
    ``open_clip:hf-hub:ORG/REPO``) or the path of a clipforge checkpoint. The architecture, the tokenizer and the
    preprocessing then come from those weights (a
    field this config sets must agree with them); the towers' ``lock``, ``lr_scale`` and ``layer_decay`` stay
    this config's (``clipforge.interop.init_model``).
    """

    embed_dim: int = 128
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    init: str = ""


# ----------------------------------------------------------------------------------------------
# Loss, optimizer, schedule, training, logging
# ----------------------------------------------------------------------------------------------
@dataclass
class LossConfig:
    """``clip``: symmetric softmax cross-entropy; ``siglip``: pairwise sigmoid with a learned bias.

    ``chunk_size``: when set, the loss is summed over row blocks of this many samples and never
    builds the N x N logit matrix (memory O(chunk_size * N)).
    """

    kind: Literal["clip", "siglip"] = "clip"
    chunk_size: int | None = None


@dataclass
class OptimConfig:
    """AdamW. Biases, norms, embeddings and the logit scale/bias get no weight decay."""

    lr: float = 5e-4
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6


@dataclass
class ScheduleConfig:
    """Linear warmup to ``optim.lr`` over ``warmup_steps``, then cosine to ``min_lr_ratio * lr``."""

    kind: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0


@dataclass
class DistributedConfig:
    """Multi-process training, launched with torchrun (see ``clipforge.distributed``).

    ``strategy``: ``ddp`` replicates the model and averages gradients; ``fsdp`` shards parameters, gradients
    and optimizer state over the ranks (FSDP2 ``fully_shard`` per transformer block, per tower, then the
    model). Both write the same full-weight checkpoint, which loads on any number of processes.
    """

    strategy: Literal["ddp", "fsdp"] = "ddp"


@dataclass
class EMAConfig:
    """An exponential moving average of the trained weights, kept beside them (``decay`` > 0 turns it on).

    After optimizer step ``s`` (counted from 1): up to ``start_step`` the average is the weights themselves; after
    it, every ``every`` steps, ``ema = decay * ema + (1 - decay) * weights``. It averages the parameters that train
    (locked towers never change; buffers such as BatchNorm statistics are the raw model's). Checkpoints keep it, a
    resumed run continues it exactly, and ``--weights ema`` evaluates, embeds, exports or merges it instead of the
    raw weights. Evaluations during training (and ``best.pt``) use the raw weights.
    """

    decay: float = 0.0
    every: int = 1
    start_step: int = 0

    @property
    def enabled(self) -> bool:
        return self.decay > 0


@dataclass
class TrainConfig:
    """The training run.

    ``batch_size`` is the contrastive batch of one optimizer step, over all processes: each of ``W``
    processes loads ``batch_size / W`` pairs, and the loss still sees all ``batch_size``. With
    ``accumulation_steps`` > 1 each process's share is split into that many micro-batches and the step is
    still exact over the whole batch (GradCache; see ``clipforge.train.gradcache``); it must not exceed the
    data's size (a batch would hold an image twice).
    ``precision``: what the towers compute in (the loss is float32): ``fp32``, ``bf16`` or ``fp16`` autocast
    (fp16: CUDA only, with loss scaling), or ``auto``: bf16 where the device runs it natively and faster (CUDA
    with bf16; a CPU with AVX512-BF16/AMX where a timed probe finds it faster), fp32 otherwise, logged with the
    reason (``clipforge.runtime.precision``).
    ``output_dir``: the run's folder (checkpoints, ``metrics.jsonl``, ``config.yaml``); one that holds a run
    already is refused unless ``--resume`` continues it or ``--overwrite`` replaces it.
    ``gradient_checkpointing``: recompute the towers' block activations in the backward pass instead of
    keeping them (built-in ViT and text transformer, timm and Hugging Face towers that support it).
    ``compile``: ``torch.compile`` the two towers.
    ``ema``: an exponential moving average of the weights (:class:`EMAConfig`; off by default).
    ``text_buckets``: K > 1 runs the text tower on each batch in K buckets of similar token counts, each cut to its
    own longest caption (``CLIPModel.text_features``): the same features, less padding computed (2.05x faster text
    tower steps on clip art captions with 4, on 2 CPU cores). For text towers whose features ignore padding (the
    built-in causal transformer, Hugging Face encoders; not ``last`` pooling), and not under FSDP2.
    """

    steps: int = 1000
    batch_size: int = 128
    accumulation_steps: int = 1
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    grad_clip: float = 1.0  # max global grad norm (>= 0); 0 disables clipping (the norm is still logged)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_dir: str = "runs/clipforge"
    checkpoint_every: int = 500  # write last.pt every this many steps (> 0) and after the last
    keep_checkpoints: int = 0  # also keep this many step_<N>.pt files beside last.pt (>= 0)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    gradient_checkpointing: bool = False
    compile: bool = False
    ema: EMAConfig = field(default_factory=EMAConfig)
    text_buckets: int = 1


@dataclass
class LoggingConfig:
    """Where a run's metrics go besides ``metrics.jsonl`` (always written), every ``log_every`` steps.

    ``backends``: any of ``tensorboard`` (``<output_dir>/tensorboard``), ``wandb`` and ``mlflow`` (optional extras:
    ``pip install 'clipforge[wandb]'`` / ``'clipforge[mlflow]'``); W&B and MLflow get the resolved config too, and
    a resumed run continues the same W&B / MLflow run (its id is kept in the output folder).
    ``project``: the W&B project and the MLflow experiment; empty = ``WANDB_PROJECT`` / ``MLFLOW_EXPERIMENT_NAME``
    from the environment, else ``clipforge``. ``run_name``: the run's name there; empty = the output folder's name.
    ``progress``: the tqdm progress line.
    """

    log_every: int = 10
    backends: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
    project: str = ""
    run_name: str = ""
    progress: bool = True


# ----------------------------------------------------------------------------------------------
# Evaluation during training
# ----------------------------------------------------------------------------------------------
# The metric names each task reports (clipforge.eval.runner computes them; a test keeps the two in step).
ZEROSHOT_METRICS = ("acc1", "acc5", "mean_per_class_recall")
RETRIEVAL_METRICS = tuple(
    f"{direction}_retrieval_{measure}"
    for direction in ("image", "text")
    for measure in ("recall@1", "recall@5", "recall@10", "mean_rank", "median_rank")
)
EVAL_METRICS = {"zeroshot": ZEROSHOT_METRICS, "retrieval": RETRIEVAL_METRICS}


@dataclass
class EvalTaskConfig:
    """One evaluation: zero-shot classification or image-text retrieval on one data source.

    ``name`` prefixes the task's metrics in every log (``{name}/acc1``). ``data`` is any source the data
    section accepts, usually a held-out split (``split: test``), read from local files.
    ``zeroshot`` needs a source with labels; ``templates`` is a named set (``simple``, ``openai-imagenet``,
    ``cifar10`` ...), one template holding ``{}``, a list of templates, or a JSON file (``file.json`` /
    ``file.json:dataset``); ``classnames`` is read as ``data.classnames`` is (a TXT file with one name per line,
    a JSON list, or a JSON object mapping the source's class names or label numbers to readable names); empty =
    the source's own names.
    ``retrieval`` uses every caption of every image.
    """

    name: str = ""
    task: Literal["zeroshot", "retrieval"] = "zeroshot"
    data: DataConfig = field(default_factory=EmojiData)
    templates: str | list[str] = "simple"
    classnames: str = ""


@dataclass
class EvalConfig:
    """Evaluations run during training: every ``every`` optimizer steps (0 = only at the end) and after the last.

    Results are logged as ``{task name}/{metric}`` (metrics.jsonl, TensorBoard, progress line). With
    ``best_metric`` (``"{task name}/{metric}"``, e.g. ``val/image_retrieval_recall@5``) the checkpoint with the
    best value so far is kept as ``best.pt``; ``best_mode`` says whether higher (accuracy, recall) or lower
    (ranks) is better. ``batch_size``: images or prompts per forward pass.
    """

    every: int = 0
    tasks: list[EvalTaskConfig] = field(default_factory=list)
    best_metric: str = ""
    best_mode: Literal["max", "min"] = "max"
    batch_size: int = 256


@dataclass
class Config:
    """The whole run: one tree, saved next to the run and inside every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=EmojiData)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
