"""Exact match and MME-style scoring on hand-made predictions."""

import json

import pytest

from vlmexport.evaluation import Prediction, normalize, score, yes_no


def P(cat, ans, pred, kind="open", pair=None, img="i"):
    return Prediction(img, cat, "q", ans, pred, kind, pair)


def test_normalize_and_yes_no_parser():
    assert normalize("  Red. ") == "red"
    assert normalize("top   left") == "top left"
    assert yes_no("Yes, there is.") == "yes" and yes_no("no") == "no" and yes_no("maybe") == "other"


def test_exact_match_per_category_and_overall():
    preds = [P("colour", "red", "red"), P("colour", "red", "blue"), P("count", "3", "3"), P("count", "4", "4 ")]
    r = score(preds)
    assert r.per_category["colour"]["accuracy"] == 0.5
    assert r.per_category["count"]["accuracy"] == 1.0
    assert r.overall == pytest.approx(0.75) and r.n == 4
    assert r.mme == {} and r.mme_score == 0


def test_mme_acc_and_acc_plus():
    preds = [
        # image a: both right
        P("existence", "yes", "yes", "yesno", "a"), P("existence", "no", "no", "yesno", "a"),
        # image b: one right
        P("existence", "yes", "yes", "yesno", "b"), P("existence", "no", "yes", "yesno", "b"),
        # image c: both wrong ("other" is wrong)
        P("existence", "yes", "no", "yesno", "c"), P("existence", "no", "perhaps", "yesno", "c"),
    ]
    r = score(preds)
    m = r.mme["existence"]
    assert m["acc"] == pytest.approx(3 / 6)
    assert m["acc_plus"] == pytest.approx(1 / 3)
    assert m["score"] == pytest.approx((3 / 6 + 1 / 3) * 100)
    assert r.mme_score == pytest.approx(m["score"])


def test_mme_score_sums_categories_and_report_serialises():
    preds = [P("existence", "yes", "yes", "yesno", "a"), P("existence", "no", "no", "yesno", "a"),
             P("count", "yes", "yes", "yesno", "b"), P("count", "no", "yes", "yesno", "b")]
    r = score(preds, meta={"backend": "torch"})
    assert r.mme_score == pytest.approx(200 + (50 + 0))
    d = json.loads(r.to_json())
    assert d["meta"]["backend"] == "torch" and len(d["predictions"]) == 4
    assert "overall" in r.table() and "MME total" in r.table()
