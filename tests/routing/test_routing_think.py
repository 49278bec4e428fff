"""Removing reasoning blocks: leading, unclosed, headless, variants, code left alone, streaming."""

from __future__ import annotations

import pytest

from imrelay.routing.think import strip_think

F = "```"


@pytest.mark.parametrize(
    ("answer", "visible"),
    [
        ("<think>let me see</think>\n\nThe answer is 4.", "The answer is 4."),
        ("  <think>a</think><think>b</think>  ok", "ok"),  # several leading blocks
        ("<THINK>shout</THINK>quiet", "quiet"),
        ("<thinking>hmm</thinking>yes", "yes"),
        ("<thought>x</thought>yes", "yes"),
        ("<reasoning>x</reasoning>yes", "yes"),
        ('<think type="cot">x</think>yes', "yes"),  # attributes
        ("<think>\nstep 1\nstep 2\n</think>\n答案是四。", "答案是四。"),
        ("<think>cut off while reasoning", ""),  # unclosed leading block
        ("the model reasoned here</think>\n\nAnswer.", "Answer."),  # opening tag in the prompt
        ("First.<think>aside</think> Second.", "First. Second."),  # a block in the middle
        ("<think>a</thinking>b", ""),  # a mismatched closing tag does not close the block
        ("plain answer", "plain answer"),
        ("a <b>bold</b> claim", "a <b>bold</b> claim"),
        ("use the <think> tag like this", "use the <think> tag like this"),  # unclosed, mid-text
        ("", ""),
    ],
)
def test_think_stripped_from_final_answers(answer: str, visible: str) -> None:
    """Complete, unclosed-leading and headless blocks go; other markup stays."""
    assert strip_think(answer) == visible


def test_think_blocks_inside_code_fences_are_kept() -> None:
    """An answer that shows the tags as code keeps them; prose blocks around it still go."""
    answer = f"Example:\n{F}xml\n<think>shown</think>\n{F}\nDone <think>hidden</think>."
    assert strip_think(answer) == f"Example:\n{F}xml\n<think>shown</think>\n{F}\nDone ."
    tilde = "~~~\n<think>x</think>\n~~~\n<think>y</think>z"
    assert strip_think(tilde) == "~~~\n<think>x</think>\n~~~\nz"


def test_think_unclosed_fence_keeps_the_rest() -> None:
    """After an opening fence without its closing one, nothing is removed."""
    answer = f"a <think>x</think> b\n{F}\n<think>code</think>"
    assert strip_think(answer) == f"a  b\n{F}\n<think>code</think>"


def test_think_headless_block_after_a_fence_is_kept() -> None:
    """A closing tag after a code fence is not taken for the end of a reasoning block."""
    answer = f"{F}\nx\n{F}\nthen </think> appears"
    assert strip_think(answer) == answer


def test_think_mixed_fence_markers() -> None:
    """A ``~~~`` line inside a backtick fence does not close it."""
    answer = f"{F}\n~~~\n<think>in code</think>\n{F}\n<think>gone</think>end"
    assert strip_think(answer) == f"{F}\n~~~\n<think>in code</think>\n{F}\nend"


def test_think_unchanged_answer_is_the_same_object() -> None:
    """Without reasoning tags the very same string comes back (no copy, whitespace intact)."""
    answer = "  indented answer with <b>tags</b>  "
    assert strip_think(answer) is answer


@pytest.mark.parametrize(
    ("partial", "shown"),
    [
        ("<", ""),
        ("<thi", ""),  # may become <think>
        ("< think", ""),
        ("<think class='x'", ""),
        ("<think>still reasoning", ""),
        ("<think>done</think>The ans", "The ans"),
        ("Answer so far <think>an aside in prog", "Answer so far "),
        ("<div>", "<div>"),
        ("plain", "plain"),
        (f"{F}\n<think>in code", f"{F}\n<think>in code"),
        (f"a <think>b\n{F}\ncode\n{F}", "a "),  # an open block before a fence hides the rest
    ],
)
def test_think_partial_answers_hide_reasoning_in_progress(partial: str, shown: str) -> None:
    """While streaming, an open block and a tag being typed are hidden."""
    assert strip_think(partial, partial=True) == shown
