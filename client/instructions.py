"""Is a generated instruction usable? One detector, shared by augment (which resamples or rejects
what it flags) and the backward-model evaluation (which counts it in `usable_rate`).

`instruction_issue(instruction, passage, finish_reason)` returns None for a usable instruction, or the
first of `ISSUE_KINDS` that applies, checked in this order:

- **truncated**: the generation stopped at the token cap (`finish_reason == "length"`): the end is missing.
- **empty**: no letter or digit at all (blank, or only punctuation).
- **copy**: the instruction repeats the passage instead of asking for it: it has at least
  `COPY_MIN_WORDS` words, does not end with "?", and more than half of its word 5-grams (lower-cased
  `\\w+` words) occur in the passage outside its headings (markdown `#` lines). A sentence of the
  passage, or most of one, is a copy; the passage's title, a question it asks ("How do I install
  Perl?") or a short phrase from it is not: each is a fair statement of what the passage answers.
- **meta**: an answer about the exchange instead of an instruction, in one of three forms:
  1. it opens by describing the exchange: "the/this/your/a" response, instruction, passage, text or
     user, then a verb that reports on it ("The instruction or question asks...", "The user wants...",
     "The response contains...") or a "be" that says what it is ("The instruction is: ...", "...is
     designed to", "...is incomplete"), or "this/your response" with any verb ("Your response is
     blank."). A bare "is" after "the" is not enough ("The instruction is not supported by my CPU"),
     nor is a noun ("The instruction pointer register...");
     It also counts when it opens by presenting or setting out to write the answer: "Here's a possible
     response: ...", "To answer the instruction or question, we need to...", "To provide an appropriate
     answer to the requested instruction, ...";
  2. it points at context a single-turn instruction cannot have: "the above question", "the text above"
     (but "the text below" may be the instruction's own input);
  3. it fits any passage: every word is a function word or a word about the exchange itself
     (`GENERIC_WORDS`: "How can I help you?", "What's the response?", "What is your proposed
     solution?", "Summarize the text."). One topical word ("Write a response explaining recursion")
     makes it an instruction.

The rules are lexical on purpose: they are cheap, deterministic and explainable, and they err toward
keeping an instruction (an unflagged poor one is still judged by the scorer in self-curation).
"""

from __future__ import annotations

import re

ISSUE_KINDS = ("truncated", "empty", "copy", "meta")

COPY_MIN_WORDS = 5
_N = 5  # n-gram length of the copy test: five words in a row are rarely shared by chance

# Words that say nothing about a passage: function words, and the vocabulary of a request and its
# answer. An instruction made only of these fits every passage alike.
GENERIC_WORDS = frozenset("""
a an the this that these those it its i me my mine myself you your yours yourself we us our they them
their he she him his her one s t d ll m re ve don doesn didn isn aren wasn weren won wouldn shouldn couldn
is are was were be been being am do does did doing done have has had having can could will would shall
should may might must get got let lets
what which who whom whose how why when where whether there here
of to in on for with without about as at by from into onto upon over under above below after before
between through
or and but if so then than not no nor yes either neither both each every any some all more most much many
very just also only too already still again now today well please thanks thank hi hello hey sure okay ok
ready sorry
response responses respond responded responding reply replies answer answers answered answering
instruction instructions question questions passage passages text texts prompt prompts request requests
requested query queries task tasks input output message messages content information info topic subject
solution solutions problem problems purpose user users assistant ai conversation example examples
help helps helping assist provide provides provided give gives given write writes written explain explains
describe describes summarize summarise summary ask asks asked asking tell say says said continue complete
completed generate create make want wants need needs know like see think mean means suggest recommend
propose proposed designed understand clear concise detailed brief simple correct good best way manner format thing
things something anything code work works working
""".split())

# 1. An opening that describes the exchange. Its subject: "the response", "this instruction", "your
#    response", "the original instruction", "the instruction or question", "the user's question", "a user".
_NOUN = r"(?:response|instruction|passage|text|excerpt|paragraph|user)s?"
_SUBJECT = (rf"(?:the|this|your|a|an)\s+(?:(?:original|above|previous|preceding)\s+)?{_NOUN}"
            r"(?:\s+(?:or|and)\s+(?:question|instruction|response|answer|request)s?)?(?:'s\s+\w+)?(?:\s+above)?")
