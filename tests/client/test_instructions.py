"""The unusable-instruction detector on real instructions: human ones must pass, the backward model's
meta-answers and copies must not.

"Demo" examples are what the untrained SmolLM2-135M backward model wrote for the demo corpus (Perl,
Python and Debian documentation) in a run of `make demo`; the issue's examples come from a corpus of
speeches; the human instructions are the demo's seed and held-out FAQ questions and the kind of
instruction the paper's seed data (Open Assistant) holds.
"""

from __future__ import annotations

import pytest

from client.instructions import ISSUE_KINDS, instruction_issue

PASSAGE = ("Git rebase moves a branch onto another base commit. It rewrites history by replaying each commit "
           "of the branch, one by one, on top of the new base.")

HUMAN = [
    # The demo's seed and held-out questions (perlfaq, the Python FAQ, the Debian FAQ).
    "How do I find which modules are installed on my system?",
    "When I tried to run my script, I got this message. What does it mean?",
    "I have several machines; how can I download the updates only one time?",
    "What are all these $@%&* punctuation signs, and how do I know when to use them?",
    "What's an extension?",
    'What about "sid"?',
    "Is there a way to automatically decode or encode?",
    "How do I skip some return values?",
    "What is the difference between arguments and parameters?",
    "Why must 'self' be used explicitly in method definitions and calls?",
    "__import__('x.y.z') returns <module 'x'>; how do I get z?",
    "I installed Knoppix/Linux Mint Debian Edition/Ubuntu/... on my hard disk. Now I have a problem. What should "
    "I do?",
    "What is meant by saying that a package Depends, Recommends, Suggests, Conflicts, Replaces, Breaks or Provides "
    "another package?",
    "How can I check that I am using a Debian system, and what version it is?",
    # The brief's own: words of the exchange inside a real request.
    "Write a response explaining photosynthesis.",
    "Explain how git rebase works",
    "What does the instruction pointer register do?",
    # Open Assistant style requests.
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Summarize this article about climate change.",
    "Write a poem about autumn.",
    "Tell me a joke.",
    "Can you help me with my homework?",
    "Hi! Can you recommend a good book on Rust?",
    "I want to learn Spanish. Where should I start?",
    "What is 2+2?",
    "Recursion?",
    "Generate a list of five questions about the French Revolution.",
    "Create a user story for a login page.",
    "Write a user manual for a toaster.",
    # Technical questions whose words look like the exchange's.
    "The instruction is not supported by my CPU. What can I do?",
    "The response is slow when I query the API; why?",
    "The text is too small on my screen, how do I make it bigger?",
    "The user can't log in after I changed the password. What's wrong?",
    "My prompt is not showing in bash. How do I fix it?",
    "How do I parse the response of an HTTP request in Python?",
    "Convert the text to uppercase in Python.",
    "What are the instruction sets of x86 and ARM?",
    "This text editor keeps crashing, what should I do?",
    "Describe the passage of time in Proust.",
    "How do I write a good answer on Stack Overflow?",
    # An instruction that carries its own input below it.
    "Summarize the text below:\n\nThe cat sat on the mat all afternoon.",
    "Translate the following sentence into French: I like apples.",
    # Openings close to the ones that present an answer.
    "Here is my code; why does it crash when the list is empty?",
    "Here's a question about Perl: how do I sort a hash by value?",
    "To answer a survey, what is the best way to sample people?",
]


@pytest.mark.parametrize("instruction", HUMAN)
def test_human_instructions_are_usable(instruction: str) -> None:
    assert instruction_issue(instruction, PASSAGE, "stop") is None


META = [
    # The issue: the untrained backward model on speeches, then after a few training steps.
    "This response is designed to provide an answer to the instruction.",
    "The instruction or question is to respond with the requested response in a clear and concise manner.",
    "How can I help you?",
    "What's the response?",
    "What\u2019s the response?",
    "What is your proposed solution?",
    # The demo run.
    "You've completed the solution.\n\nThe code works.",
    "What is the instruction?",
    "You've already answered the instruction with a question.",
    "I'll respond as requested.",
    "What is the purpose of the instruction?",
    "Your response is incomplete. You need to provide the instructions or question it answers.",
    "The instruction or question asks for a list of command-line arguments to debuggers.",
    "The instruction is:\n\nWhat is the SV created by `#include <iostream>`?",
    "The original instruction asks you to write a function to test whether a scalar is an integer, double, or "
    "string.",
    'The instruction is "Provide the result of the subroutine\'s return in a scalar context."',
    "The instruction should ask the user to replace `my_priv_data_t *` with the actual memory location.",
    "The instruction is asking to perform a specific operation that involves multiple code points.",
    "A user provided a question about the Perl feature of `SvIOK_on`. To answer this question, I'll provide a "
    "response to the user's request.",
    "Please respond to the question.",
    "Your response is blank.",
    "What is the response's purpose?",
    "Your response is already formatted.",
    "The response contains the requested information. Please provide a response to the above question.",
    "I'm ready to help. How can I help you?",
    "The instruction or question is: What is the difference between a Perl interpreter and a shell?",
    "To help with the above query, I'll re-answer with the requested instruction.",
    "The instruction is incomplete. Please specify what the instruction is for and what the question is asking.",
    "The above response contains multiple explanations of the same answer.",
    # bench/bench_quality.py: the untrained backward model on the demo's held-out responses.
    "Here's a possible response with the instruction:\n\nTo answer the question, I'll provide a possible response.",
    "To provide an appropriate answer to the requested instruction, please provide the requested answer:\n",
    "To answer the instruction or question, we need to provide a response that meets the following criteria.",
    "Here is the answer: use File::Copy.",
    # Descriptions of the passage, and requests that fit any passage.
    "The passage describes the history of the Roman Empire.",
    "This response explains how to install Python.",
    "The user is asking about git rebase.",
    "The user wants to know how to rebase a branch.",
    "The text above is about cooking.",
    "Summarize the text above.",
    "Rewrite the paragraph above in plain English for a child.",
    "Translate the above passage into German.",
    "Write the instruction or question it answers.",
    "What is the answer to the question?",
    "What does the passage say?",
    "How do I do this?",
    "Can you give me more information?",
    "I'm sorry, I don't understand the question.",
    "Explain.",
    "Response:",
]


