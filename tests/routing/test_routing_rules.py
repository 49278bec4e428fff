"""The rule engine: order of steps, every matcher, pins, by_kind with code, canary arms."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from imrelay.config import RoutingSettings
from imrelay.message import Attachment
from imrelay.pipeline.guard import MemoryModelPins
from imrelay.routing.canary import CanaryBook, CanaryDecision, CanaryStateFile
from imrelay.routing.code import CodeVerdict, detect_code
from imrelay.routing.rules import Router

RoutingFactory = Callable[..., RoutingSettings]
CODE = "def add(a, b):\n    return a + b"


def test_rules_first_match_wins(make_routing: RoutingFactory, make_message: Any) -> None:
    """Of two matching rules the first decides; the decision names it and what matched."""
    routing = make_routing(
        rules=[
            {"name": "fin", "match": {"keyword": ["budget"]}, "model": "finance"},
            {"name": "all", "match": {}, "model": "backup"},
        ]
    )
    router = Router(routing)
    decision = router.pick(make_message("the budget for Q3"))
    assert (decision.model, decision.rule) == ("finance", "rule fin")
    assert decision.reason == "keyword 'budget'"
    other = router.pick(make_message("hello"))
    assert (other.model, other.rule, other.reason) == ("backup", "rule all", "matches everything")


def test_rules_unnamed_rule_is_named_by_position(
    make_routing: RoutingFactory, make_message: Any
) -> None:
    """A rule without a name is called ``#<position>``, counting from one."""
    routing = make_routing(
        rules=[{"match": {"user": "nobody"}, "model": "coder"}, {"model": "finance"}]
    )
    assert Router(routing).pick(make_message()).rule == "rule #2"


@pytest.mark.parametrize(
    ("match", "message", "expected"),
    [
        ({"platform": "dingtalk"}, {}, True),
        ({"platform": ["feishu"]}, {}, False),
        ({"conversation": ["cid-1"]}, {}, True),
        ({"conversation": ["cid-2"]}, {}, False),
        ({"group": ["cid-1"]}, {"conv_kind": "group"}, True),
        ({"group": ["cid-1"]}, {}, False),  # the same id as a direct chat is not a group
        ({"group": ["cid-9"]}, {"conv_kind": "group"}, False),
        ({"user": [12345]}, {"sender_id": "12345"}, True),  # YAML integers become strings
        ({"user": ["staff-2"]}, {}, False),
        ({"kind": ["text"]}, {}, True),
        ({"kind": ["text"]}, {"text": CODE}, True),  # text includes text with code
        ({"kind": ["code"]}, {"text": CODE}, True),
        ({"kind": ["code"]}, {}, False),
        ({"kind": ["image"]}, {"kind": "image", "text": ""}, True),
        ({"kind": ["image"]}, {}, False),
        ({"keyword": ["HELLO"]}, {}, True),  # case-insensitive
        ({"keyword": ["报销"]}, {"text": "发票报销流程是什么"}, True),
        ({"keyword": ["bye", "nope"]}, {}, False),
        ({"regex": r"^hel+o$"}, {}, True),
        ({"regex": r"\d{4}"}, {}, False),
        ({"platform": "dingtalk", "user": "staff-1", "keyword": "hell"}, {}, True),
        ({"platform": "dingtalk", "user": "staff-1", "keyword": "bye"}, {}, False),
    ],
)
def test_rules_each_matcher(
    make_routing: RoutingFactory,
    make_message: Any,
    match: dict[str, Any],
    message: dict[str, Any],
    expected: bool,
) -> None:
    """Every key of ``match`` must match; a list matches when any member does."""
    routing = make_routing(by_kind={"code": "coder"}, rules=[{"match": match, "model": "finance"}])
    text = message.pop("text", "hello")
    decision = Router(routing).pick(make_message(text, **message))
    assert (decision.model == "finance") is expected, decision


def test_rules_department_needs_the_senders_departments(
    make_routing: RoutingFactory, make_message: Any
) -> None:
    """A department rule matches the departments the caller looked up."""
    routing = make_routing(rules=[{"match": {"department": [42]}, "model": "finance"}])
    router = Router(routing)
    assert router.uses_departments
    assert router.pick(make_message(), departments=frozenset({"42"})).model == "finance"
    assert router.pick(make_message(), departments=frozenset({"7"})).model == "qwen"
    assert not Router(make_routing()).uses_departments


