"""scorer.py: every normalisation rule, the authors' F1/recall and closed accuracy, exact match, BLEU-1, score(), format_table().
Expected values are worked out by hand in the comments; they are the oracle."""

import math

import pytest

from medmoe import scorer
from medmoe.scorer import bleu1, closed_correct, exact_match, f1_score, format_table, normalize_word, score

# written out again rather than imported, so a character missing from scorer.PUNCTUATION fails here
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]

# ----------------------------------------------------------------------------- normalize_word


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes.", "yes"),  # final period deleted, lower-cased
        ("The left lung", "left lung"),  # article dropped
        ("two lesions, 3.5 cm", "2 lesions 3.5 cm"),  # ", " deletes the comma; "3.5" keeps its period; two -> 2
        ("right-sided", "right sided"),  # "-" has no space next to it: replaced by a space
    ],
)
def test_normalize_known_outputs(text, expected):
    assert normalize_word(text) == expected


# x{p}y: no space next to p, no digit-comma-digit -> p becomes a space.
# x{p} y{p}z: the original holds p+" ", so EVERY p is deleted, including the one inside "y?z".
# x {p}y z{p}w: the original holds " "+p -> every p deleted.
# 1,2 y{p}z: "1,2" anywhere deletes all 21 characters, not only the comma.
PUNCTUATION_CASES = [("x{p}y", "x y"), ("x{p} y{p}z", "x yz"), ("x {p}y z{p}w", "x y zw"), ("1,2 y{p}z", "12 yz")]


@pytest.mark.parametrize("p", PUNCTUATION)
@pytest.mark.parametrize("text, expected", PUNCTUATION_CASES)
def test_punctuation_rules(p, text, expected):
    assert normalize_word(text.format(p=p)) == expected


def test_digit_comma_digit_examples():
    # "3,000 cases-x (right)": digit-comma-digit -> ",", "-", "(", ")" all deleted -> "3000 casesx right"
    assert normalize_word("3,000 cases-x (right)") == "3000 casesx right"
    # "1, 2" is no digit-comma-digit, but ", " deletes the comma -> "1 2"; "x,y 3": comma -> space -> "x y 3"
    assert normalize_word("1, 2") == "1 2"
    assert normalize_word("x,y 3") == "x y 3"


def test_punctuation_decision_reads_original_but_replacements_accumulate():
    # "x;-y z-w": ";" -> space gives "x -y z-w". The ORIGINAL has no " -" or "- ", so "-" -> space too:
    # "x  y z w" -> "x y z w". Deciding on the working string would see " -" and give "x y zw".
    assert normalize_word("x;-y z-w") == "x y z w"


def test_characters_outside_the_list_are_kept():
    # ' % : * # & are not in the list (and no period here)
    assert normalize_word("it's 50% 3:1 x*y #2 r&d") == "it's 50% 3:1 x*y #2 r&d"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("5.", "5"),  # not followed by a digit: deleted
        (".5", ".5"),  # followed by a digit: kept
        ("e.g. 1.5mm.", "eg 1.5mm"),  # both periods of "e.g." and the final one go, "1.5" stays
        ("x..5", "x.5"),  # first "." is followed by "." (deleted), second by "5" (kept)
        ("3.x", "3x"),  # the typo'd `(?!<=\d)` is no lookbehind: a period after a digit goes too
    ],
)
def test_periods(text, expected):
    assert normalize_word(text) == expected


def test_period_removal_stops_after_32():
    # re.UNICODE (32) lands in sub()'s count: 32 periods go, the rest stay
    assert normalize_word("x" + "." * 32) == "x"
    assert normalize_word("x" + "." * 40) == "x" + "." * 8
    # 33 words "w.": the first 32 lose their period, the 33rd keeps it
    assert normalize_word(" ".join(["w."] * 33)) == " ".join(["w"] * 32 + ["w."])


