"""The official VQA answer normalisation and VQA accuracy (the VQA challenge's evaluation code, as EvalAI runs
it), and the answer processor that LLaVA and the TextVQA evaluator (m4c / MMF's ``EvalAIAnswerProcessor``)
apply before scoring.

**Normalisation** (:func:`normalize_vqa_answer`, the official evaluation's reading of a predicted answer):

1. newlines and tabs become spaces, the ends are stripped;
2. punctuation (:func:`process_punctuation`): each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is
   deleted when the text has it next to a space, or when the text holds a digit-comma-digit ("1,000");
   otherwise it becomes a space ("left-hand" -> "left hand"). Then periods are deleted unless a digit
   follows ("3.5" stays, "yes." -> "yes"). The official period pattern reads ``(?!<=\\d)(\\.)(?!\\d)``: its
   first group was meant as a look-behind ("not after a digit") but is a look-ahead that never matters, so
   only "not before a digit" counts; the official call also passes ``re.UNICODE`` where ``re.sub`` takes its
   count, so at most 32 periods go. Both are kept: they are what the server scores with;
3. words (:func:`process_digit_article`): lower-cased and split on whitespace; number words "none", "zero"
   .. "ten" become digits; the articles "a", "an", "the" are dropped; then each word found in the
   contractions table (:data:`CONTRACTIONS`: apostrophe-less spellings such as "dont" -> "don't") is
   replaced.

**The EvalAI answer processor** (:func:`evalai_normalize`): lower-case, commas and question marks deleted,
"'s" split off as " 's", then steps 1-3. LLaVA runs every VQAv2 prediction through it before writing the
submission file, and the TextVQA evaluator runs it on the prediction and on every human answer.

**VQA accuracy** of one question with ``n`` human answers (10 in VQAv2 and TextVQA): for each of the ``n``
subsets of ``n - 1`` human answers (each human left out once), ``min(1, matches / 3)`` where ``matches``
counts the answers of the subset equal to the prediction; the accuracy is the mean over the ``n`` subsets.
So an answer given by 3 or more of 10 humans scores 1, by 2 scores 0.6, by 1 scores 0.3. Computed here in
integers (``sum(min(3, matches)) / (3 n)``), the same number, correctly rounded.

* :func:`vqa_accuracy` — the official VQA evaluation (``vqaEval.py``): the prediction is normalised
  (:func:`normalize_vqa_answer`); the human answers are compared as released, except that when they are not
  all the same they get the punctuation step (only that step: the released answers are already in normal
  form).
* :func:`textvqa_accuracy` — the TextVQA evaluator LLaVA's ``eval_textvqa`` uses (and VLMEvalKit's
  ``vqa_score``): the prediction and every human answer through :func:`evalai_normalize`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# The official table (vqaEval.py; MMF's EvalAIAnswerProcessor carries the same one): a word spelled without
# its apostrophe -> the contraction. Entries with capitals never match (words are lower-cased first) and
# "somebody'd" maps the "wrong" way round; both are as released, kept so that scores agree with the server.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as released: see the module docstring
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_COUNT = re.UNICODE  # the official call passes the flag (32) where re.sub takes its count


def process_punctuation(text: str) -> str:
    """The official punctuation step: "yes!" -> "yes", "left-hand" -> "left hand", "1,000" -> "1000"."""
    # The condition looks at the text as given, not as rewritten so far (the official order of tests).
    glued = COMMA_STRIP.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if glued or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The official word step: lower-case, number words -> digits, articles dropped, contractions restored."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """A predicted answer as the official VQA evaluation reads it: "Two." -> "2", "The Dog" -> "dog"."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def evalai_normalize(text: str) -> str:
    """The EvalAI answer processor (LLaVA's VQAv2 submission, the TextVQA evaluator): lower-case, commas and
    question marks deleted, "'s" split off, then :func:`normalize_vqa_answer`'s steps."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_vqa_answer(text)


def soft_score(prediction: str, answers: Sequence[str]) -> float:
    """``min(1, matches / 3)`` averaged over the leave-one-out subsets of ``answers`` (compared as given)."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    total = len(answers)
    same = sum(a == prediction for a in answers)
    # Leaving out a matching answer leaves same - 1 matches (same of those subsets), else same matches.
    thirds = same * min(3, same - 1) + (total - same) * min(3, same)
    return thirds / (3 * total)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQA accuracy of one prediction against the human answers (see the module docstring)."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    truth = list(answers)
    if len(set(truth)) > 1:
        truth = [process_punctuation(a) for a in truth]
    return soft_score(normalize_vqa_answer(prediction), truth)


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA's accuracy (the m4c evaluator): the prediction and the human answers through
    :func:`evalai_normalize`."""
    return soft_score(evalai_normalize(prediction), [evalai_normalize(a) for a in answers])
