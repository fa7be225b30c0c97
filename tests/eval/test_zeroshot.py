"""Zero-shot classifier, its metrics, and template / class-name loading."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from clipforge.eval.templates import TEMPLATE_SETS, get_templates, load_classnames
from clipforge.eval.zeroshot import build_zeroshot_classifier, predict_proba, zeroshot_metrics


class FakeTextEncoder:
    """encode_text stand-in: a fixed (unnormalized) vector per prompt, and a log of every call's batch."""

    def __init__(self, table: dict[str, list[float]]):
        self.table = table
        self.calls: list[list[str]] = []

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        self.calls.append(list(prompts))
        return torch.tensor([self.table[prompt] for prompt in prompts])


# ---------------------------------------------------------------------------------------------------------------
# build_zeroshot_classifier
# ---------------------------------------------------------------------------------------------------------------


def test_prompt_ensemble_matches_hand_computation():
    encoder = FakeTextEncoder(
        {
            "a cat": [3.0, 4.0],  # normalized: (0.6, 0.8)
            "the cat": [0.0, 2.0],  # normalized: (0, 1)
            "a dog": [-5.0, 0.0],  # normalized: (-1, 0)
            "the dog": [0.0, -0.5],  # normalized: (0, -1)
        }
    )
    classifier = build_zeroshot_classifier(encoder, ["cat", "dog"], ["a {}", "the {}"], batch_size=3)
    # cat: mean (0.3, 0.9), norm sqrt(0.9); dog: mean (-0.5, -0.5), norm sqrt(0.5).
    expected = torch.tensor([[0.3 / math.sqrt(0.9), 0.9 / math.sqrt(0.9)], [-math.sqrt(0.5), -math.sqrt(0.5)]])
    torch.testing.assert_close(classifier, expected)
    assert classifier.dtype == torch.float32
    # 4 prompts in batches of at most 3, across the class boundary, in class-major order.
    assert encoder.calls == [["a cat", "the cat", "a dog"], ["the dog"]]


def test_normalizing_each_prompt_matters():
    # The plain mean of raw embeddings would point elsewhere: (3, 4) + (0, 200) is dominated by the long one.
    encoder = FakeTextEncoder({"a x": [3.0, 4.0], "b x": [0.0, 200.0]})
    classifier = build_zeroshot_classifier(encoder, ["x"], ["a {}", "b {}"])
    torch.testing.assert_close(classifier, torch.tensor([[0.3, 0.9]]) / math.sqrt(0.9))


def test_single_template_string_and_clip_benchmark_placeholder():
    encoder = FakeTextEncoder({"photo of ant": [0.0, 3.0], "photo of bee": [2.0, 0.0]})
    classifier = build_zeroshot_classifier(encoder, ["ant", "bee"], "photo of {c}")
    torch.testing.assert_close(classifier, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


@pytest.mark.parametrize(
    ("templates", "message"),
    [
        (["a photo of a cat."], "placeholder"),
        (["a {} and a {}"], "one class name"),
        (["{name} photo"], "placeholder"),
        ([], "at least one template"),
        ([3], "must be a string"),
    ],
)
def test_bad_templates_raise(templates, message):
    encoder = FakeTextEncoder({})
    with pytest.raises(ValueError, match=message):
        build_zeroshot_classifier(encoder, ["cat"], templates)
    assert encoder.calls == []  # validated before any (expensive) encoding


def test_encoder_returning_wrong_shape_raises():
    with pytest.raises(ValueError, match=r"\(n, D\)"):
        build_zeroshot_classifier(lambda prompts: torch.zeros(3), ["cat"], ["a {}"])


# ---------------------------------------------------------------------------------------------------------------
# zeroshot_metrics and predict_proba (identity classifier: logits = image features, written by hand)
# ---------------------------------------------------------------------------------------------------------------


def test_ties_count_against_the_true_class():
    logits = torch.tensor(
        [
            [0.5, 0.5, 0.0],  # true 0, tied with class 1 -> wrong at top-1, predicted 1
            [0.5, 0.5, 0.0],  # true 1, tied with class 0 -> wrong at top-1, predicted 0
            [0.2, 0.2, 0.2],  # true 2, three-way tie -> rank 3, predicted 0 (lowest wrong index)
            [0.1, 0.9, 0.3],  # true 1 -> right
        ]
    )
    labels = torch.tensor([0, 1, 2, 1])
    metrics = zeroshot_metrics(logits, torch.eye(3), labels, ks=(1, 2, 3))
    assert metrics["acc1"] == pytest.approx(0.25)
    assert metrics["acc2"] == pytest.approx(0.75)
    assert metrics["acc3"] == pytest.approx(1.0)
    assert metrics["confusion_matrix"] == [[0, 1, 0], [1, 1, 0], [1, 0, 0]]
    # The confusion matrix follows the same tie rule, so its trace agrees with acc1.
    assert np.trace(metrics["confusion_matrix"]) / len(labels) == metrics["acc1"]


def test_topk_keys_only_for_k_up_to_number_of_classes():
    generator = torch.Generator().manual_seed(0)
    metrics = zeroshot_metrics(torch.randn(20, 9, generator=generator), torch.eye(9), torch.arange(20) % 9)
    assert "acc1" in metrics and "acc5" in metrics
    assert "acc10" not in metrics


def test_mean_per_class_recall_on_unbalanced_set_skips_absent_classes():
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0],
            [0.8, 0.1, 0.0],
            [0.7, 0.3, 0.0],
            [0.6, 0.1, 0.5],  # class 0 has four images, all right
            [0.9, 0.1, 0.0],  # class 1 has one image, wrong (predicted 0); class 2 has none
        ]
    )
    labels = torch.tensor([0, 0, 0, 0, 1])
    metrics = zeroshot_metrics(logits, torch.eye(3), labels, ks=(1,))
    assert metrics["acc1"] == pytest.approx(0.8)
    assert metrics["mean_per_class_recall"] == pytest.approx(0.5)  # (1 + 0) / 2, class 2 not counted
    assert metrics["confusion_matrix"] == [[4, 0, 0], [1, 0, 0], [0, 0, 0]]
    assert all(isinstance(count, int) for row in metrics["confusion_matrix"] for count in row)


