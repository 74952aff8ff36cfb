"""Browse a finished run's mistakes: the explore notebook's library.

    from s11lib.explore import load_run, MistakeBrowser
    finished = load_run("runs/train")          # best.pt, config.json, metrics.csv, the test set
    MistakeBrowser(finished)                   # an ipywidgets browser over every mistake

`load_run` re-predicts the test set with best.pt (it does not trust stored predictions) and checks
that the predictions agree with the run's test_predictions.npy, so a data folder that holds other
images than the run saw is an error, not a silent mismatch. `MistakeBrowser` shows one mistake at
a time: the image, Grad-CAM for the predicted class and for the true class side by side, and the
top-3 probabilities; it filters by true and predicted class and lets the user pick the layer and
the overlay opacity. Its pictures are plain PNG bytes, so they also render without a browser
(`snapshot`) and tests can compare them.
"""
from __future__ import annotations

import hashlib
import html
import io
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn

from s11lib import checkpoint, provenance
from s11lib.config import Config
from s11lib.constants import CLASSES, NUM_CLASSES
from s11lib.loaders import DeviceLoader, load_cifar10, split_indices
from s11lib.models import resnet18
from s11lib.device import resolve_device, resolve_precision
from s11lib.run import read_metrics
from s11lib.transforms import test_transforms, to_float
from s11lib.utils import atomic, cam_checks
from s11lib.utils.accuracy import confusion_matrix, per_class_accuracy
from s11lib.utils.gradcam import GradCAM, overlay
from s11lib.utils.misclassified import Mistakes, find_misclassified
from s11lib.utils.train_test import evaluate

LAYERS = ("layer1", "layer2", "layer3", "layer4")
ANY = -1  # the class filters' "any class"
_REQUIRED = ("config.json", "metrics.csv", checkpoint.BEST)


@dataclass
class FinishedRun:
    """A run's best model and its predictions on the test images the run used."""

    run_dir: Path
    config: Config
    rows: list[dict]  # metrics.csv
    best_epoch: int
    model: nn.Module  # best.pt, in eval mode, on `device`
    device: torch.device
    images: torch.Tensor  # (N, 3, 32, 32) uint8 test images, on the CPU
    labels: torch.Tensor  # (N,)
    logits: torch.Tensor  # (N, 10) best.pt's logits, float32 on the CPU
    provenance: dict | None = None  # run.json: what made the run (s11lib/provenance.py); None if it has none

    # Derived once: the browser reads them on every click, the logits never change.
    @cached_property
    def probs(self) -> torch.Tensor:
        return self.logits.softmax(1)

    @cached_property
    def preds(self) -> torch.Tensor:
        return self.logits.argmax(1)

    @cached_property
    def confusion(self) -> torch.Tensor:
        return confusion_matrix(self.preds, self.labels, NUM_CLASSES)

    @cached_property
    def _all_mistakes(self) -> Mistakes:
        return find_misclassified(self.logits, self.labels, len(self.labels))

    def inputs(self, positions: torch.Tensor) -> torch.Tensor:
        """The test images at `positions` as the model takes them: normalised, on its device."""
        return test_transforms()(self.images[positions].to(self.device))

    def mistakes(self, true_class: int | None = None, pred_class: int | None = None) -> Mistakes:
        """Every misclassified test image, most confident first, optionally of one true/predicted class."""
        found = self._all_mistakes
        keep = torch.ones(len(found), dtype=torch.bool)
        if true_class is not None:
            keep &= found.labels == true_class
        if pred_class is not None:
            keep &= found.preds == pred_class
        return Mistakes(found.positions[keep], found.labels[keep], found.preds[keep], found.confidences[keep])