# Then a verb that reports on it ("asks", "describes", "contains"), or a form of "be" that says what it
# is ("is:", "is asking", "is designed", "is to", "is incomplete"): a bare "is" is not enough, since
# "The instruction is not supported by my CPU" and "The response is slow" are real questions' openings.
_REPORTING = (r"(?:asks?|asking|asked|requires|wants|needs|provides|provided|describes|explains|discusses|presents"
              r"|outlines|covers|contains|includes|lists|summari[sz]es|answers|addresses|talks|focuses|aims|seeks"
              r"|requests|requested|instructs|tells|says|states|mentions|highlights|offers|demonstrates|refers|reads)")
_SAYS_WHAT = (r"(?:is|are|was|were|should|must|will|would)(?:\s*[:\"\u201c]|\s+(?:asking|ask|about|to|designed|as\s+follows"
              r"|incomplete|unclear|missing|blank|empty|already)\b)")
# "This response ..." and "Your response ..." point at the exchange with any verb after them.
_POINTED = (r"(?:this|your)\s+(?:response|instruction|passage|text|excerpt|paragraph)s?"
            r"\s+(?:is|are|was|were|will|would|should|must|can|has|have|does|did)\b")
# Openings that present or set out to write the answer: "Here's a possible response: ...", "To answer
# the instruction or question, we need to...", "To provide an appropriate answer to the requested
# instruction, ...". A request does not open by announcing a response to itself.
_PRESENTS = (r"(?:here(?:'s|\s+is)\s+(?:a|an|the|my|your)\s+(?:\w+\s+)?(?:response|instruction|answer)s?\b"
             r"|(?:to|in\s+order\s+to)\s+(?:answer|respond\s+to|address|(?:provide|give|write)\s+(?:a|an|the)\s+"
             r"(?:\w+\s+)?(?:answer|response)\s+to)\s+(?:the|this|your)\s+(?:\w+\s+)?"
             r"(?:instruction|question|request|query)s?\b)")
_OPENING = re.compile(rf"^(?:{_SUBJECT}\s+(?:{_REPORTING}\b|{_SAYS_WHAT})|{_POINTED}|{_PRESENTS})")
# 2. Context above the instruction, which a single-turn instruction does not have.
_DEICTIC_NOUN = r"(?:response|instruction|passage|text|excerpt|paragraph|answer|question|query|request|prompt)s?"
_DEICTIC = re.compile(rf"\b(?:the|this|that|these)\s+(?:(?:above|preceding|previous)\s+{_DEICTIC_NOUN}"
                      rf"|{_DEICTIC_NOUN}\s+above)\b")
_HEADING = re.compile(r"^\s*#{1,6}\s")


def words(text: str) -> list[str]:
    """The normalised words of `text`: lower-cased runs of `\\w` (letters, digits, underscore); how
    instructions, passages and (`client.decontaminate`) evaluation sets are compared."""
    return re.findall(r"\w+", text.lower())


def _ngrams(ws: list[str]) -> list[tuple[str, ...]]:
    return [tuple(ws[i:i + _N]) for i in range(len(ws) - _N + 1)]


def copies_passage(instruction: str, passage: str) -> bool:
    """True when `instruction` is the passage's text rather than a request for it (see the module doc)."""
    ws = words(instruction)
    if len(ws) < COPY_MIN_WORDS or instruction.rstrip().endswith("?"):
        return False
    body = "\n".join(line for line in passage.splitlines() if not _HEADING.match(line))
    seen = set(_ngrams(words(body)))
    grams = _ngrams(ws)
    return 2 * sum(g in seen for g in grams) > len(grams)


def is_meta(instruction: str) -> bool:
    """True when `instruction` talks about the exchange instead of asking for something (see the module doc)."""
    flat = " ".join(instruction.lower().replace("\u2019", "'").split())
    if _OPENING.match(flat) or _DEICTIC.search(flat):
        return True
    return all(w in GENERIC_WORDS for w in words(instruction))


def instruction_issue(instruction: str, passage: str, finish_reason: str | None) -> str | None:
    """None when `instruction` (written for `passage`, ending with `finish_reason`) is usable, else
    the kind of problem: one of `ISSUE_KINDS`, the first that applies in that order."""
    if finish_reason == "length":
        return "truncated"
    if not any(ch.isalnum() for ch in instruction):
        return "empty"
    if copies_passage(instruction, passage):
        return "copy"
    if is_meta(instruction):
        return "meta"
    return None
