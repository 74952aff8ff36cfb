"""The explore library: a finished run loads and re-predicts as it did; the browser's controls
change what it shows (each callback driven by setting a control's value, as a user's click does)."""
import io
import json
import shutil

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from s11lib.constants import CLASSES
from s11lib.explore import (ANY, FEATURES, LAYERS, MistakeBrowser, calibration, feature_neighbours, load_run,
                            per_class_table, summary, training_split)
from s11lib.transforms import test_transforms
from s11lib.utils.accuracy import per_class_accuracy
from s11lib.utils.gradcam import GradCAM


@pytest.fixture(scope="module")
def finished(learned_run, data_dir):
    return load_run(learned_run.out_dir, data_dir, device="cpu")


@pytest.fixture
def browser(finished):
    return MistakeBrowser(finished, layer="layer3", alpha=0.5)


def _pixels(png: bytes) -> np.ndarray:
    return imread(io.BytesIO(png))


# --- loading ---------------------------------------------------------------------------------------
def test_load_run_predicts_as_the_run_did(finished, learned_run):
    assert np.array_equal(finished.preds.numpy(), learned_run.test_predictions)
    assert finished.best_epoch == learned_run.best_epoch and finished.rows == learned_run.rows
    assert not finished.model.training


def test_every_mistake_is_a_mistake_most_confident_first(finished):
    mistakes = finished.mistakes()
    assert len(mistakes) == int((finished.preds != finished.labels).sum()) > 20  # all, not only 20
    assert torch.all(finished.preds[mistakes.positions] != finished.labels[mistakes.positions])
    assert torch.all(mistakes.confidences[:-1] >= mistakes.confidences[1:])
    report = json.loads((finished.run_dir / "misclassified.json").read_text())
    assert mistakes.positions[:5].tolist() == [m["index"] for m in report["misclassified"]]  # the run's own 5


def test_summary_and_per_class_table_agree_with_the_accuracy_utilities(finished):
    accuracy = per_class_accuracy(finished.confusion)
    table = per_class_table(finished).splitlines()
    for name, value in zip(CLASSES, accuracy.tolist()):
        row = next(line for line in table if line.startswith(name + " "))
        assert f"{value:.2f}%" in row
    overall = 100.0 * float((finished.preds == finished.labels).float().mean())
    assert table[-1].startswith("all") and f"{overall:.2f}%" in table[-1]
    assert f"{overall:.2f}%, {int((finished.preds != finished.labels).sum())} misclassified" in summary(finished)


def test_not_a_finished_run(tmp_path):
    with pytest.raises(ValueError, match="is not a finished run .no config.json, metrics.csv, best.pt"):
        load_run(tmp_path)