def load_run(run_dir: str | Path, data_dir: str | Path | None = None, device: str = "auto") -> FinishedRun:
    """Load a finished run: its config, metrics and best.pt, and predict the test set it used.

    Args:
        run_dir: the run's out_dir.
        data_dir: where CIFAR-10 is; default the run's own data_dir.
        device: "auto", "cpu", "cuda", ...
    """
    run_dir = Path(run_dir)
    missing = [name for name in _REQUIRED if not (run_dir / name).is_file()]
    if missing:
        raise ValueError(f"{run_dir} is not a finished run (no {', '.join(missing)}); train one with "
                         "notebooks/train.ipynb first")
    config = Config.from_dict(json.loads((run_dir / "config.json").read_text()))
    device_ = resolve_device(device)
    best = checkpoint.load_checkpoint(run_dir / checkpoint.BEST, map_location=device_)
    model = resnet18(NUM_CLASSES, width=config.width)
    checkpoint.load_model_state(model, best, run_dir / checkpoint.BEST)
    model.to(device_).eval()

    images, labels = load_cifar10(data_dir or config.data_dir, train=False, download=config.download)
    if config.test_subset is not None:
        images, labels = images[: config.test_subset], labels[: config.test_subset]
    # The run's batch size: the same computation as the run's own evaluation, so the same predictions.
    loader = DeviceLoader(images, labels, config.batch_size, test_transforms(), device=device_)
    # At the run's precision on this device, as the run predicted (s11lib/run.py, explain).
    amp_dtype = resolve_precision(config.amp, device_).dtype
    _, logits = evaluate(model, loader, nn.CrossEntropyLoss(), device_, amp_dtype, keep_logits=True)
    stored = run_dir / "test_predictions.npy"
    if stored.is_file():
        saved = np.load(stored)
        # Not all equal: another CPU or a GPU may flip a near tie. Other images flip many.
        agree = len(saved) == len(labels) and (saved != logits.argmax(1).numpy()).sum() <= max(1, len(saved) // 100)
        if not agree:
            raise ValueError(f"best.pt's predictions on the test set in {data_dir or config.data_dir} differ from "
                             f"the run's ({stored}); is it the same data set?")
    return FinishedRun(run_dir, config, read_metrics(run_dir / "metrics.csv"), int(best["epoch"]), model, device_,
                       images, labels, logits, provenance.read(run_dir))


# --- what each mistake resembles: nearest training images in the model's feature space ----------
FEATURES = "features.npz"  # the cache of pooled features, in the run folder (run.DERIVED_FILES)


@dataclass
class Neighbours:
    """For each test image, its k nearest training images by cosine similarity of best.pt's pooled
    features (the input of the classifier)."""

    positions: torch.Tensor  # (N_test, k) rows of the training split as loaded, nearest first
    similarity: torch.Tensor  # (N_test, k) cosine similarity, float32
    labels: torch.Tensor  # (N_test, k) the neighbours' labels
    train_images: torch.Tensor  # (N_train, 3, 32, 32) uint8: the training split as loaded, for pictures
    train_indices: torch.Tensor  # (N_train,) each row's index in CIFAR-10's training set
    computed: bool  # False: the features came from the cache

    def agreeing(self, predictions: torch.Tensor) -> torch.Tensor:
        """(N_test,) how many of each image's neighbours carry `predictions`' class."""
        return (self.labels == predictions[:, None]).sum(1)


def training_split(config: Config,
                   data_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The run's training images as it loaded them (its train_subset, then without its validation
    split, in index order), their labels, and their indices in CIFAR-10's training set."""
    images, labels = load_cifar10(data_dir or config.data_dir, train=True, download=config.download)
    if config.train_subset is not None:
        images, labels = images[: config.train_subset], labels[: config.train_subset]
    kept, _ = split_indices(len(images), config.val_size)
    return images[kept], labels[kept], kept


@torch.no_grad()
def pooled_features(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int,
                    amp_dtype: torch.dtype | None = None, progress: bool = False,
                    desc: str = "features") -> torch.Tensor:
    """(N, C) float32 on the CPU: the global-average-pooled output of the trunk, what the classifier
    sees, for uint8 images (test transforms: no augmentation), in batches on `device`."""
    from tqdm import tqdm

    from s11lib.utils.train_test import autocast

    model.eval()
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress):
        x = test_transforms()(images[start : start + batch_size].to(device))
        with autocast(device, amp_dtype):
            pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(model.forward_features(x), 1), 1)
        out.append(pooled.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def _cache_key(finished: FinishedRun, n_train: int) -> str:
    """What the cached features were computed from: best.pt's bytes, the training split and the
    precision. Any change makes the cache stale."""
    best = hashlib.sha256((finished.run_dir / checkpoint.BEST).read_bytes()).hexdigest()
    config = finished.config
    return json.dumps({"best.pt sha256": best, "train_subset": config.train_subset, "val_size": config.val_size,
                       "train_images": n_train, "test_subset": config.test_subset, "amp": config.amp})


def cosine_neighbours(queries: torch.Tensor, keys: torch.Tensor, k: int,
                      chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The k rows of `keys` most cosine-similar to each row of `queries`: (similarity, positions),
    each (len(queries), k), most similar first. A brute-force matrix product, a chunk of queries at
    a time: at CIFAR-10's size (10,000 x 45,000 x 512) that is seconds, and exact."""
    keys = nn.functional.normalize(keys.float(), dim=1)
    queries = nn.functional.normalize(queries.float(), dim=1)
    sims, positions = [], []
    for start in range(0, len(queries), chunk):
        top = (queries[start : start + chunk] @ keys.T).topk(min(k, len(keys)), dim=1)
        sims.append(top.values)
        positions.append(top.indices)
    return torch.cat(sims), torch.cat(positions)


def feature_neighbours(finished: FinishedRun, k: int = 5, data_dir: str | Path | None = None,
                       batch_size: int | None = None, progress: bool = True) -> Neighbours:
    """Each test image's k nearest training images in best.pt's feature space, with their labels.

    The features of the training split (and of the test images) are computed once in batches on
    the run's device, at its precision, and cached in the run folder as float16 (FEATURES), with
    what they were computed from: a changed best.pt or split makes the cache stale, and it is
    computed again. On 2 CPU cores the 45,000 training images at full width take minutes."""
    train_images, train_labels, train_indices = training_split(finished.config, data_dir)
    path = finished.run_dir / FEATURES
    key = _cache_key(finished, len(train_images))
    cached = None
    if path.is_file():
        try:
            with np.load(path) as stored:
                if str(stored["key"]) == key:
                    cached = torch.from_numpy(stored["train"].astype(np.float32)), \
                        torch.from_numpy(stored["test"].astype(np.float32))
        except (OSError, ValueError, KeyError):  # torn or foreign: computed again
            cached = None
    if cached is None:
        amp_dtype = resolve_precision(finished.config.amp, finished.device).dtype
        size = batch_size or finished.config.batch_size
        train = pooled_features(finished.model, train_images, finished.device, size, amp_dtype, progress,
                                "training features")
        test = pooled_features(finished.model, finished.images, finished.device, size, amp_dtype, progress,
                               "test features")
        atomic.save_npz(path, key=np.array(key), train=train.numpy().astype(np.float16),
                        test=test.numpy().astype(np.float16))
        # What is used is what the cache will give next time: the same figures either way.
        train, test = train.half().float(), test.half().float()
    else:
        train, test = cached
    similarity, positions = cosine_neighbours(test, train, k)
    return Neighbours(positions, similarity, train_labels[positions], train_images, train_indices, cached is None)


def neighbour_figure(finished: FinishedRun, neighbours: Neighbours, count: int = 20):
    """The `count` most confident mistakes, each beside its nearest training image (its label, and
    how many of the k nearest carry the predicted class)."""
    from s11lib.utils.misclassified import plot_image_grid

    mistakes = finished.mistakes()
    panels, titles = [], []
    for position in mistakes.positions[:count].tolist():
        label, pred = int(finished.labels[position]), int(finished.preds[position])
        nearest = int(neighbours.positions[position, 0])
        agree = int((neighbours.labels[position] == pred).sum())
        panels += [finished.images[position], neighbours.train_images[nearest]]
        titles += [f"#{position}: true {CLASSES[label]}\npred {CLASSES[pred]} "
                   f"({100 * float(finished.probs[position, pred]):.0f}%)",
                   f"nearest: {CLASSES[int(neighbours.labels[position, 0])]}\n"
                   f"{agree} of {neighbours.labels.shape[1]} are {CLASSES[pred]}"]
    return plot_image_grid(torch.stack(panels) if panels else torch.zeros(0, 3, 32, 32, dtype=torch.uint8), titles,
                           ncols=8, suptitle="Each mistake (left) beside its nearest training image in best.pt's "
                           "features (right)")


# --- how far the confidence can be trusted -----------------------------------------------------
@dataclass
class Calibration:
    """A reliability diagram's bins (equal width over [0, 1]) and the expected calibration error
    (Guo et al. 2017): the bins' gap between accuracy and mean confidence, weighted by their share
    of the images. Confidence is the top class's softmax probability."""

    edges: torch.Tensor  # (bins + 1,)
    counts: torch.Tensor  # (bins,) images per bin
    confidence: torch.Tensor  # (bins,) their mean confidence (NaN where empty)
    accuracy: torch.Tensor  # (bins,) the share right (NaN where empty)
    ece: float  # in [0, 1]
    mean_confidence_wrong: float
    mean_confidence_right: float
    wrong_confidences: torch.Tensor  # the mistakes' confidences, for marking them

    @property
    def bins(self) -> int:
        return len(self.counts)


def calibration(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> Calibration:
    """Reliability bins and ECE of predicted probabilities (N, classes) against labels. Bin m holds
    confidences in ((m - 1) / bins, m / bins], the first also 0."""
    confidence, predicted = probs.float().max(1)
    right = predicted == labels
    which = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    counts = torch.bincount(which, minlength=bins)
    sums = torch.zeros(bins).index_add_(0, which, confidence)
    hits = torch.zeros(bins).index_add_(0, which, right.float())
    nonzero = counts.clamp(min=1).float()
    mean_conf = torch.where(counts > 0, sums / nonzero, torch.nan)
    acc = torch.where(counts > 0, hits / nonzero, torch.nan)
    ece = float(((counts.float() / max(len(labels), 1)) * (hits / nonzero - sums / nonzero).abs()).sum())

    def mean(values: torch.Tensor) -> float:
        return float(values.mean()) if len(values) else float("nan")
    return Calibration(torch.linspace(0, 1, bins + 1), counts, mean_conf, acc, ece, mean(confidence[~right]),
                       mean(confidence[right]), confidence[~right])


def per_class_table(finished: FinishedRun) -> str:
    """Per-class accuracy of best.pt as a text table, worst class first."""
    confusion = finished.confusion
    accuracy = per_class_accuracy(confusion)
    wrong = confusion.sum(1) - confusion.diag()
    lines = [f"{'class':<11}{'accuracy':>9}{'images':>8}  most often taken for"]
    for c in sorted(range(NUM_CLASSES), key=lambda c: (float(accuracy[c].nan_to_num(101.0)), c)):
        others = confusion[c].clone()
        others[c] = -1
        taken_for = f"{CLASSES[int(others.argmax())]} ({int(others.max())})" if wrong[c] > 0 else "-"
        lines.append(f"{CLASSES[c]:<11}{float(accuracy[c]):>8.2f}%{int(confusion[c].sum()):>8}  {taken_for}")
    total = confusion.sum()
    lines.append(f"{'all':<11}{100.0 * float(confusion.diag().sum()) / max(int(total), 1):>8.2f}%{int(total):>8}")
    return "\n".join(lines)


def summary(finished: FinishedRun) -> str:
    """The run in a few lines: epochs, best epoch, the last and the best epoch's metrics, then what
    made it (run.json: code, versions, machine, segments)."""
    def accuracies(row: dict) -> str:
        val = f"val {row['val_acc']:.2f}%, " if row.get("val_acc") is not None else ""
        return f"train {row['train_acc']:.2f}%, {val}test {row['test_acc']:.2f}%"

    right = float((finished.preds == finished.labels).float().mean())
    return "\n".join([
        f"run: {len(finished.rows)} of {finished.config.epochs} epochs, best.pt = epoch {finished.best_epoch}",
        f"last epoch: {accuracies(finished.rows[-1])}",
        f"best epoch: {accuracies(finished.rows[finished.best_epoch - 1])}",
        f"best.pt on the {len(finished.labels)} test images: {100.0 * right:.2f}%, "
        f"{int((finished.preds != finished.labels).sum())} misclassified",
        provenance.describe(finished.provenance),
    ])


def check_layers(finished: FinishedRun) -> tuple[str, ...]:
    """The layers the heatmap checks explain: layer2 to layer4, and the run's gradcam_layer if it is another."""
    layer = finished.config.gradcam_layer
    return cam_checks.CHECKED_LAYERS + (() if layer in cam_checks.CHECKED_LAYERS else (layer,))


def check_samples(finished: FinishedRun, correct_sample: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
    """The images the heatmap checks use, as positions in the test images: "mistakes", the run's
    own num_misclassified (those of misclassified.json and gradcam.png), and "correct", a fixed
    random sample of the correctly classified ones (the same for the same predictions and seed)."""
    if correct_sample < 0:
        raise ValueError(f"correct_sample must be >= 0, got {correct_sample}")
    right = (finished.preds == finished.labels).nonzero().flatten()
    picked = torch.randperm(len(right), generator=torch.Generator().manual_seed(seed))[:correct_sample]
    return {"mistakes": finished.mistakes().positions[: finished.config.num_misclassified],
            "correct": right[picked].sort().values}


def save_cam_checks(finished: FinishedRun, samples: dict[str, torch.Tensor], sanity: cam_checks.Randomization,
                    curves: dict[str, dict[str, cam_checks.Curves]], seed: int) -> Path:
    """Write the heatmap checks' numbers to the run folder's cam_checks.json; returns its path."""
    path = finished.run_dir / "cam_checks.json"
    atomic.save_json({
        "checkpoint": checkpoint.BEST, "epoch": finished.best_epoch, "gradcam_layer": finished.config.gradcam_layer,
        "seed": seed,
        "images": {group: positions.tolist() for group, positions in samples.items()},  # indices into the test set
        "sanity": sanity.to_dict(),
        "faithfulness": cam_checks.faithfulness_dict(curves),
    }, path)
    return path


def show_figure(fig) -> None:
    """Display a matplotlib Figure as a PNG (no pyplot, no backend needed)."""
    from IPython.display import Image, display

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    display(Image(data=buffer.getvalue(), format="png"))


def _to_png(rgb: np.ndarray) -> bytes:
    from matplotlib.image import imsave

    buffer = io.BytesIO()
    imsave(buffer, np.clip(rgb, 0, 1), format="png")
    return buffer.getvalue()


class MistakeBrowser:
    """An ipywidgets browser over every misclassified test image of a finished run.

    The controls are attributes, so code (and tests) can drive it: `true_class`, `pred_class`
    (dropdowns of class numbers, ANY = any class), `selector` (slider over the filtered mistakes, most confident
    first), `layer`, `alpha`. The outputs: `picture` (PNG: image | Grad-CAM for the predicted
    class | Grad-CAM for the true class), `caption` and `probabilities` (HTML).
    """

    def __init__(self, finished: FinishedRun, layer: str | None = None, alpha: float = 0.5, scale: int = 4,
                 neighbours: Neighbours | None = None):
        import ipywidgets as w

        self.finished = finished
        self.neighbours = neighbours  # feature_neighbours(finished): a panel of the nearest training images
        self.scale = scale
        self._cams: dict[tuple[int, str], torch.Tensor] = {}
        classes = [("any", ANY)] + [(name, i) for i, name in enumerate(CLASSES)]  # None would show blank
        self.true_class = w.Dropdown(options=classes, value=ANY, description="true")
        self.pred_class = w.Dropdown(options=classes, value=ANY, description="predicted")
        self.selector = w.IntSlider(min=0, max=0, value=0, description="mistake", continuous_update=False)
        default = layer or (finished.config.gradcam_layer if finished.config.gradcam_layer in LAYERS else "layer3")
        self.layer = w.ToggleButtons(options=LAYERS, value=default, description="layer",
                                     style={"button_width": "70px"})
        self.alpha = w.FloatSlider(min=0.0, max=1.0, step=0.05, value=alpha, description="opacity",
                                   continuous_update=False)
        self.count = w.HTML()
        self.caption = w.HTML()
        self.picture = w.Image(format="png")
        self.probabilities = w.HTML()
        self.neighbour_caption = w.HTML()
        self.neighbour_picture = w.Image(format="png")
        self.widget = w.VBox([
            w.HBox([self.true_class, self.pred_class, self.count]),
            self.selector,
            w.HBox([self.layer, self.alpha]),
            self.caption,
            w.HBox([self.picture, self.probabilities]),
            *((self.neighbour_caption, self.neighbour_picture) if neighbours is not None else ()),
        ])
        self.true_class.observe(self._filter_changed, "value")
        self.pred_class.observe(self._filter_changed, "value")
        for control in (self.selector, self.layer, self.alpha):
            control.observe(lambda _change: self.render(), "value")
        self._filter_changed()

    # --- state ---------------------------------------------------------------------------------
    @property
    def current(self) -> int | None:
        """The selected mistake's position in the test images, or None when the filter leaves none."""
        if not len(self.mistakes):
            return None
        return int(self.mistakes.positions[self.selector.value])

    def _filter_changed(self, _change=None) -> None:
        self.mistakes = self.finished.mistakes(*(None if c.value == ANY else c.value
                                                 for c in (self.true_class, self.pred_class)))
        n = len(self.mistakes)
        with self.selector.hold_trait_notifications():
            self.selector.value = 0
            self.selector.max = max(n - 1, 0)
        self.selector.disabled = n <= 1
        total = int((self.finished.preds != self.finished.labels).sum())
        self.count.value = f"{n} of {total} mistakes"
        self.render()

    def heatmaps(self, position: int, layer: str) -> torch.Tensor:
        """Grad-CAM maps (2, 32, 32) of one test image: for the predicted class, then the true class."""
        key = (position, layer)
        if key not in self._cams:
            finished = self.finished
            x = finished.inputs(torch.tensor([position])).expand(2, -1, -1, -1)
            targets = torch.stack([finished.preds[position], finished.labels[position]]).to(finished.device)
            with GradCAM(finished.model, layer) as cam:
                self._cams[key] = cam(x, targets).cpu()
        return self._cams[key]

    # --- drawing -------------------------------------------------------------------------------
    def render(self) -> None:
        position = self.current
        if position is None:
            self.caption.value = "<b>No mistakes with this true and predicted class.</b>"
            self.picture.value = self.neighbour_picture.value = b""
            self.probabilities.value = self.neighbour_caption.value = ""
            return
        finished = self.finished
        label, pred = int(finished.labels[position]), int(finished.preds[position])
        self.picture.value = self.png(position)
        self.caption.value = (
            f"test image {position}: <b>true {CLASSES[label]}</b>, <b>predicted {CLASSES[pred]}</b> "
            f"({100 * float(finished.probs[position, pred]):.1f}%). Panels: the image; Grad-CAM "
            f"({html.escape(self.layer.value)}) for <i>{CLASSES[pred]}</i> (predicted); for <i>{CLASSES[label]}</i> (true).")
        top = finished.probs[position].topk(3)
        rows = "".join(
            f"<tr><td>{CLASSES[c]}{' (true)' if c == label else ''}</td><td style='text-align:right'>{100 * p:.1f}%</td>"
            f"<td><div style='background:#4c72b0;height:10px;width:{int(round(120 * p))}px'></div></td></tr>"
            for p, c in zip(top.values.tolist(), top.indices.tolist()))
        self.probabilities.value = f"<table><tr><th colspan=3>top 3</th></tr>{rows}</table>"
        if self.neighbours is not None:
            self.neighbour_picture.value = self.neighbours_png(position)
            near = self.neighbours
            labels = near.labels[position].tolist()
            named = ", ".join(f"{CLASSES[c]} ({100 * s:.0f}%)"
                              for c, s in zip(labels, near.similarity[position].tolist()))
            self.neighbour_caption.value = (
                f"Its {len(labels)} nearest training images in best.pt's features (cosine similarity): "
                f"<b>{labels.count(pred)} of {len(labels)} are {CLASSES[pred]}</b> (predicted), "
                f"{labels.count(label)} {CLASSES[label]} (true). Nearest first: {html.escape(named)}.")

    def neighbours_png(self, position: int) -> bytes:
        """The selected test image's nearest training images in a row, each scaled up `scale` times."""
        near = self.neighbours
        images = near.train_images[near.positions[position]]
        gap = np.ones((32, 2, 3))
        panels = []
        for image in images:
            panels += [to_float(image).permute(1, 2, 0).numpy(), gap]
        strip = np.concatenate(panels[:-1], axis=1)
        return _to_png(strip.repeat(self.scale, 0).repeat(self.scale, 1))

    def png(self, position: int) -> bytes:
        """The three panels of one mistake as PNG bytes, each scaled up `scale` times."""
        image = self.finished.images[position]
        cams = self.heatmaps(position, self.layer.value)
        panels = [to_float(image).permute(1, 2, 0).numpy()] + [overlay(image, cam, self.alpha.value) for cam in cams]
        gap = np.ones((32, 2, 3))
        strip = np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)
        return _to_png(strip.repeat(self.scale, 0).repeat(self.scale, 1))

    def figure(self, count: int = 6):
        """A static figure of the first `count` mistakes shown: image, Grad-CAM predicted, Grad-CAM true."""
        from s11lib.utils.misclassified import plot_image_grid

        finished, panels, titles = self.finished, [], []
        for position in self.mistakes.positions[:count].tolist():
            label, pred = int(finished.labels[position]), int(finished.preds[position])
            image = finished.images[position]
            cams = self.heatmaps(position, self.layer.value)
            panels += [image, overlay(image, cams[0], self.alpha.value), overlay(image, cams[1], self.alpha.value)]
            titles += [f"#{position}: true {CLASSES[label]}", f"CAM: {CLASSES[pred]} (pred, "
                       f"{100 * float(finished.probs[position, pred]):.0f}%)", f"CAM: {CLASSES[label]} (true)"]
        return plot_image_grid(panels, titles, ncols=3, suptitle=f"Grad-CAM ({self.layer.value}), most confident "
                               "mistakes first")

    def snapshot(self):
        """The current view for a place without widgets (papermill, a static page): an IPython Image."""
        from IPython.display import Image

        return Image(data=self.picture.value, format="png") if self.picture.value else None

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
