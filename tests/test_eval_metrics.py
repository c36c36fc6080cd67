"""The evaluation metrics on hand-made inputs whose right answers are known, and against
sentence-transformers, pycocotools and pycocoevalcap where they compute the same thing."""

import math

import numpy as np
import pytest

from osprey.eval.captioning import caption_metrics, clean_caption
from osprey.eval.openvocab import (
    Category,
    ClassMatcher,
    OpenVocabScorer,
    PanopticQuality,
    SemanticIoU,
    id2rgb,
    mask_ap,
    rgb2id,
    softmax,
)
from osprey.eval.pope import answer_is_yes, label_is_yes, pope_metrics
from osprey.eval.semantic import (
    SentenceEncoder,
    category_metrics,
    clean_answer,
    clean_category,
    semantic_iou,
)


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder()


# --------------------------------------------------------------------------------------------
# Semantic Similarity / Semantic IoU
# --------------------------------------------------------------------------------------------


def test_cleaning_follows_the_reference():
    assert clean_category("mug:handle") == "mug handle"
    assert clean_category("baseball_bat") == "baseball bat"
    assert clean_answer("The category is: dog.") == " dog "
    assert clean_answer("red, round ball.") == "red  round ball "
    # Only the text between the first and second colon survives, as in the reference.
    assert clean_answer("a: b: c") == " b"


def test_semantic_iou_is_the_word_set_iou():
    assert semantic_iou("red car", "red car") == 1.0
    assert semantic_iou("a red car", "red car") == pytest.approx(2 / 3)
    assert semantic_iou("Red  Car", "red car") == 1.0  # lower-cased, whitespace split
    assert semantic_iou("car car", "car") == 1.0  # sets, not counts
    assert semantic_iou("dog", "cat") == 0.0
    assert semantic_iou("", "") == 0.0


def test_semantic_similarity_is_the_minilm_cosine(encoder):
    from sentence_transformers import util

    answers = ["a dog.", "mug, handle", "Category: bus"]
    truths = ["dog", "mug:handle", "school_bus"]
    metrics, per_region = category_metrics(answers, truths, encoder)
    # The reference: util.cos_sim of the model's own embeddings of the cleaned texts.
    expected = []
    for a, t in zip(answers, truths, strict=True):
        ea = encoder.model.encode(clean_answer(a), convert_to_tensor=True)
        et = encoder.model.encode(clean_category(t), convert_to_tensor=True)
        expected.append(float(util.cos_sim(ea, et)[0][0]))
    assert [s for s, _ in per_region] == pytest.approx(expected, abs=1e-5)
    assert metrics["semantic_similarity"] == pytest.approx(100 * np.mean(expected), abs=1e-3)
    # mug handle / mug handle -> 1; "a dog" / "dog" -> 1/2; "bus" / "school bus" -> 1/2.
    assert [i for _, i in per_region] == pytest.approx([0.5, 1.0, 0.5])
    assert metrics["semantic_iou"] == pytest.approx(100 * 2 / 3)
    assert metrics["regions"] == 3


def test_identical_texts_score_100_and_unrelated_ones_far_less(encoder):
    same, _ = category_metrics(["traffic light"], ["traffic_light"], encoder)
    assert same["semantic_similarity"] == pytest.approx(100, abs=1e-3)
    assert same["semantic_iou"] == 100
    other, _ = category_metrics(["banana"], ["motorcycle"], encoder)
    assert other["semantic_similarity"] < 40 and other["semantic_iou"] == 0


def test_the_model_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from osprey.eval.semantic import minilm_path

    assert (np.asarray(SentenceEncoder(minilm_path()).encode(["x"])).shape) == (1, 384)


# --------------------------------------------------------------------------------------------
# METEOR / CIDEr
# --------------------------------------------------------------------------------------------


def test_cider_of_exact_captions_with_disjoint_words_is_10():
    # Every n-gram occurs in one image's references only: idf log(2) everywhere, the vectors
    # of prediction and reference are equal, no length penalty -> CIDEr-D 10 per image.
    refs = {"1": ["a man riding a horse"], "2": ["two cats sleep on the sofa"]}
    preds = {"1": "a man riding a horse", "2": "two cats sleep on the sofa"}
    scores = caption_metrics(preds, refs)
    assert scores["cider"] == pytest.approx(1000.0)
    assert scores["meteor"] > 95
    nothing = caption_metrics({"1": "zebra", "2": "umbrella"}, refs)
    assert nothing["cider"] == 0 and nothing["meteor"] == 0


def test_caption_metrics_equal_pycocoevalcap_called_directly():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = {
        "7": ["The man on the left, wearing a red shirt.", "man in red"],
        "8": ["a small dog lying on a couch"],
        "9": ["the bus behind the car"],
    }
    preds = {"7": "A man in a red shirt.", "8": "dog on the couch", "9": "a red bus"}
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in preds.items()})
    meteor, _ = Meteor().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    ours = caption_metrics(preds, refs)
    assert ours["meteor"] == pytest.approx(100 * meteor)
    assert ours["cider"] == pytest.approx(100 * cider)