def test_rules_check_names_the_key_that_failed(
    make_routing: RoutingFactory, make_message: Any
) -> None:
    """``Rule.check`` says which key did not match (what ``route explain`` prints)."""
    routing = make_routing(
        rules=[
            {"match": {"platform": "feishu"}, "model": "finance"},
            {"match": {"conversation": "x"}, "model": "finance"},
            {"match": {"group": "cid-1"}, "model": "finance"},
            {"match": {"user": "x"}, "model": "finance"},
            {"match": {"department": "x"}, "model": "finance"},
            {"match": {"kind": "image"}, "model": "finance"},
            {"match": {"keyword": "x"}, "model": "finance"},
            {"match": {"regex": "x"}, "model": "finance"},
        ]
    )
    router = Router(routing)
    msg = make_message()
    reasons = [rule.check(msg, msg.text, "text", frozenset())[1] for rule in router.rules]
    assert reasons == [
        "platform not listed",
        "conversation not listed",
        "not a listed group",
        "user not listed",
        "no listed department",
        "kind text not listed",
        "no keyword",
        "regex not found",
    ]


def test_rules_rule_reason_lists_every_key_and_the_code_verdict(
    make_routing: RoutingFactory, make_message: Any
) -> None:
    """A match on several keys names each; a kind match adds the detector's reason."""
    routing = make_routing(
        rules=[
            {
                "match": {
                    "platform": "dingtalk",
                    "conversation": "cid-1",
                    "group": "cid-1",
                    "user": "staff-1",
                    "department": "d1",
                    "kind": "code",
                    "keyword": "return",
                    "regex": "def ",
                },
                "model": "coder",
            }
        ]
    )
    decision = Router(routing).pick(
        make_message(CODE, conv_kind="group"), departments=frozenset({"d1"})
    )
    assert decision.model == "coder"
    assert decision.reason == (
        "platform dingtalk, conversation listed, group listed, user listed, department listed, "
        "kind code, keyword 'return', regex 'def ' (2 of 2 lines look like code)"
    )
    assert decision.kind == "code"


def test_rules_by_kind_code_then_text_then_default(
    make_routing: RoutingFactory, make_message: Any
) -> None:
    """Text with code uses by_kind.code, else by_kind.text; other kinds their own, else default."""
    router = Router(make_routing(by_kind={"code": "coder", "image": "vision"}))
    code = router.pick(make_message(CODE))
    assert (code.model, code.rule, code.kind) == ("coder", "by_kind.code", "code")
    assert code.reason == "code (2 of 2 lines look like code)"
    image = router.pick(make_message("", kind="image"))
    assert (image.model, image.rule, image.reason) == (
        "vision",
        "by_kind.image",
        "message kind image",
    )
    plain = router.pick(make_message("hi there"))
    assert (plain.model, plain.rule) == ("qwen", "default")
    assert plain.reason == "no rule for kind text (no code-like lines)"
    router = Router(make_routing(by_kind={"text": "backup"}))
    text_route = router.pick(make_message(CODE))
    assert (text_route.model, text_route.rule) == ("backup", "by_kind.text")
    assert text_route.reason == "message kind text"  # no code route: detection is skipped


def test_rules_code_route_without_text_route_uses_default(
    make_routing: RoutingFactory, make_message: Any
) -> None:
    """With a code rule but no text route, plain text falls to the default, noting the verdict."""
    router = Router(make_routing(rules=[{"match": {"kind": "code"}, "model": "coder"}]))
    assert router.pick(make_message(CODE)).model == "coder"
    decision = router.pick(make_message("plain words"))
    assert decision.reason == "no rule for kind text (no code-like lines)"
    router = Router(make_routing(by_kind={"code": "coder", "text": "backup"}))
    prose = router.pick(make_message("plain words"))
    assert (prose.model, prose.rule, prose.reason) == (
        "backup",
        "by_kind.text",
        "message kind text",
    )


