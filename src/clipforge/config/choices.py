"""Names and defaults the command line shows in ``--help`` and checks while parsing, kept below torch.

``clipforge --help``, ``--version`` and a command's argument errors must answer without importing torch or any
other heavy library (``tests/test_cli.py`` checks that ``import clipforge.cli`` loads none), so the values an
argument parser needs live here and the libraries that use them import them from here: one definition each.
"""

# the prompt set `classify` and the Python API use when none is given (CLIP's 80 ImageNet prompts)
DEFAULT_TEMPLATES = "openai-imagenet"

# images per committed part of an embedding folder: a few seconds of work on a CPU, so an interruption loses little
FLUSH_EVERY = 256
# rows per stored part once a run's committed chunks are merged (fewer files to map and step through); under
# torchrun a part's rows are also the unit of work dealt to the processes
PART_ROWS = 2048

# the approximate indexes `clipforge index build --ann` makes (clipforge.search.ann_build)
ANN_KINDS = ("ivf", "ivfpq", "hnsw")

# how `explain` (and the web page) draws a heat map; auto: by tower (attention-gradient for ViTs, else Grad-CAM)
EXPLAIN_METHODS = ("auto", "attention-gradient", "rollout", "gradcam")

# what a weights spec may be: --checkpoint, `clipforge import`, model.init
WEIGHTS_SPEC_HELP = (
    "hf:<folder or hub id>, open_clip:NAME[:WEIGHTS] (a name of open_clip's registry), open_clip:CONFIG.json:WEIGHTS, "
    "open_clip:local-dir:FOLDER, open_clip:hf-hub:ORG/REPO, or the path of a clipforge checkpoint"
)

# what `clipforge eval --task` measures (a suite entry's `task` too)
EVAL_TASKS = ("zeroshot", "retrieval", "linear_probe", "fewshot")

# how evaluation ranks a correct answer that scores exactly as much as a wrong one (clipforge.eval.classification)
TIE_RULES = ("pessimistic", "index")

# which weights of a checkpoint a command uses (--weights): the trained ones, or their moving average (train.ema)
WEIGHTS_CHOICES = ("raw", "ema")