def test_other_images_than_the_run_saw(learned_run, data_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(learned_run.out_dir, run_dir)
    np.save(run_dir / "test_predictions.npy", (learned_run.test_predictions + 1) % 10)  # as if other images
    with pytest.raises(ValueError, match="differ from the run's"):
        load_run(run_dir, data_dir, device="cpu")


# --- the browser's callbacks -----------------------------------------------------------------------
def test_starts_on_the_most_confident_mistake(browser, finished):
    mistakes = finished.mistakes()
    assert browser.current == int(mistakes.positions[0])
    assert browser.selector.max == len(mistakes) - 1
    assert browser.count.value == f"{len(mistakes)} of {len(mistakes)} mistakes"
    assert f"test image {browser.current}:" in browser.caption.value
    assert _pixels(browser.picture.value).shape[:2] == (32 * 4, (32 * 3 + 4) * 4)  # three panels, scaled 4x


def test_moving_the_selector_shows_another_image(browser, finished):
    before = (browser.picture.value, browser.caption.value, browser.probabilities.value)
    browser.selector.value = 3
    position = int(finished.mistakes().positions[3])
    assert browser.current == position
    assert f"test image {position}:" in browser.caption.value
    assert browser.picture.value != before[0] and browser.caption.value != before[1]
    true_name, pred_name = CLASSES[int(finished.labels[position])], CLASSES[int(finished.preds[position])]
    assert f"true {true_name}" in browser.caption.value and f"predicted {pred_name}" in browser.caption.value


def test_top3_probabilities(browser, finished):
    browser.selector.value = 1
    probs = finished.probs[browser.current]
    top = probs.topk(3)
    shown = browser.probabilities.value
    positions = [shown.index(f"<td>{CLASSES[c]}") for c in top.indices.tolist()]
    assert positions == sorted(positions)  # most probable first
    for p in top.values.tolist():
        assert f"{100 * p:.1f}%" in shown


def test_the_panels_are_the_image_and_gradcam_for_predicted_and_true_class(browser, finished):
    position = browser.current
    image = finished.images[position]
    x = test_transforms()(image[None].to(finished.device))
    with GradCAM(finished.model, "layer3") as cam:
        expected_pred = cam(x, finished.preds[position : position + 1])[0]
        expected_true = cam(x, finished.labels[position : position + 1])[0]
    pred_map, true_map = browser.heatmaps(position, "layer3")
    assert torch.allclose(pred_map, expected_pred, atol=1e-5) and torch.allclose(true_map, expected_true, atol=1e-5)
    assert not torch.allclose(pred_map, true_map)  # two different explanations
    browser.alpha.value = 0.0  # no heatmap: every panel is the image itself
    pixels = _pixels(browser.picture.value)[..., :3]
    left, middle = pixels[:, : 32 * 4], pixels[:, (32 + 2) * 4 : (64 + 2) * 4]
    assert np.abs(left - middle).max() < 1 / 255 + 1e-6
    expected = image.permute(1, 2, 0).numpy().repeat(4, 0).repeat(4, 1) / 255.0
    assert np.abs(left - expected).max() < 1 / 255 + 1e-6


@pytest.mark.parametrize("layer", [layer for layer in LAYERS if layer != "layer3"])
def test_changing_the_layer_changes_the_heatmaps(browser, layer):
    before = browser.picture.value
    browser.layer.value = layer
    assert browser.picture.value != before and f"Grad-CAM ({layer})" in browser.caption.value


def test_changing_the_opacity_changes_the_picture(browser):
    before = browser.picture.value
    browser.alpha.value = 0.9
    assert browser.picture.value != before


def test_filtering_by_true_and_predicted_class(browser, finished):
    target = int(finished.mistakes().labels[0])
    browser.selector.value = 2
    browser.true_class.value = target
    shown = browser.mistakes
    assert len(shown) and torch.all(shown.labels == target) and browser.selector.value == 0
    assert browser.selector.max == len(shown) - 1
    assert browser.count.value.startswith(f"{len(shown)} of ")
    assert f"true {CLASSES[target]}" in browser.caption.value
    browser.pred_class.value = target  # a true class is never its own mistake
    assert len(browser.mistakes) == 0 and browser.current is None
    assert "No mistakes" in browser.caption.value and browser.picture.value == b""
    browser.true_class.value = ANY
    browser.pred_class.value = ANY
    assert len(browser.mistakes) == len(finished.mistakes())


def test_static_views_for_papermill(browser):
    assert browser.snapshot().data == browser.picture.value
    fig = browser.figure(4)
    assert len(fig.axes) == 12  # 4 mistakes x (image, Grad-CAM predicted, Grad-CAM true)


# --- what each mistake resembles, and how far the confidence can be trusted ------------------------
@pytest.fixture(scope="module")
def copied_run(learned_run, data_dir, tmp_path_factory):
    """The learned run in a folder of its own: the neighbours' cache is written there."""
    folder = tmp_path_factory.mktemp("neighbours") / "run"
    shutil.copytree(learned_run.out_dir, folder)
    return load_run(folder, data_dir, device="cpu")


def test_neighbours_are_those_of_a_plain_per_image_loop(copied_run, data_dir):
    found = feature_neighbours(copied_run, k=5, data_dir=data_dir, progress=False)
    train_images, train_labels, _ = training_split(copied_run.config, data_dir)
    assert found.train_images.shape == train_images.shape and torch.equal(found.train_images, train_images)
    model, captured = copied_run.model, []
    # The reference takes the classifier's input through a hook (not forward_features), one image
    # at a time for the queries, and compares each query with every training image on its own.
    handle = model.linear.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            for start in range(0, len(train_images), 256):
                model(test_transforms()(train_images[start : start + 256]))
            train = torch.cat(captured)
            for position in range(8):
                captured.clear()
                model(test_transforms()(copied_run.images[position : position + 1]))
                sims = torch.stack([torch.nn.functional.cosine_similarity(captured[0][0], row, dim=0) for row in train])
                top = sims.topk(6)
                # The cache holds float16: compare where the 5th and 6th are not a near tie.
                if float(top.values[4] - top.values[5]) > 2e-3:
                    assert set(found.positions[position].tolist()) == set(top.indices[:5].tolist())
                torch.testing.assert_close(found.similarity[position], top.values[:5], atol=2e-3, rtol=0)
                assert torch.equal(found.labels[position], train_labels[found.positions[position]])
    finally:
        handle.remove()
    assert found.agreeing(copied_run.preds).shape == (len(copied_run.labels),)


def test_the_feature_cache_is_reused_until_best_pt_changes(copied_run, data_dir):
    from s11lib.run import DERIVED_FILES
    assert FEATURES in DERIVED_FILES  # a fresh start in the folder removes it (test_resume)
    first = feature_neighbours(copied_run, k=3, data_dir=data_dir, progress=False)
    with np.load(copied_run.run_dir / FEATURES) as stored:
        assert stored["train"].dtype == np.float16 and stored["test"].dtype == np.float16
        assert stored["train"].shape[0] == len(first.train_images)
    again = feature_neighbours(copied_run, k=3, data_dir=data_dir, progress=False)
    assert not again.computed and torch.equal(again.positions, first.positions)
    best = torch.load(copied_run.run_dir / "best.pt", weights_only=True)
    best["model"]["linear.bias"] += 1.0  # a different best.pt, as a longer run would leave
    torch.save(best, copied_run.run_dir / "best.pt")
    changed = feature_neighbours(copied_run, k=3, data_dir=data_dir, progress=False)
    assert changed.computed  # stale: computed again, from the new file


def test_ece_against_a_hand_computed_example():
    confidences = [0.3, 0.35, 0.9, 0.95, 0.85]
    right = [True, False, True, True, False]
    probs = torch.tensor([[c] + [(1 - c) / 9] * 9 for c in confidences])  # class 0 is the top class
    labels = torch.tensor([0 if r else 3 for r in right])
    found = calibration(probs, labels, bins=5)
    # Bin (0.2, 0.4]: 0.3 right, 0.35 wrong: confidence 0.325, accuracy 0.5. Bin (0.8, 1.0]: 0.9,
    # 0.95 right, 0.85 wrong: 0.9 and 2/3. ECE = 2/5 * 0.175 + 3/5 * 0.2333 = 0.21.
    assert found.counts.tolist() == [0, 2, 0, 0, 3]
    torch.testing.assert_close(found.confidence[[1, 4]], torch.tensor([0.325, 0.9]))
    torch.testing.assert_close(found.accuracy[[1, 4]], torch.tensor([0.5, 2 / 3]))
    assert torch.isnan(found.accuracy[[0, 2, 3]]).all()
    assert found.ece == pytest.approx(0.21, abs=1e-6)
    assert found.mean_confidence_wrong == pytest.approx(0.6) and found.mean_confidence_right == pytest.approx(2.15 / 3)
    assert sorted(found.wrong_confidences.tolist()) == pytest.approx([0.35, 0.85])
    perfect = calibration(torch.eye(10)[:4], torch.arange(4), bins=10)
    assert perfect.ece == 0.0 and perfect.counts[-1] == 4


def test_the_browsers_neighbour_panel_follows_the_slider(copied_run, data_dir):
    near = feature_neighbours(copied_run, k=5, data_dir=data_dir, progress=False)
    browser = MistakeBrowser(copied_run, layer="layer3", neighbours=near)
    assert browser.neighbour_picture in browser.widget.children
    shown = []
    for index in (0, 3):
        browser.selector.value = index
        position = browser.current
        pixels = _pixels(browser.neighbour_picture.value)
        assert pixels.shape[:2] == (32 * 4, (32 * 5 + 2 * 4) * 4)  # five images, scaled 4x
        nearest = near.train_images[near.positions[position, 0]]
        expected = nearest.permute(1, 2, 0).float().numpy() / 255
        assert np.allclose(pixels[:128:4, :128:4, :3], expected, atol=1 / 255 + 1e-6)  # the first is the nearest
        pred = CLASSES[int(copied_run.preds[position])]
        agree = int((near.labels[position] == copied_run.preds[position]).sum())
        assert f"{agree} of 5 are {pred}</b> (predicted)" in browser.neighbour_caption.value
        shown.append((browser.neighbour_picture.value, browser.neighbour_caption.value))
    assert shown[0] != shown[1]
    assert MistakeBrowser(copied_run, layer="layer3").neighbour_picture not in \
        MistakeBrowser(copied_run, layer="layer3").widget.children  # off without neighbours


def test_the_reliability_diagram_and_the_neighbour_grid_draw(copied_run, data_dir):
    from s11lib.explore import neighbour_figure
    from s11lib.utils.plot_metrics import plot_reliability

    found = calibration(copied_run.probs, copied_run.labels)
    fig = plot_reliability(found)
    assert f"ECE {100 * found.ece:.2f}% (15 equal-width bins)" in fig.axes[0].get_title()
    assert found.counts.sum() == len(copied_run.labels)
    near = feature_neighbours(copied_run, k=5, data_dir=data_dir, progress=False)
    grid = neighbour_figure(copied_run, near, count=4)
    titles = [ax.get_title() for ax in grid.axes if ax.get_title()]
    assert len(titles) == 8 and titles[0].startswith(f"#{int(copied_run.mistakes().positions[0])}: true")
