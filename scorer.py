"""VQA scoring as the Med-MoE authors score it, reproduced exactly, plus a true exact match and BLEU-1.

The reference is Med-MoE's run_eval.py, which calls LLaVA-Med's eval_metrics (glossary.normalize_word,
evaluate_metrics.calculate_f1score) and nltk's sentence_bleu:

    normalize_word   VQA-eval text normalisation (glossary.normalize_word), quirks included
    closed_correct   closed (yes/no) accuracy: a raw substring test, no normalisation
    f1_score         unigram F1 / precision / recall of normalised words; the open "recall" is the paper's headline
    exact_match      normalised strings equal (not the authors' "Exact Match Score", see exact_match)
    bleu1            sentence_bleu(weights=(1, 0, 0, 0), smoothing method1), computed directly
    score            per-group (closed, open, all) means x100
    format_table     those means as an aligned plain-text table

Every quirk below is kept on purpose: the point is numbers comparable with the published tables.
"""

import math
import re
from collections import Counter

# ----------------------------------------------------------------------------- normalisation tables

# glossary.punct, in its order (the order matters: replacements accumulate on the working string)
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# `(?!<=\d)` is a typo for the lookbehind `(?<!\d)`: as written it is a lookahead that can never fail
# (the next character is the period itself), so "3.x" loses its period too. Kept for parity.
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The reference calls period_strip.sub("", s, re.UNICODE): the flag lands in the `count` slot, so at most
# re.UNICODE == 32 periods are removed per string.
PERIOD_MAX = int(re.UNICODE)
MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = {"a", "an", "the"}
# The official VQA evaluation table (vqaEval.py), 120 entries, applied after lower-casing. Two quirks are kept
# deliberately for score parity: "Id've", "I'dve", "Im", "Ive" are capitalised so they can never match, and
# "somebody'd" maps to "somebodyd" (inverted). Note "let's" and "she's" map to themselves: "lets", "shes" stay.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip


def normalize_word(text):
    """glossary.normalize_word: punctuation, periods, lower-case, number words, articles, contractions."""
    out = text
    strip_all = DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        # Delete-or-space is decided on the ORIGINAL text, the replacement applies to the working one;
        # one digit-comma-digit anywhere ("1,000") deletes every listed character, not just the comma.
        delete = strip_all or p + " " in text or " " + p in text
        out = out.replace(p, "" if delete else " ")
    out = PERIOD.sub("", out, count=PERIOD_MAX)
    words = [MANUAL_MAP.get(w, w) for w in out.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    # The reference ends by deleting commas; step one has already removed every one, so this never changes
    # the result. It stays so the function reads as the reference's seven steps.
    return " ".join(words).replace(",", "")


# ----------------------------------------------------------------------------- per-item metrics


def closed_correct(pred, gt):
    """Med-MoE's yes/no accuracy: the lower-cased answer occurs anywhere in the lower-cased prediction.
    No normalisation and no word boundaries, so gt "no" counts as correct inside "not" or "nodule"."""
    return gt.lower() in pred.lower()


def _unigrams(text):
    """utils.split_sentence(text, 1): word counts of the lower-cased, whitespace-split text."""
    return Counter(text.lower().strip().split())


def f1_score(candidate, reference):
    """evaluate_metrics.calculate_f1score -> (f1, precision, recall) over normalised unigrams."""
    cand, ref = _unigrams(normalize_word(candidate)), _unigrams(normalize_word(reference))
    if not cand or not ref:
        return 0.0, 0.0, 0.0
    # A shared word adds the CANDIDATE's count to tp (not min of the two counts), so repeating a right
    # word raises precision and recall; a word the reference repeats costs nothing if the candidate has it.
    tp = sum(n for w, n in cand.items() if w in ref)
    fp = sum(n for w, n in cand.items() if w not in ref)
    fn = sum(n for w, n in ref.items() if w not in cand)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def exact_match(pred, gt):
    """True when both normalise to the same string.

    The authors' "Exact Match Score" (calculate_exactmatch) is instead (distinct reference words found in the
    candidate) / (candidate word count): "left" scores 1.0 against "left lung". That is a precision, not an
    exact match, so we report the real thing under this name."""
    return normalize_word(pred) == normalize_word(gt)


def bleu1(pred, gt):
    """nltk sentence_bleu([gt.lower().split()], pred.lower().split(), weights=(1, 0, 0, 0), smoothing method1).

    With all weight on unigrams that is the clipped unigram precision times the brevity penalty; nltk returns 0
    when no unigram matches (which covers an empty prediction). Raw split, no normalize_word, as in run_eval.py."""
    hyp, ref = pred.lower().split(), Counter(gt.lower().split())
    matches = sum(min(n, ref[w]) for w, n in Counter(hyp).items())
    if matches == 0:
        return 0.0
    c, r = len(hyp), ref.total()
    brevity = 1.0 if c > r else math.exp(1 - r / c)
    return brevity * matches / c


# ----------------------------------------------------------------------------- aggregation

# run_eval.py accepts "open"/"OPEN" and "close"/"CLOSED"; we read the type case-insensitively and also accept
# "closed". Any other type is skipped, as there.
ANSWER_TYPES = {"open": "open", "close": "closed", "closed": "closed"}
HEADLINES = {"closed": "accuracy", "open": "recall", "all": None}
METRICS = ("exact_match", "f1", "bleu1")


def _item(pred, gt, group):
    f1, _, recall = f1_score(pred, gt)
    row = {"exact_match": exact_match(pred, gt), "f1": f1, "bleu1": bleu1(pred, gt)}
    row[HEADLINES[group]] = closed_correct(pred, gt) if group == "closed" else recall
    return row


def _means(rows, keys):
    n = len(rows)
    return {"n": n} | {k: 100 * sum(row[k] for row in rows) / n if n else None for k in keys}


def score(items):
    """(prediction, ground_truth, answer_type) items -> {"closed"|"open"|"all": {"n": .., metric: mean x100}}.
    closed reports accuracy, open reports recall, every group exact_match, f1 and bleu1; None when a group is empty."""
    rows = {group: [] for group in HEADLINES}
    for pred, gt, answer_type in items:
        group = ANSWER_TYPES.get(str(answer_type).lower())
        if group is None:
            continue
        row = _item(pred, gt, group)
        rows[group].append(row)
        rows["all"].append(row)
    return {group: _means(rows[group], ([headline] if headline else []) + list(METRICS)) for group, headline in HEADLINES.items()}


def _fmt(value):
    return "-" if value is None else f"{value:.2f}"


def format_table(scores):
    """score()'s result as a plain-text table: one row per group, numbers with 2 decimals, "-" for empty groups."""
    lines = [["group", "n", "headline", "exact match", "F1", "BLEU-1"]]
    for group, headline in HEADLINES.items():
        s = scores[group]
        lines.append([group, str(s["n"]), f"{headline} {_fmt(s[headline])}" if headline else "", *(_fmt(s[k]) for k in METRICS)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    # names left-aligned (group, headline), numbers right-aligned
    return "\n".join(
        "  ".join(cell.ljust(w) if i in (0, 2) else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))) for line in lines
    )
