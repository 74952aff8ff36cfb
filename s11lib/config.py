"""Every knob of a run in one typed place, with units and reasons.

The notebook's `parameters` cell repeats these names and defaults for papermill;
tests/test_notebook.py checks the two agree, so they cannot drift apart.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import os
import tokenize
from dataclasses import dataclass

from s11lib.device import AMPS
from s11lib.models.resnet import INITS

PLATEAU_METRICS = ("val_loss", "val_acc")
OPTIMIZERS = ("sgd", "adam", "adamw")
# SGD's `lr` is the rate for a batch of this many images; other batch sizes scale it linearly
# (Goyal et al. 2017, "Accurate, Large Minibatch SGD"): the ratio lr / batch, which sets SGD's
# gradient-noise scale, stays the same, so batch 128 trains at a quarter of the rate of 512.
# Adam's step is normalised by the gradient's own size, so that rule is SGD's only: Adam and
# AdamW take `lr` as it is at any batch size (1e-3, as the course's solutions used it).
LR_REFERENCE_BATCH = 512


# Config's annotations (strings: `from __future__ import annotations`) as the types they admit.
_TYPES = {"str": (str,), "bool": (bool,), "int": (int,), "float": (float,), "int | None": (int, None)}
_TYPE_NAMES = {str: "a string", bool: "True or False", int: "an integer", float: "a number", None: "None"}
# The string parameters that take one of a few values, checked in one place. amp was a bool
# before "auto": amp=True from an old parameters file gets the choices, not "must be a string".
_CHOICES = {"amp": AMPS, "init": INITS, "plateau_metric": PLATEAU_METRICS, "optimizer": OPTIMIZERS}


@dataclass
class Config:
    # --- data -------------------------------------------------------------------------------
    data_dir: str = "data"  # the folder that holds cifar-10-batches-py/
    download: bool = True  # fetch the official archive (md5-checked) when data_dir lacks it
    train_subset: int | None = None  # keep only the first N training images (quick runs, tests)
    test_subset: int | None = None  # keep only the first N test images
    val_size: int = 5000  # training images held out for the scheduler and the best checkpoint;
    #                       0 watches the test set instead, as the original assignment did
    # --- optimisation -----------------------------------------------------------------------
    epochs: int = 40  # passes over the training set
    batch_size: int = 256  # images per step (evaluation uses the same); the assignment log's
    optimizer: str = "adam"  # "sgd" (Nesterov momentum), "adam" (L2 in the gradient) or "adamw" (decoupled decay)
    lr: float = 1e-3  # peak rate: Adam's and AdamW's as it is; SGD's for a batch of 512, the run uses
    #                   lr * batch_size / 512 (peak_lr). SGD: 0.087, the range test's at full width (docs/recipe.md)
    momentum: float = 0.9  # SGD's Nesterov momentum; Adam's and AdamW's first beta
    weight_decay: float = 1e-4  # on the convolution and linear weights: L2 (sgd, adam) or decoupled (adamw)
    decay_norm_and_bias: bool = False  # also decay norm scales and shifts and biases (timm and torchvision don't)
    label_smoothing: float = 0.0  # training loss only; reported losses are plain cross-entropy
    crop_prob: float = 0.5  # how often RandomCrop(32, padding=4) is applied to a training image (each drawn alone)
    rotate_prob: float = 0.5  # how often the rotation by up to +-5 degrees is
    cutout_prob: float = 0.5  # how often CutOut 16x16 is
    warmup_epochs: int = 0  # linear LR ramp from ~0 to peak_lr, per step; 0: none. ReduceLROnPlateau starts after it
    warmup_min_steps: int = 100  # the ramp lasts at least this many steps, however few an epoch has
    plateau_metric: str = "val_acc"  # what ReduceLROnPlateau watches; its mode follows (acc: max, loss: min)
    plateau_factor: float = 0.2  # LR multiplier on a plateau
    plateau_patience: int = 1  # the LR drops after patience + 1 epochs in a row without improvement
    plateau_threshold: float = 1e-3  # relative improvement that counts as one
    min_lr: float = 1e-5  # the LR never drops below this
    ema_decay: float = 0.0  # 0: off; else an average of the weights, this decay per step, evaluated beside them
    seed: int = 1  # model init, shuffling and augmentation draws (the val split has its own fixed seed)
    # --- model and machine ------------------------------------------------------------------
    width: int = 64  # ResNet18's first-stage channels; smaller only for quick tests
    zero_init_residual: bool = True  # each residual branch's last norm scale starts at 0 (block = shortcut)
    init: str = "kaiming"  # conv weights: "kaiming" (He normal, fan_out) or "torch" (PyTorch's layer default)
    device: str = "auto"  # "auto" (cuda when there is one, else cpu), "cpu", "cuda", "cuda:1", ...
    amp: str = "auto"  # "auto": bf16 from compute capability 8.0, fp16 + loss scaling on 7.x, else fp32;
    #                    "bf16", "fp16", "off" (IEEE fp32) force one anywhere; "tf32" on CUDA 8.0+ (device.py)
    compile: bool = False  # torch.compile the training model (compiles once per input shape; docs/benchmarks.md)
    channels_last: bool = False  # NHWC weights for the convolutions; GroupNorm stays NCHW on CUDA (docs/benchmarks.md)
    # --- outputs ----------------------------------------------------------------------------
    out_dir: str = "runs/train"  # where metrics, checkpoints and figures go
    resume: bool = True  # out_dir holds last.pt: continue that run; False: start over (its files are replaced)
    gradcam_layer: str = "layer3"  # 8x8 on a 32x32 input; layer4 is only 4x4 (docs/training.md)
    num_misclassified: int = 20  # misclassified test images to show (and explain with Grad-CAM)
    progress: bool = True  # a tqdm bar per epoch

    def __post_init__(self) -> None:
        self._check_types()
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be above 0, got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            *((0 <= getattr(self, name) <= 1, f"{name} must be in [0, 1], got {getattr(self, name)}")
              for name in ("crop_prob", "rotate_prob", "cutout_prob")),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (self.warmup_min_steps >= 0, f"warmup_min_steps must be >= 0, got {self.warmup_min_steps}"),
            *((getattr(self, name) in choices, f"{name} must be one of {choices}, got {getattr(self, name)!r}")
              for name, choices in _CHOICES.items()),
            (self.val_size >= 0, f"val_size must be >= 0, got {self.val_size}"),
            (0 < self.plateau_factor < 1, f"plateau_factor must be in (0, 1), got {self.plateau_factor}"),
            (self.plateau_patience >= 0, f"plateau_patience must be >= 0, got {self.plateau_patience}"),
            (0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}"),
            (self.width >= 1, f"width must be at least 1, got {self.width}"),
            (self.num_misclassified >= 1, f"num_misclassified must be at least 1, got {self.num_misclassified}"),
        ]
        for subset in ("train_subset", "test_subset"):
            value = getattr(self, subset)
            checks.append((value is None or value >= 1, f"{subset} must be None or at least 1, got {value}"))
        if self.train_subset is not None and self.train_subset >= 1:  # the full set's size is the data's
            checks.append((self.val_size < self.train_subset, val_size_error(
                self.val_size, self.train_subset, f"the train_subset={self.train_subset} images")))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def _check_types(self) -> None:
        """Each value of its field's type (an int is a float too; a bool is no int): papermill and
        Python callers pass values as they are, so `epochs="two"` must be a one-line error."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kinds = _TYPES[f.type]
            if value is None and None in kinds:
                continue
            if kinds == (str,) and isinstance(value, os.PathLike):
                setattr(self, f.name, value := os.fspath(value))  # data_dir=Path("data") is fine
            if float in kinds and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, value := float(value))  # lr=1 is lr=1.0, in config.json too
            if not isinstance(value, tuple(k for k in kinds if k is not None)) or \
                    (isinstance(value, bool) and bool not in kinds):
                wanted = f"one of {_CHOICES[f.name]}" if f.name in _CHOICES else \
                    " or ".join(_TYPE_NAMES[k] for k in kinds)
                raise ValueError(f"{f.name} must be {wanted}, got {value!r} ({type(value).__name__})")

    @property
    def peak_lr(self) -> float:
        """The rate this run reaches after its warm-up: SGD's `lr` scaled linearly from batch 512,
        Adam's and AdamW's `lr` as it is."""
        return self.lr * self.batch_size / LR_REFERENCE_BATCH if self.optimizer == "sgd" else self.lr

    @property
    def plateau_mode(self) -> str:
        """ReduceLROnPlateau's mode, derived from the metric it watches."""
        return "min" if self.plateau_metric.endswith("_loss") else "max"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """A Config from a dict; an unknown key is an error naming the closest known one."""
        check_names(values)
        return cls(**values)

    @classmethod
    def from_notebook(cls, namespace: dict) -> "Config":
        """The Config of a notebook's parameters: train.ipynb's `config = Config.from_notebook(globals())`.

        Takes each parameter's value from `namespace`, after checking the names that papermill's
        injected cell and the notebook's own `parameters` cell assigned (the last run of each, read
        from IPython's input history `In`): a name that is no parameter, such as a typo passed with
        `papermill -p epoch 2`, is an error naming the closest parameter, before anything runs.
        Papermill only warns about such a name, and the run would go on with the default.
        """
        check_names(notebook_parameter_names(namespace.get("In", [])))
        return cls(**{name: namespace[name] for name in field_names() if name in namespace})


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def val_size_error(val_size: int, images: int, held_out_of: str) -> str:
    """The error for a validation split that holds out every training image, with what to pass."""
    return (f"val_size={val_size} holds out all of {held_out_of}; pass val_size={images // 10} (a tenth) "
            "or 0 (watch the test set)")