@pytest.mark.parametrize("instruction", META)
def test_meta_answers_are_flagged(instruction: str) -> None:
    assert instruction_issue(instruction, PASSAGE, "stop") == "meta"


# From the demo run: the instruction is the passage's next entry, or its sentences lightly reworded.
PERL_PROTO = ("This symbol encodes the prototype of `setnetent_r`. It is zero if `d_setnetent_r` is undef, and one "
              "of the `REENTRANT_PROTO_T_ABC` macros of reentr.h if `d_setnetent_r` is defined.\n\n"
              "- `SETPROTOENT_R_PROTO`\n\nThis symbol encodes the prototype of `setprotoent_r`. It is zero if "
              "`d_setprotoent_r` is undef, and one of the `REENTRANT_PROTO_T_ABC` macros of reentr.h if "
              "`d_setprotoent_r` is defined.")
PERL_PACKAGE = ("## The PACKAGE Keyword\n\nWhen functions within an XS source file must be separated into packages "
                "the PACKAGE keyword should be used. This keyword is used with the MODULE keyword and must follow "
                "immediately after it when used.\n\n    MODULE = RPC  PACKAGE = RPC\n\nThe same package name can be "
                "used more than once, allowing for non-contiguous code. This is useful if you have a stronger "
                "ordering principle than package names.")


@pytest.mark.parametrize(("instruction", "passage"), [
    ("This symbol encodes the prototype of `setprotoent_r`. It is zero if `d_setprotoent_r` is undef, and one of "
     "the `REENTRANT_PROTO_T_ABC` macros of reentr.h if `d_setprotoent_r` is defined.", PERL_PROTO),
    ("The PACKAGE keyword is used with the MODULE keyword and must follow immediately after it when used.\n\n"
     "The package name can be used more than once, allowing for non-contiguous code.", PERL_PACKAGE),
    ("Git rebase moves a branch onto another base commit.", PASSAGE),  # the first sentence
    ("git rebase MOVES a branch onto another base", PASSAGE),  # a prefix, case and punctuation aside
    ("It rewrites history by replaying each commit of the branch, one by one, on top of the new base, and then "
     "it stops.", PASSAGE),  # mostly a sentence of it
])
def test_copies_of_the_passage_are_flagged(instruction: str, passage: str) -> None:
    assert instruction_issue(instruction, passage, "stop") == "copy"


@pytest.mark.parametrize(("instruction", "passage"), [
    ("The PACKAGE Keyword", PERL_PACKAGE),  # its title
    ("What is the PACKAGE keyword used for in an XS file?", PERL_PACKAGE),
    ("Git rebase moves a branch onto another base commit?", PASSAGE),  # a question is never a copy
    ("Rewrites history", PASSAGE),  # under five words
    ("Why does rebasing a branch onto another base commit rewrite history?", PASSAGE),
    ("Explain what it means that git rebase moves a branch onto another base and why one would do it.", PASSAGE),
])
def test_close_to_the_passage_is_not_a_copy(instruction: str, passage: str) -> None:
    assert instruction_issue(instruction, passage, "stop") is None


def test_a_heading_of_the_passage_is_not_copied_text() -> None:
    passage = "## Install Perl on Windows with Strawberry Perl\n\nDownload the installer and run it."
    assert instruction_issue("Install Perl on Windows with Strawberry Perl", passage, "stop") is None
    assert instruction_issue("Install Perl on Windows with Strawberry Perl", passage.replace("## ", ""),
                             "stop") == "copy"


@pytest.mark.parametrize(("instruction", "finish", "kind"), [
    ("What is the meaning of", "length", "truncated"),
    ("", "length", "truncated"),  # truncation is checked first
    ("This response is designed to", "length", "truncated"),
    ("", "stop", "empty"),
    ("   \n\t", "stop", "empty"),
    ("...?!", "stop", "empty"),
    ("\u2014 \u00bf?", None, "empty"),
    ("Git rebase moves a branch onto another base commit.", None, "copy"),
    ("What does git rebase do?", None, None),  # no finish reason given is a finished answer
])
def test_truncated_and_empty_and_the_order_of_the_kinds(instruction: str, finish: str | None,
                                                        kind: str | None) -> None:
    assert instruction_issue(instruction, PASSAGE, finish) == kind


def test_a_copy_that_is_also_meta_is_reported_as_a_copy() -> None:
    passage = "The response contains the requested information about rebasing, as described below."
    assert instruction_issue("The response contains the requested information about rebasing.", passage,
                             "stop") == "copy"


def test_the_kinds() -> None:
    assert ISSUE_KINDS == ("truncated", "empty", "copy", "meta")