def test_rules_code_detection_runs_only_when_configured(
    make_routing: RoutingFactory, make_message: Any
) -> None:
    """Without by_kind.code or a code rule the detector is never called; with one, once."""
    calls: list[str] = []

    def detect(text: str) -> CodeVerdict:
        calls.append(text)
        return detect_code(text)

    Router(make_routing(by_kind={"image": "vision"}), detect=detect).pick(make_message(CODE))
    assert calls == []
    Router(make_routing(by_kind={"code": "coder"}), detect=detect).pick(make_message(CODE))
    assert calls == [CODE]
    Router(make_routing(by_kind={"code": "coder"}), detect=detect).pick(
        make_message("", kind="image")
    )
    assert calls == [CODE]  # not a text message


def test_rules_fallbacks_and_system_prompt_in_the_decision(
    make_routing: RoutingFactory, make_message: Any
) -> None:
    """The decision carries the model's fallback chain and the rule's system prompt."""
    routing = make_routing(
        fallback={"finance": ["qwen", "backup"]},
        rules=[{"match": {"keyword": "tax"}, "model": "finance", "system_prompt": "Be exact."}],
    )
    router = Router(routing)
    decision = router.pick(make_message("tax question"))
    assert decision.fallbacks == ("qwen", "backup")
    assert decision.system_prompt == "Be exact."
    plain = router.pick(make_message("hi"))
    assert (plain.fallbacks, plain.system_prompt) == ((), None)


def test_rules_pin_wins_over_rules_and_unknown_pins_are_ignored(
    make_routing: RoutingFactory, make_message: Any
) -> None:
    """A /model pin decides before the rules; a pin to a model no longer configured does not."""
    routing = make_routing(rules=[{"match": {}, "model": "finance"}])
    pins = MemoryModelPins()
    router = Router(routing, pins=pins, models={"qwen", "coder", "finance"})
    assert router.pick(make_message()).model == "finance"
    pins.set("dingtalk:cid-1", "coder")
    decision = router.pick(make_message())
    assert (decision.model, decision.rule) == ("coder", "pin")
    assert decision.reason == "pinned by an admin with /model"
    assert router.pick(make_message(conv_id="cid-2")).model == "finance"  # other conversation
    pins.set("dingtalk:cid-1", "removed-model")
    assert router.pick(make_message()).model == "finance"
    unchecked = Router(routing, pins=pins)  # no model list: the pin is trusted
    assert unchecked.pick(make_message()).model == "removed-model"


def test_rules_pictures_follow_only_steps_naming_their_kind(
    make_routing: RoutingFactory, make_message: Any
) -> None:
    """A picture (or a rich message holding one, routed as ``image``) goes to a rule naming
    ``image``, else ``by_kind.image``; a pin or a rule without a kind leaves it alone (it
    would hand a picture to a text model); with none of these it falls to ``default``."""
    picture = Attachment("image", "code1")
    routing = make_routing(
        rules=[
            {"match": {}, "model": "finance"},
            {"match": {"kind": "image", "group": "cidVision"}, "model": "coder"},
        ],
        by_kind={"image": "qwen"},
    )
    pins = MemoryModelPins()
    pins.set("dingtalk:cid-1", "finance")
    router = Router(routing, pins=pins)
    assert router.routed_kinds == frozenset({"image"})
    assert router.pick(make_message()).rule == "pin"  # text: the pin applies
    image = router.pick(make_message("", kind="image", attachments=(picture,)))
    assert (image.model, image.rule, image.kind) == ("qwen", "by_kind.image", "image")
    rich = router.pick(make_message("look", kind="rich", attachments=(picture,)))
    assert (rich.model, rich.rule, rich.kind) == ("qwen", "by_kind.image", "image")
    grouped = router.pick(make_message("", kind="image", conv_kind="group", conv_id="cidVision"))
    assert (grouped.model, grouped.rule) == ("coder", "rule #2")
    words_only = router.pick(make_message("just words", kind="rich"))
    assert (words_only.model, words_only.rule) == ("finance", "pin")
    bare = Router(make_routing(rules=[{"match": {}, "model": "finance"}]))
    assert bare.routed_kinds == frozenset()
    assert bare.pick(make_message("", kind="image")).rule == "default"


def test_rules_text_argument_overrides_the_message_text(
    make_routing: RoutingFactory, make_message: Any
) -> None:
    """Matching uses the text given (e.g. masked by an earlier stage), not the original."""
    router = Router(make_routing(rules=[{"match": {"keyword": "secret"}, "model": "finance"}]))
    message = make_message("my secret")
    assert router.pick(message).model == "finance"
    assert router.pick(message, "my [MASKED]").model == "qwen"