def test_articles():
    # a, an, the (any case, whole words only) are dropped
    assert normalize_word("A cyst in the An lung") == "cyst in lung"
    assert normalize_word("another theory") == "another theory"
    assert normalize_word("the") == ""


@pytest.mark.parametrize(
    "word, expected",
    [("none", "0"), ("zero", "0"), ("one", "1"), ("two", "2"), ("three", "3"), ("four", "4"), ("five", "5"), ("six", "6"),
     ("seven", "7"), ("eight", "8"), ("nine", "9"), ("ten", "10"), ("Ten", "10"), ("eleven", "eleven"), ("twenty", "twenty")],
)  # fmt: skip
def test_number_words(word, expected):
    assert normalize_word(word) == expected


@pytest.mark.parametrize(
    "word, expected",
    [
        ("dont", "don't"),
        ("Doesnt", "doesn't"),  # lower-cased before the look-up
        ("whats", "what's"),
        ("youre", "you're"),
        ("oclock", "o'clock"),
        ("twas", "'twas"),
        ("couldnt've", "couldn't've"),  # "'" is not punctuation, so half-apostrophised keys can match
        ("'ows'at", "'ow's'at"),
        ("lets", "lets"),  # the VQA table maps "let's" to itself and has no "lets" key
        ("shes", "shes"),  # likewise "she's"
        # the capitalised keys never match after lower-casing
        ("Im", "im"),
        ("Ive", "ive"),
        ("Id've", "id've"),
        ("I'dve", "i'dve"),
        ("somebody'd", "somebodyd"),  # the inverted entry
        ("somebodyd've", "somebody'd've"),
    ],
)
def test_contractions(word, expected):
    assert normalize_word(word) == expected


def test_contraction_table_is_the_vqa_one():
    assert len(scorer.CONTRACTIONS) == 120
    assert {"Id've", "I'dve", "Im", "Ive"} <= set(scorer.CONTRACTIONS)
    assert scorer.CONTRACTIONS["somebody'd"] == "somebodyd"


def test_all_steps_together():
    # "The two lesions didnt grow; ok?": "; " and no " ?"/"? " -> ";" deleted, "?" -> space;
    # lower, split, two -> 2, "the" dropped, didnt -> didn't
    assert normalize_word("The two lesions didnt grow; ok?") == "2 lesions didn't grow ok"


def test_no_comma_survives():
    # digit-comma-digit ("1,2") deletes every comma: "x , y,z 1,2" -> "x  yz 12" -> "x yz 12".
    # (The final comma removal of the reference can never fire on its own: step one removed them all.)
    assert normalize_word("x , y,z 1,2") == "x yz 12"
    assert normalize_word("yes, no") == "yes no"


# ----------------------------------------------------------------------------- closed accuracy


@pytest.mark.parametrize(
    "pred, gt, expected",
    [
        ("Yes, there is.", "yes", True),
        ("no", "No", True),
        ("yes", "no", False),
        ("not sure", "no", True),  # "no" inside "not": counted correct, as in the reference
        ("There is a nodule", "no", True),
        ("Yes.", "yes", True),
        ("yes", "Yes.", False),  # no normalisation: "yes." is not in "yes"
    ],
)
def test_closed_correct(pred, gt, expected):
    assert closed_correct(pred, gt) is expected


# ----------------------------------------------------------------------------- F1 / precision / recall