def check_names(names) -> None:
    """A one-line ValueError for any name that is not a parameter, with the closest parameter's name."""
    known = field_names()
    unknown = [name for name in names if name not in known]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(f"unknown parameter {', '.join(hints)}; the parameters are listed in s11lib/config.py "
                     "and by `.venv/bin/python -m s11lib.run --help` (the environment scripts/train.sh makes)")


# Papermill's Python translator starts the cell it injects with this line (papermill/translators.py);
# train.ipynb's own parameters cell starts with a longer comment that begins the same way.
_INJECTED_HEADER = "# Parameters"


def notebook_parameter_names(history: list[str]) -> list[str]:
    """The names assigned by the last papermill-injected cell and the last run of the parameters cell.

    `history` is IPython's `In`: the source of every cell run so far. Both cells start with a
    "# Parameters" comment line: papermill's is exactly that, the notebook's says more. Names
    papermill injects itself on request (PAPERMILL_INPUT_PATH, PAPERMILL_OUTPUT_PATH) are left out.
    """
    injected = parameters = None
    for source in history:
        first = source.lstrip().split("\n", 1)[0].rstrip()
        if first == _INJECTED_HEADER:
            injected = source
        elif first.startswith(_INJECTED_HEADER):
            parameters = source
    names: list[str] = []
    for source in (parameters, injected):
        if source is None:
            continue
        try:
            tree = ast.parse(source)
        except SyntaxError:  # IPython would not have run it; nothing to check
            continue
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
            for target in targets:
                if isinstance(target, ast.Name) and not target.id.startswith("PAPERMILL_") \
                        and target.id not in names:
                    names.append(target.id)
    return names


@functools.cache
def field_help() -> dict[str, str]:
    """Each parameter's comment in this file's Config, for `--help`: the text after `#` on its
    line, with any comment lines that continue it (indented past the `#`)."""
    source = inspect.getsource(Config)
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    helps = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        line = node.end_lineno
        text = [comments[line].lstrip("#").strip()] if line in comments else []
        while line + 1 in comments and lines[line].lstrip().startswith("#  "):  # a continuation line
            line += 1
            text.append(comments[line].lstrip("#").strip())
        helps[node.target.id] = " ".join(text)
    return helps