def test_accuracy_matches_numpy_reference_with_ties():
    generator = torch.Generator().manual_seed(3)
    num_images, num_classes, dim = 200, 12, 5
    # Small integers: exact logits, many ties.
    image_features = torch.randint(-2, 3, (num_images, dim), generator=generator).float()
    classifier = torch.randint(-2, 3, (num_classes, dim), generator=generator).float()
    labels = torch.randint(num_classes, (num_images,), generator=generator)
    logits = image_features.numpy() @ classifier.numpy().T
    true_logit = logits[np.arange(num_images), labels.numpy()]
    wrong_at_or_above = (logits >= true_logit[:, None]).sum(axis=1) - 1
    metrics = zeroshot_metrics(image_features, classifier, labels, ks=(1, 3, 5, 10))
    for k in (1, 3, 5, 10):
        assert metrics[f"acc{k}"] == pytest.approx(np.mean(wrong_at_or_above < k)), k
    per_class = [np.mean(wrong_at_or_above[labels.numpy() == c] == 0) for c in np.unique(labels.numpy())]
    assert metrics["mean_per_class_recall"] == pytest.approx(np.mean(per_class))
    assert np.sum(metrics["confusion_matrix"]) == num_images


def test_metrics_input_validation():
    with pytest.raises(ValueError, match="same D"):
        zeroshot_metrics(torch.zeros(2, 3), torch.zeros(4, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"in \[0, 3\]"):
        zeroshot_metrics(torch.zeros(2, 3), torch.zeros(4, 3), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="shape"):
        zeroshot_metrics(torch.zeros(2, 3), torch.zeros(4, 3), torch.tensor([0, 1, 2]))


def test_predict_proba_is_softmax_of_scaled_cosine_logits():
    image_features = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    classifier = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    probabilities = predict_proba(image_features, classifier, logit_scale=10.0)
    logits = 10.0 * np.array([[1.0, 0.0, -1.0], [0.6, 0.8, -0.6]])
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probabilities.numpy(), expected, rtol=1e-5)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(2))


# ---------------------------------------------------------------------------------------------------------------
# templates and class names
# ---------------------------------------------------------------------------------------------------------------


def test_named_template_sets():
    assert get_templates("simple") == ["a photo of a {}."]
    imagenet = get_templates("openai-imagenet")
    assert len(imagenet) == 80 and len(set(imagenet)) == 80
    assert "itap of a {}." in imagenet
    for name in ("cifar10", "cifar100", "mnist", "fashion-mnist", "stl10"):
        templates = get_templates(name)
        assert templates and all(template.count("{}") == 1 for template in templates), name
    # A returned list is the caller's own: editing it leaves the shared set alone.
    get_templates("simple").append("oops {}")
    assert TEMPLATE_SETS["simple"] == ("a photo of a {}.",)


def test_get_templates_from_string_and_list():
    assert get_templates("a sketch of a {}.") == ["a sketch of a {}."]
    assert get_templates(["x {}", "y {c}"]) == ["x {}", "y {}"]
    with pytest.raises(ValueError, match="placeholder"):
        get_templates(["fine {}", "broken"])
    with pytest.raises(ValueError, match="openai-imagenet"):  # unknown names list the named sets
        get_templates("imagenet-openai-typo")


def test_get_templates_from_json(tmp_path):
    list_file = tmp_path / "list.json"
    list_file.write_text(json.dumps(["a {} here", "a {c} there"]))
    assert get_templates(str(list_file)) == ["a {} here", "a {} there"]

    mapping_file = tmp_path / "en_zeroshot_classification_templates.json"
    mapping_file.write_text(json.dumps({"cars": ["a photo of a {c}, a car."], "flowers": ["a {c}, a flower."]}))
    assert get_templates(f"{mapping_file}:cars") == ["a photo of a {}, a car."]
    with pytest.raises(ValueError, match=r"available: \['cars', 'flowers'\]"):
        get_templates(str(mapping_file))  # a mapping needs a dataset name
    with pytest.raises(ValueError, match=r"'pets' not found.*\['cars', 'flowers'\]"):
        get_templates(f"{mapping_file}:pets")


def test_load_classnames(tmp_path):
    path = tmp_path / "en_classnames.json"
    path.write_text(json.dumps({"cifar10": ["airplane", "automobile"], "mnist": ["0", "1"]}))
    assert load_classnames(str(path), "mnist") == ["0", "1"]
    with pytest.raises(ValueError, match=r"available datasets: \['cifar10', 'mnist'\]"):
        load_classnames(str(path), "stl10")
    with pytest.raises(FileNotFoundError):
        load_classnames(str(tmp_path / "missing.json"), "mnist")