def test_caption_cleaning_and_mismatched_ids():
    assert clean_caption("  Answer: a red car. ") == "a red car."
    with pytest.raises(ValueError, match="different ids"):
        caption_metrics({"1": "x"}, {"2": ["y"]})


# --------------------------------------------------------------------------------------------
# POPE
# --------------------------------------------------------------------------------------------


def test_pope_reads_answers_like_the_reference():
    assert answer_is_yes("Yes, there is a dog in the image.")
    assert not answer_is_yes("No, there is no dog.")
    assert not answer_is_yes("There is not a cat")
    assert answer_is_yes("I don't know")  # no "no" word: yes
    assert answer_is_yes("Yes. No cat though")  # only the first sentence counts
    assert not answer_is_yes("NO")
    assert label_is_yes("yes") and not label_is_yes("no")


def test_pope_metrics_on_a_known_confusion():
    # TP 2, FP 1, TN 1, FN 0.
    metrics = pope_metrics([True, True, True, False], [True, True, False, False])
    assert metrics["accuracy"] == pytest.approx(75)
    assert metrics["precision"] == pytest.approx(200 / 3)
    assert metrics["recall"] == pytest.approx(100)
    assert metrics["f1"] == pytest.approx(80)
    assert metrics["yes_ratio"] == pytest.approx(75)
    assert pope_metrics([False], [True])["precision"] == 0  # no division by zero


# --------------------------------------------------------------------------------------------
# Open-vocabulary segmentation
# --------------------------------------------------------------------------------------------


def test_rgb_ids_round_trip():
    ids = np.array([[0, 1, 256], [70000, 2 * 65536 + 5, 7]])
    assert np.array_equal(rgb2id(id2rgb(ids)), ids)


def test_panoptic_quality_of_a_perfect_and_a_partial_prediction():
    gt = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]])
    segments = [{"id": 1, "category_id": 10}, {"id": 2, "category_id": 20}]
    pq = PanopticQuality({10: False, 20: True})
    pq.add(gt, segments, gt.copy(), [dict(s) for s in segments])
    assert pq.summary()["pq"] == pytest.approx(100)

    # Partial: row 3's left half is void; segment 1's prediction loses one pixel to segment
    # 2's, which also covers the void pixels. IoU 7/8 for the first; for the second
    # 6 / (9 + 6 - 6 - 2): void pixels of a prediction count against nothing.
    gt[3, :2] = 0
    segments[1]["area"] = 6
    pred = np.array([[1, 1, 1, 1], [1, 1, 1, 3], [3, 3, 3, 3], [3, 3, 3, 3]])
    pq = PanopticQuality({10: False, 20: True})
    pq.add(gt, segments, pred, [{"id": 1, "category_id": 10}, {"id": 3, "category_id": 20}])
    out = pq.summary()
    assert out["pq_st"] == pytest.approx(100 * 7 / 8) and out["pq_th"] == pytest.approx(100 * 6 / 7)
    assert out["rq"] == pytest.approx(100) and out["sq"] == out["pq"]


def test_panoptic_quality_void_crowd_and_unmatched():
    # Left half void (0), a crowd region of class 20 (id 5), and one thing of class 20 (id 6).
    gt = np.array([[0, 0, 5, 5], [0, 0, 5, 5], [0, 0, 6, 6], [0, 0, 6, 6]])
    segments = [
        {"id": 5, "category_id": 20, "iscrowd": 1},
        {"id": 6, "category_id": 20, "iscrowd": 0},
    ]
    # A prediction of class 20 on the void pixels and the crowd is ignored; one of class 10
    # on segment 6 is a false positive and segment 6 a false negative.
    pred = np.array([[7, 7, 7, 7], [7, 7, 7, 7], [0, 0, 8, 8], [0, 0, 8, 8]])
    pq = PanopticQuality({10: True, 20: True})
    pq.add(gt, segments, pred, [{"id": 7, "category_id": 20}, {"id": 8, "category_id": 10}])
    stats = pq.stats
    assert (stats[20].tp, stats[20].fp, stats[20].fn) == (0, 0, 1)
    assert (stats[10].tp, stats[10].fp, stats[10].fn) == (0, 1, 0)
    assert pq.summary()["pq"] == 0


def test_miou_from_a_known_confusion():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, -1]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 2]])
    sem = SemanticIoU(3)
    sem.add(gt, pred)
    out = sem.summary()
    # class 0: tp 3, gt 4, pred 3 -> 3/4; class 1: tp 3, gt 3, pred 4 -> 3/4; class 2 absent
    # from the ground truth (and its one prediction is on an ignored pixel): left out.
    assert out["miou"] == pytest.approx(75)
    assert out["pixel_accuracy"] == pytest.approx(100 * 6 / 7)