# -- canary arms --------------------------------------------------------------------------------


def _canary_routing(make_routing: RoutingFactory, **canary: Any) -> RoutingSettings:
    canary.setdefault("model", "qwen-next")
    return make_routing(
        rules=[{"name": "next", "match": {"kind": "text"}, "model": "qwen", "canary": canary}]
    )


def test_canary_ten_percent_of_a_thousand_conversations(
    make_routing: RoutingFactory, make_message: Any
) -> None:
    """At 10 %, about 100 of 1,000 conversations get the candidate (within 4 sigma), stickily."""
    router = Router(_canary_routing(make_routing, percent=10))
    ids = [f"cid-{i:04d}" for i in range(1000)]
    arms = [router.pick(make_message(conv_id=cid)).canary for cid in ids]
    chosen = arms.count("candidate")
    sigma = math.sqrt(1000 * 0.1 * 0.9)
    assert abs(chosen - 100) <= 4 * sigma, chosen
    assert arms.count("baseline") == 1000 - chosen
    again = [router.pick(make_message("another question", conv_id=cid)).canary for cid in ids]
    assert again == arms  # sticky: the same conversation, the same arm
    models = {router.pick(make_message(conv_id=cid)).model for cid in ids}
    assert models == {"qwen", "qwen-next"}


def test_canary_slices_differ_between_rules(
    make_routing: RoutingFactory, make_message: Any
) -> None:
    """Two canaries at 50 % pick overlapping but different conversations (salted by rule)."""
    ids = [f"c{i}" for i in range(400)]
    picked = []
    for name in ("one", "two"):
        routing = make_routing(
            rules=[
                {
                    "name": name,
                    "model": "qwen",
                    "canary": {"model": "qwen-next", "percent": 50},
                }
            ]
        )
        router = Router(routing)
        picked.append(
            {c for c in ids if router.pick(make_message(conv_id=c)).canary == "candidate"}
        )
    assert picked[0] != picked[1]
    assert 50 <= len(picked[0] & picked[1]) <= 150  # ~100 expected if independent


def test_canary_groups_always_get_the_candidate(
    make_routing: RoutingFactory, make_message: Any
) -> None:
    """A listed group gets the candidate whatever its bucket; a direct chat of that id not."""
    router = Router(_canary_routing(make_routing, groups=["cidTest"]))
    group = router.pick(make_message(conv_id="cidTest", conv_kind="group"))
    assert (group.model, group.canary) == ("qwen-next", "candidate")
    assert group.reason.endswith("; canary group")
    direct = router.pick(make_message(conv_id="cidTest"))
    assert (direct.model, direct.canary) == ("qwen", "baseline")
    assert direct.reason.endswith("; outside canary 0%")


def test_canary_decisions_override_the_arms(
    make_routing: RoutingFactory, make_message: Any
) -> None:
    """Rolled back: everyone on the baseline; promoted: everyone on the candidate."""
    book = CanaryBook(CanaryStateFile(None))
    router = Router(_canary_routing(make_routing, percent=100), canaries=book)
    assert router.pick(make_message()).model == "qwen-next"
    book.store.decide("next", CanaryDecision("qwen-next", "rolled_back", 1.0, "imrelay", "bad"))
    book.load()
    decision = router.pick(make_message())
    assert (decision.model, decision.canary) == ("qwen", "baseline")
    assert decision.reason.endswith("; canary rolled back")
    book.store.decide("next", CanaryDecision("qwen-next", "promoted", 2.0, "cli:ops", "good"))
    book.load()
    router = Router(_canary_routing(make_routing, groups=["x"]), canaries=book)
    decision = router.pick(make_message())
    assert (decision.model, decision.canary) == ("qwen-next", "candidate")
    assert decision.reason.endswith("; canary promoted")


def test_canary_decision_about_another_candidate_is_ignored(
    make_routing: RoutingFactory, make_message: Any
) -> None:
    """After the candidate is changed in the config, the old rollback no longer applies."""
    book = CanaryBook(CanaryStateFile(None))
    book.store.decide("next", CanaryDecision("old-model", "rolled_back", 1.0, "imrelay", "bad"))
    book.load()
    router = Router(_canary_routing(make_routing, percent=100), canaries=book)
    assert router.pick(make_message()).model == "qwen-next"
