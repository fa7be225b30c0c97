"""Names and defaults the command line shows in ``--help`` and checks while parsing, kept below torch.

``clipforge --help``, ``--version`` and a command's argument errors must answer without importing torch or any
other heavy library (``tests/test_cli.py`` checks that ``import clipforge.cli`` loads none), so the values an
argument parser needs live here and the libraries that use them import them from here: one definition each.
"""

# the prompt set `classify` and the Python API use when none is given (CLIP's 80 ImageNet prompts)
DEFAULT_TEMPLATES = "openai-imagenet"

# images per committed part of an embedding folder: a few seconds of work on a CPU, so an interruption loses little
FLUSH_EVERY = 256

# how `explain` (and the web page) draws a heat map; auto: by tower (attention-gradient for ViTs, else Grad-CAM)
EXPLAIN_METHODS = ("auto", "attention-gradient", "rollout", "gradcam")

# what a weights spec may be: --checkpoint, `clipforge import`, model.init
WEIGHTS_SPEC_HELP = "hf:<folder or hub id>, open_clip:CONFIG.json:WEIGHTS, or the path of a clipforge checkpoint"

# which weights of a checkpoint a command uses (--weights): the trained ones, or their moving average (train.ema)
WEIGHTS_CHOICES = ("raw", "ema")