def _square(x0, y0, size=4, shape=(16, 16)):
    from pycocotools import mask as mask_utils

    mask = np.zeros(shape, np.uint8)
    mask[y0 : y0 + size, x0 : x0 + size] = 1
    return mask_utils.encode(np.asfortranarray(mask))


def test_mask_ap_of_one_hit_and_one_miss_is_51_of_101():
    images = [{"id": 1, "height": 16, "width": 16}]
    gts = [
        {"image_id": 1, "category_id": 1, "segmentation": _square(0, 0)},
        {"image_id": 1, "category_id": 1, "segmentation": _square(8, 8)},
    ]
    perfect = [dict(g, score=0.9) for g in gts]
    assert mask_ap(images, gts, perfect, [1])["ap"] == pytest.approx(100)
    # A hit ranked first, then a miss: precision 1 up to recall 0.5 and recall never 1:
    # 51 of COCO's 101 recall thresholds.
    half = [
        {"image_id": 1, "category_id": 1, "segmentation": _square(0, 0), "score": 0.9},
        {"image_id": 1, "category_id": 1, "segmentation": _square(0, 10), "score": 0.8},
    ]
    assert mask_ap(images, gts, half, [1])["ap"] == pytest.approx(100 * 51 / 101)
    assert mask_ap(images, gts, [], [1])["ap"] == 0
    assert mask_ap(images, [], half, [1]) == {}


class _TableEncoder:
    """Sentences -> fixed unit vectors, so class matching is checked without a model."""

    def __init__(self, table):
        self.table = {k: np.asarray(v, np.float32) / np.linalg.norm(v) for k, v in table.items()}

    def encode(self, texts):
        return np.stack([self.table[t] for t in texts])


def test_class_matching_takes_the_best_synonym_then_a_softmax():
    encoder = _TableEncoder(
        {
            "There is a building in the scene.": [1, 0, 0],
            "There is a edifice in the scene.": [0, 1, 0],
            "There is a sky in the scene.": [0, 0, 1],
            "an edifice": [0, 1, 0],
            "blue": [0, 0.6, 0.8],
        }
    )
    matcher = ClassMatcher(
        [Category(1, "building, edifice", False), Category(2, "sky", False)], encoder
    )
    scores = matcher.scores(["an edifice", "blue"])
    assert scores == pytest.approx(np.array([[1.0, 0.0], [0.6, 0.8]]))
    probs = matcher.probabilities(["an edifice"])
    assert probs[0] == pytest.approx(softmax(np.array([1.0, 0.0])))
    assert probs[0][0] == pytest.approx(math.e / (math.e + 1))


def test_class_matching_with_minilm(encoder):
    matcher = ClassMatcher(
        [Category(1, "car", True), Category(2, "sky", False), Category(3, "person, people", True)],
        encoder,
    )
    labels = matcher.scores(["a red car", "the blue sky", "a group of people"]).argmax(axis=1)
    assert labels.tolist() == [0, 1, 2]


def test_open_vocab_scorer_end_to_end():
    categories = [Category(1, "wall", False), Category(2, "person", True), Category(3, "car", True)]
    # Two walls (stuff, ids 1 and 2), a person (3), a car (4), void (0).
    gt = np.zeros((8, 8), np.int64)
    gt[:, :2], gt[:, 2:4], gt[:4, 4:], gt[4:, 4:7] = 1, 2, 3, 4
    segments = [
        {"id": 1, "category_id": 1},
        {"id": 2, "category_id": 1},
        {"id": 3, "category_id": 2},
        {"id": 4, "category_id": 3},
    ]
    right = np.eye(3)[[0, 0, 1, 2]] * 0.9 + 0.05
    scorer = OpenVocabScorer(categories)
    scorer.add(1, gt, segments, [1, 2, 3, 4], right)
    out = scorer.summary()
    # The two walls merge into one predicted segment of IoU 1/2 with each (not > 0.5): two
    # false negatives and a false positive for "wall"; person and car are exact.
    assert out["pq_th"] == pytest.approx(100) and out["pq_st"] == 0
    assert out["pq"] == pytest.approx(200 / 3)
    assert out["miou"] == pytest.approx(100)
    assert out["ap"] == pytest.approx(100)

    # The car called a person: the person class gets a false positive, the car a miss.
    wrong = np.eye(3)[[0, 0, 1, 1]] * 0.9 + 0.05
    scorer = OpenVocabScorer(categories)
    chosen = scorer.add(1, gt, segments, [1, 2, 3, 4], wrong)
    assert chosen == [1, 1, 2, 2]
    out = scorer.summary()
    # mIoU: wall 1, person 16/(16+12) = 4/7, car 0.
    assert out["miou"] == pytest.approx(100 * (1 + 4 / 7 + 0) / 3)
    assert out["pq_th"] == pytest.approx(100 * (1 / (1 + 0.5)) / 2)