@pytest.mark.parametrize(
    "cand, ref, expected",
    [
        ("left lung", "left lung", (1.0, 1.0, 1.0)),
        ("The Left lung.", "left lung", (1.0, 1.0, 1.0)),  # both normalised first
        # tp = left + lung = 2, fp = upper = 1, fn = 0: p = 2/3, r = 1, f1 = 2 * 2/3 / (5/3) = 4/5
        ("left upper lung", "left lung", (0.8, 2 / 3, 1.0)),
        # tp = 1, fp = 0, fn = lower + lobe = 2: p = 1, r = 1/3, f1 = 2 * 1/3 / (4/3) = 1/2
        ("left", "left lower lobe", (0.5, 1.0, 1 / 3)),
        # candidate's count: tp = 2 ("left" twice), fp = 0, fn = 0 -> all 1
        ("left left", "left", (1.0, 1.0, 1.0)),
        # tp = 2 (left x2 in the candidate), fp = lung = 1, fn = right = 1: p = r = f1 = 2/3 (min-count would give 1/2)
        ("left left lung", "left right", (2 / 3, 2 / 3, 2 / 3)),
        # the reference's repeat costs nothing: tp = 1, fn = 0 -> r = 1 (a bag-of-words recall would be 1/2)
        ("left", "left left", (1.0, 1.0, 1.0)),
        ("right", "left", (0.0, 0.0, 0.0)),  # tp = 0
        ("", "left", (0.0, 0.0, 0.0)),  # empty candidate
        ("left", "", (0.0, 0.0, 0.0)),  # empty reference
        ("the", "the", (0.0, 0.0, 0.0)),  # both normalise to nothing
    ],
)
def test_f1_score(cand, ref, expected):
    assert f1_score(cand, ref) == pytest.approx(expected)


# ----------------------------------------------------------------------------- exact match


@pytest.mark.parametrize(
    "pred, gt, expected",
    [
        ("The left lung.", "left lung", True),
        ("Two", "2", True),
        ("left lung", "left", False),  # the authors' "Exact Match Score" would give 1/2 here
        ("left", "left lung", False),  # ... and 1.0 here
        ("lung left", "left lung", False),  # order matters
        ("", "", True),
    ],
)
def test_exact_match(pred, gt, expected):
    assert exact_match(pred, gt) is expected


# ----------------------------------------------------------------------------- BLEU-1


@pytest.mark.parametrize(
    "pred, gt, expected",
    [
        ("left lung", "left lung", 1.0),  # p = 1, c == r -> BP = exp(0) = 1
        ("Left Lung", "left lung", 1.0),  # lower-cased
        ("left lung", "the left lung", math.exp(-0.5)),  # p = 2/2, c = 2 < r = 3 -> BP = exp(1 - 3/2)
        ("the", "the left lung", math.exp(-2)),  # p = 1/1, BP = exp(1 - 3/1)
        ("left left", "left", 0.5),  # clipped: min(2, 1) / 2, c = 2 > r = 1 -> BP = 1
        ("left upper lung lobe", "left lung", 0.5),  # 2 of 4 match, c > r
        ("left lung.", "left lung", 0.5),  # no normalisation: "lung." != "lung" -> 1/2, BP = 1
        ("right", "left", 0.0),  # no unigram match
        ("", "left", 0.0),  # empty hypothesis
        ("left", "", 0.0),  # empty reference: nothing can match
    ],
)
def test_bleu1(pred, gt, expected):
    assert bleu1(pred, gt) == pytest.approx(expected, abs=1e-12)


def test_bleu1_matches_nltk():
    bleu = pytest.importorskip("nltk.translate.bleu_score")
    cases = [
        ("left lung", "left lung"), ("left lung", "the left lung"), ("left left", "left"), ("", "left"), ("right", "left"),
        ("the left lung", "left lung"), ("Yes", "yes"), ("yes, it is.", "yes"), ("no", "yes"), ("2 lesions", "two lesions"),
        ("left lower lobe of the lung", "left lower lobe"), ("lobe lobe lobe", "lobe lower lobe"), ("ct", "ct scan of chest"),
        ("mri of the brain", "brain mri"), ("a b c d e f", "f e d c b a"), ("x", "x x x x"), ("x y", ""),
        ("the the the", "the cat"), ("axial plane", "Axial Plane"), ("liver", "the liver"),
    ]  # fmt: skip
    smooth = bleu.SmoothingFunction().method1
    for pred, gt in cases:
        ref = bleu.sentence_bleu([gt.lower().split()], pred.lower().split(), weights=(1, 0, 0, 0), smoothing_function=smooth)
        assert bleu1(pred, gt) == pytest.approx(ref, abs=1e-12), (pred, gt)


