import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from ncis.metrics import accuracy, aupr_in, aupr_out, auroc, average, fpr_at_tpr, ood_metrics


def test_fpr95_exact_threshold_keeps_19_of_20_id_samples():
    id_scores = np.arange(1, 21, dtype=float)  # 95% of 20 = 19 kept: threshold = 2, only the 1 is rejected
    assert fpr_at_tpr(id_scores, [1.5]) == 0.0  # between the rejected and the lowest kept ID sample
    assert fpr_at_tpr(id_scores, [2.0]) == 1.0  # tied with the threshold: accepted (conservative)
    assert fpr_at_tpr(id_scores, [0.0, 1.0, 1.99, 2.0, 2.5, 30.0]) == pytest.approx(3 / 6)


def test_fpr95_threshold_between_samples_when_95_percent_is_not_a_whole_count():
    id_scores = np.arange(1, 11, dtype=float)  # 9.5 of 10 -> 10 must be kept: threshold = 1
    assert fpr_at_tpr(id_scores, [0.5, 1.0, 5.0, 11.0]) == pytest.approx(3 / 4)
    assert fpr_at_tpr(id_scores, [0.5, 1.0, 5.0, 11.0], tpr=0.8) == pytest.approx(2 / 4)  # keep 8: threshold 3


def test_fpr95_ties_in_id_scores_accept_all_tied_samples():
    id_scores = [0.0] * 10 + [1.0] * 10
    assert fpr_at_tpr(id_scores, [0.0, 0.5, 1.0]) == pytest.approx(1.0)


def test_perfect_and_inverted_separation():
    id_scores, ood_scores = np.linspace(1, 2, 50), np.linspace(-2, -1, 30)
    perfect = ood_metrics(id_scores, ood_scores)
    assert perfect == pytest.approx({"fpr95": 0.0, "auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0})
    inverted = ood_metrics(ood_scores, id_scores)
    assert inverted["fpr95"] == 1.0 and inverted["auroc"] == 0.0
    assert inverted["aupr_in"] < 0.5 and inverted["aupr_out"] < 0.5


def test_hand_computed_small_case():
    id_scores, ood_scores = [0.9, 0.8, 0.4], [0.7, 0.3]
    # Pairs (id > ood): 0.9 and 0.8 beat both, 0.4 beats 0.3 only -> 5 of 6.
    assert auroc(id_scores, ood_scores) == pytest.approx(5 / 6)
    # ID positive, ranked 0.9(+) 0.8(+) 0.7(-) 0.4(+) 0.3(-): AP = (1 + 1 + 3/4) / 3.
    assert aupr_in(id_scores, ood_scores) == pytest.approx((1 + 1 + 0.75) / 3)
    # OOD positive, ranked 0.3(+) 0.4(-) 0.7(+) ...: AP = (1 + 2/3) / 2.
    assert aupr_out(id_scores, ood_scores) == pytest.approx((1 + 2 / 3) / 2)
    assert fpr_at_tpr(id_scores, ood_scores) == pytest.approx(1 / 2)  # all 3 ID kept: threshold 0.4


def test_agreement_with_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    id_scores, ood_scores = rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    labels = np.r_[np.ones(300), np.zeros(200)]
    scores = np.r_[id_scores, ood_scores]
    assert auroc(id_scores, ood_scores) == pytest.approx(roc_auc_score(labels, scores))
    assert aupr_in(id_scores, ood_scores) == pytest.approx(average_precision_score(labels, scores))
    assert aupr_out(id_scores, ood_scores) == pytest.approx(average_precision_score(1 - labels, -scores))
    # sklearn's ROC (accept if score >= threshold): the FPR at the first point reaching TPR 95%.
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    assert fpr_at_tpr(id_scores, ood_scores) == pytest.approx(fpr[np.argmax(tpr >= 0.95)])


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        auroc([], [1.0])
    with pytest.raises(ValueError):
        fpr_at_tpr([np.nan, 1.0], [0.0])
    with pytest.raises(ValueError):
        fpr_at_tpr([1.0], [0.0], tpr=0)


def test_average_and_accuracy():
    a = {"fpr95": 0.2, "auroc": 0.9, "aupr_in": 0.8, "aupr_out": 0.7}
    b = {"fpr95": 0.4, "auroc": 0.7, "aupr_in": 0.6, "aupr_out": 0.5}
    assert average([a, b]) == pytest.approx({"fpr95": 0.3, "auroc": 0.8, "aupr_in": 0.7, "aupr_out": 0.6})
    assert accuracy(np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), np.array([0, 1, 1])) == pytest.approx(2 / 3)