# ----------------------------------------------------------------------------- score / format_table

ITEMS = [
    # closed: accuracy, exact match, f1, bleu1
    ("Yes, it is.", "yes", "CLOSED"),  # "yes" in "yes, it is." -> 1; "yes it is" != "yes"; f1: tp 1 fp 2 -> p 1/3 r 1 f1 1/2;
    #                                    bleu1: "yes," != "yes" -> 0
    ("no", "yes", "close"),  # 0, False, 0, 0
    ("Not seen", "no", "closed"),  # "no" in "not seen" -> 1; False; f1 0; bleu1 0
    # open: recall, exact match, f1, bleu1
    ("left lung", "the left lung", "Open"),  # r 1; True; f1 1; bleu1 exp(-1/2)
    ("left", "left lower lobe", "open"),  # r 1/3; False; f1 1/2; bleu1 exp(-2)
    ("x", "x", "other"),  # unknown type: skipped everywhere
]


def test_score_groups():
    s = score(ITEMS)
    # closed: accuracy (1 + 0 + 1) / 3, exact 0, f1 (1/2 + 0 + 0) / 3, bleu1 0
    assert s["closed"] == pytest.approx({"n": 3, "accuracy": 200 / 3, "exact_match": 0.0, "f1": 50 / 3, "bleu1": 0.0})
    # open: recall (1 + 1/3) / 2, exact 1/2, f1 (1 + 1/2) / 2, bleu1 (exp(-1/2) + exp(-2)) / 2
    e = math.exp(-0.5) + math.exp(-2)
    assert s["open"] == pytest.approx({"n": 2, "recall": 200 / 3, "exact_match": 50.0, "f1": 75.0, "bleu1": 50 * e})
    # all five: exact 1/5, f1 (1/2 + 0 + 0 + 1 + 1/2) / 5 = 2/5, bleu1 e / 5
    assert s["all"] == pytest.approx({"n": 5, "exact_match": 20.0, "f1": 40.0, "bleu1": 20 * e})


def test_score_empty_groups():
    s = score([])
    assert s == {
        "closed": {"n": 0, "accuracy": None, "exact_match": None, "f1": None, "bleu1": None},
        "open": {"n": 0, "recall": None, "exact_match": None, "f1": None, "bleu1": None},
        "all": {"n": 0, "exact_match": None, "f1": None, "bleu1": None},
    }
    # only a closed item: open stays empty, all equals closed
    s = score([("yes", "yes", "CLOSED")])
    assert s["open"]["n"] == 0 and s["open"]["recall"] is None
    assert s["closed"] == {"n": 1, "accuracy": 100.0, "exact_match": 100.0, "f1": 100.0, "bleu1": 100.0}
    assert s["all"] == {"n": 1, "exact_match": 100.0, "f1": 100.0, "bleu1": 100.0}


def test_format_table():
    table = format_table(score(ITEMS))
    # (exp(-1/2) + exp(-2)) / 2 = (0.60653 + 0.13534) / 2 = 0.37093; / 5 * 2 = 0.14837
    assert [line.split() for line in table.splitlines()] == [
        ["group", "n", "headline", "exact", "match", "F1", "BLEU-1"],
        ["closed", "3", "accuracy", "66.67", "0.00", "16.67", "0.00"],
        ["open", "2", "recall", "66.67", "50.00", "75.00", "37.09"],
        ["all", "5", "20.00", "40.00", "14.84"],
    ]
    assert len({len(line) for line in table.splitlines()}) == 1  # aligned: numbers right-justified to common widths


def test_format_table_empty():
    lines = format_table(score([])).splitlines()
    assert [line.split() for line in lines[1:]] == [["closed", "0", "accuracy", "-", "-", "-", "-"],
                                                    ["open", "0", "recall", "-", "-", "-", "-"],
                                                    ["all", "0", "-", "-", "-"]]  # fmt: skip
