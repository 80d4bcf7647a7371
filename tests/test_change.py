"""The change table of docs/contract.md ("The change") and its envelope, rule by rule, then by property.

Every producer (library, CLI, webhook) validates through ``parse_change``/``parse_envelope``,
so these rules are the product's input contract: an invalid change must be refused with each
bad field named, and a valid one must come out normalised exactly as iVvy is sent it.
"""

from __future__ import annotations

import re
import string
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.core.change import (
    ID_MAX,
    NAME_PATTERN,
    LeadStageChange,
    parse_change,
    parse_envelope,
    parse_id_text,
    repeated_key,
    shown,
)
from worker.core.errors import InvalidChange, PermanentError


def refusal(raw: object) -> InvalidChange:
    with pytest.raises(InvalidChange) as refused:
        parse_change(raw)
    return refused.value


def bad_fields(refused: InvalidChange) -> list[str]:
    return [error.field for error in refused.errors]


def test_an_add_needs_a_name_and_apply_to() -> None:
    change = parse_change({"name": "Referral", "applyTo": 1})
    assert change == LeadStageChange(name="Referral", apply_to=1)
    assert change.operation == "add"
    assert change.body() == {"name": "Referral", "applyTo": 1}


@pytest.mark.parametrize(
    ("raw", "missing"),
    [
        ({"applyTo": 1}, ["name"]),
        ({"name": "Referral", "colour": "#000000"}, ["applyTo"]),
        ({"colour": "#000000"}, ["name", "applyTo"]),
        ({}, ["name", "applyTo"]),
    ],
)
def test_an_add_without_name_or_apply_to_is_refused(raw: dict[str, Any], missing: list[str]) -> None:
    refused = refusal(raw)
    assert bad_fields(refused) == missing
    assert all("required when id is absent" in error.reason for error in refused.errors)


@pytest.mark.parametrize("field", ["name", "colour", "applyTo"])
def test_an_update_changes_the_fields_given(field: str) -> None:
    value = {"name": "Renamed", "colour": "#00ff00", "applyTo": 2}[field]
    change = parse_change({"id": 755, field: value})
    assert change.operation == "update"
    assert change.body() == {"id": 755, field: value}
    assert change.changed_fields() == [field]


def test_an_update_with_nothing_to_change_is_refused() -> None:
    refused = refusal({"id": 755})
    assert bad_fields(refused) == ["change"]
    assert "at least one of name, colour, applyTo" in str(refused)


@pytest.mark.parametrize(
    ("raw", "body"),
    [
        ({"name": "x", "appliesTo": 2}, {"name": "x", "applyTo": 2}),
        ({"id": 5, "color": "#ABCDEF"}, {"id": 5, "colour": "#abcdef"}),
        ({"name": "x", "color": "#000000", "appliesTo": "lead"}, {"name": "x", "colour": "#000000", "applyTo": 2}),
    ],
)
def test_aliases_become_the_canonical_fields(raw: dict[str, Any], body: dict[str, Any]) -> None:
    assert parse_change(raw).body() == body


@pytest.mark.parametrize(
    ("raw", "field", "alias"),
    [
        ({"id": 5, "colour": "#000000", "color": "#111111"}, "colour", "color"),
        ({"id": 5, "color": "#000000", "colour": "#111111"}, "colour", "color"),
        ({"id": 5, "applyTo": 1, "appliesTo": 1}, "applyTo", "appliesTo"),
        ({"id": 5, "appliesTo": 1, "applyTo": 1}, "applyTo", "appliesTo"),
    ],
)
def test_a_field_given_as_itself_and_as_its_alias_is_refused(raw: dict[str, Any], field: str, alias: str) -> None:
    refused = refusal(raw)
    assert bad_fields(refused) == [field]
    assert f"is given twice (as {field} and as its alias {alias})" in str(refused)


def test_unknown_fields_are_refused_each_by_name() -> None:
    refused = refusal({"id": 5, "name": "x", "Name": "y", "reasons": [], "colour_hex": "#000000"})
    assert bad_fields(refused) == ["Name", "reasons", "colour_hex"]
    for field in ("Name", "reasons", "colour_hex"):
        assert f"{field}: is not a known field" in str(refused)


@pytest.mark.parametrize(
    ("raw", "field", "value"),
    [
        ({"name": "  Referral Lead\t", "applyTo": 1}, "name", "Referral Lead"),
        ({"id": 1, "colour": "#7EE546"}, "colour", "#7ee546"),
        ({"name": "x", "applyTo": "lead"}, "applyTo", 2),
        ({"name": "x", "applyTo": "opportunity"}, "applyTo", 1),
        ({"name": "x", "applyTo": 1}, "applyTo", 1),
        ({"name": "x", "applyTo": 2}, "applyTo", 2),
    ],
)
def test_values_are_normalised_as_ivvy_is_sent_them(raw: dict[str, Any], field: str, value: object) -> None:
    assert parse_change(raw).body()[field] == value


@pytest.mark.parametrize("field", ["id", "name", "colour", "color", "applyTo", "appliesTo"])
def test_null_is_refused_for_every_field(field: str) -> None:
    raw: dict[str, Any] = {"id": 5, "name": "x", field: None}
    refused = refusal(raw)
    assert field in bad_fields(refused)  # named as the input spells it (issue 12 item 9)
    assert "must not be null" in str(refused)


@pytest.mark.parametrize(
    "stage_id", [True, False, 0, -1, 1.0, 1.5, "5", [5], ID_MAX + 1, 2**64], ids=lambda v: repr(v)[:20]
)
def test_an_id_must_be_a_positive_integer(stage_id: object) -> None:
    assert bad_fields(refusal({"id": stage_id, "name": "x"})) == ["id"]


def test_the_largest_id_is_accepted_and_serialisable() -> None:
    change = parse_change({"id": ID_MAX, "name": "x"})
    assert orjson.loads(change.canonical_json()) == {"id": ID_MAX, "name": "x"}


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("n", True),
        ("n" * 255, True),
        ("   " + "n" * 255 + "\n ", True),  # counted after trimming
        ("n" * 256, False),
        (" " + "n" * 256 + " ", False),
        ("", False),
        ("   \t\n", False),
    ],
    ids=["1", "255", "255-after-trimming", "256", "256-after-trimming", "empty", "blank"],
)
def test_name_length_is_counted_after_trimming(name: str, ok: bool) -> None:
    raw = {"name": name, "applyTo": 1}
    if ok:
        assert parse_change(raw).name == name.strip()
    else:
        assert bad_fields(refusal(raw)) == ["name"]


@pytest.mark.parametrize("name", [5, ["x"], {"x": 1}, True])
def test_name_must_be_a_string(name: object) -> None:
    assert bad_fields(refusal({"name": name, "applyTo": 1})) == ["name"]


@pytest.mark.parametrize("colour", ["7ee546", "#7ee54", "#7ee5466", "#7ee54g", "red", " #7ee546", "", 7, "#7EE546\n"])
def test_colour_must_be_rrggbb_hex(colour: object) -> None:
    refused = refusal({"id": 1, "colour": colour})
    assert bad_fields(refused) == ["colour"]
    assert "#rrggbb" in str(refused)


@pytest.mark.parametrize("apply_to", [0, 3, -1, True, 1.0, "both", "", None, [1]], ids=lambda v: repr(v))
def test_apply_to_must_be_1_2_lead_or_opportunity(apply_to: object) -> None:
    assert bad_fields(refusal({"name": "x", "applyTo": apply_to})) == ["applyTo"]


@pytest.mark.parametrize("raw", [None, [], "change", 5, [("name", "x")]])
def test_a_change_must_be_an_object(raw: object) -> None:
    assert bad_fields(refusal(raw)) == ["change"]


def test_every_bad_field_is_reported_at_once() -> None:
    refused = refusal({"name": " ", "colour": "red", "applyTo": 9, "shape": "round"})
    assert sorted(bad_fields(refused)) == ["applyTo", "colour", "name", "shape"]
    assert isinstance(refused, PermanentError)
    assert not refused.retryable
    assert str(refused).startswith("invalid change: ")


# The envelope.


def test_envelope_defaults() -> None:
    first, second = parse_envelope(), parse_envelope()
    assert (first.account, first.source) == ("default", "")
    assert first.idempotency_key != second.idempotency_key, "a generated key is new each time"
    assert 1 <= len(first.idempotency_key) <= 255
    assert all(32 <= ord(c) <= 126 for c in first.idempotency_key)


@pytest.mark.parametrize("key", ["k", "k" * 255, "order 17/line 3", "~!@#$%^&*()"])
def test_idempotency_keys_of_1_to_255_printable_ascii_are_kept(key: str) -> None:
    assert parse_envelope(idempotency_key=key).idempotency_key == key


@pytest.mark.parametrize(("given", "kept"), [(" k", "k"), ("k \t", "k"), ("\t a b ", "a b")])
def test_spaces_and_tabs_around_a_key_or_account_are_trimmed_as_http_trims_a_header(given: str, kept: str) -> None:
    """Issue 12 item 9: one trimming rule for every producer (the webhook's header is trimmed by HTTP)."""
    assert parse_envelope(idempotency_key=given).idempotency_key == kept
    assert parse_envelope(account=given.replace(" ", "")).account == kept.replace(" ", "")


@pytest.mark.parametrize(
    "key",
    ["", " ", " \t ", "k" * 256, "tab\there", "new\nline", "caf\u00e9", "del\x7f", "lone\ud800", 17, b"bytes"],
    ids=lambda v: repr(v)[:20],
)
def test_other_idempotency_keys_are_refused(key: object) -> None:
    with pytest.raises(InvalidChange) as refused:
        parse_envelope(idempotency_key=key)
    assert bad_fields(refused.value) == ["idempotency_key"]


@pytest.mark.parametrize("account", ["default", "acme-eu.1_x", "a" * 64])
def test_account_names_of_letters_digits_and_separators_are_kept(account: str) -> None:
    assert parse_envelope(account=account).account == account


@pytest.mark.parametrize("account", ["", "a" * 65, "a b", "a:b", "a/b", "\u00e9t\u00e9", 3], ids=lambda v: repr(v))
def test_other_account_names_are_refused(account: object) -> None:
    with pytest.raises(InvalidChange) as refused:
        parse_envelope(account=account)
    assert bad_fields(refused.value) == ["account"]


@pytest.mark.parametrize(("source", "ok"), [("webhook:crm", True), ("s" * 1000, True), ("s" * 1001, False), (5, False)])
def test_source_is_free_text_of_bounded_length(source: object, ok: bool) -> None:
    if ok:
        assert parse_envelope(source=source).source == source
    else:
        with pytest.raises(InvalidChange) as refused:
            parse_envelope(source=source)
        assert bad_fields(refused.value) == ["source"]


def test_every_bad_envelope_field_is_reported_at_once() -> None:
    with pytest.raises(InvalidChange) as refused:
        parse_envelope(idempotency_key="", account="a b", source=5)
    assert bad_fields(refused.value) == ["idempotency_key", "account", "source"]


# Properties: valid changes of every shape parse, normalise and round-trip; each kind of
# invalid field is named.

_WHITESPACE = " \t\n\u00a0\u2003"
#: Characters a name may hold: no control characters, no bidi embeddings, overrides or isolates.
_name_characters = st.characters(
    blacklist_categories=("Cc", "Cs"), blacklist_characters="\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
_names = st.tuples(
    st.text(" \u00a0\u2003", max_size=3),
    st.text(_name_characters, min_size=1, max_size=255).filter(
        lambda core: core.strip() == core and any(c.isalnum() for c in core)  # a visible character
    ),
    st.text(" \u00a0\u2003", max_size=3),
).map("".join)
_colours = st.text("0123456789abcdefABCDEF", min_size=6, max_size=6).map(lambda hex_digits: "#" + hex_digits)
_apply_tos = st.sampled_from([1, 2, "lead", "opportunity"])
_ids = st.integers(min_value=1, max_value=ID_MAX)


@st.composite
def valid_changes(draw: st.DrawFn) -> dict[str, Any]:
    """A raw change as a producer may send it: add or update, canonical names or aliases."""
    colour_key = draw(st.sampled_from(["colour", "color"]))
    apply_to_key = draw(st.sampled_from(["applyTo", "appliesTo"]))
    optional = {"name": _names, colour_key: _colours, apply_to_key: _apply_tos}
    if draw(st.booleans()):  # an add
        raw = {"name": draw(_names), apply_to_key: draw(_apply_tos)}
        if draw(st.booleans()):
            raw[colour_key] = draw(_colours)
        return raw
    fields = draw(st.lists(st.sampled_from(sorted(optional)), min_size=1, max_size=3, unique=True))
    return {"id": draw(_ids), **{field: draw(optional[field]) for field in fields}}


@given(valid_changes())
def test_valid_changes_parse_normalised_and_round_trip(raw: dict[str, Any]) -> None:
    change = parse_change(raw)
    given_apply_to = raw.get("applyTo", raw.get("appliesTo"))
    given_colour = raw.get("colour", raw.get("color"))
    assert change.id == raw.get("id")
    assert change.operation == ("update" if "id" in raw else "add")
    assert change.name == (raw["name"].strip() if "name" in raw else None)
    assert change.colour == (given_colour.lower() if given_colour is not None else None)
    assert change.apply_to == {None: None, 1: 1, 2: 2, "opportunity": 1, "lead": 2}[given_apply_to]
    assert parse_change(change.body()) == change
    assert orjson.loads(change.canonical_json()) == change.body()


_not_ints = st.one_of(st.booleans(), st.floats(), st.text(), st.lists(st.integers(), max_size=2))
_bad_values: dict[str, st.SearchStrategy[object]] = {
    "id": st.one_of(st.integers(max_value=0), st.integers(min_value=ID_MAX + 1), _not_ints),
    "name": st.one_of(
        st.text(_WHITESPACE, max_size=5),
        st.text(min_size=256, max_size=300).filter(lambda name: len(name.strip()) > 255),
        st.integers(),
        st.booleans(),
    ),
    "colour": st.one_of(st.text().filter(lambda c: not (len(c) == 7 and c[0] == "#")), st.integers()),
    "applyTo": st.one_of(
        st.integers().filter(lambda n: n not in (1, 2)),
        st.booleans(),
        st.floats(),
        st.text().filter(lambda t: t.strip().lower() not in ("lead", "opportunity", "1", "2")),
    ),
}
_unknown_fields = st.text(string.ascii_letters + "_", min_size=1, max_size=12).filter(
    lambda name: name not in ("id", "name", "colour", "color", "applyTo", "appliesTo")
)


@given(st.data(), st.sampled_from([*sorted(_bad_values), "unknown"]))
def test_each_kind_of_invalid_field_is_named(data: st.DataObject, kind: str) -> None:
    raw = {"id": 5, "name": "Valid", "colour": "#000000", "applyTo": 1}
    if kind == "unknown":
        field = data.draw(_unknown_fields)
        raw[field] = data.draw(st.integers())
    else:
        field = kind
        raw[field] = data.draw(_bad_values[field])
    refused = refusal(raw)
    assert bad_fields(refused) == [field]
    assert f"{field}: " in str(refused)


@given(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=255))
def test_any_printable_ascii_key_is_kept(key: str) -> None:
    assert parse_envelope(idempotency_key=key).idempotency_key == key


@given(
    st.tuples(
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=100),
        st.characters().filter(lambda c: not 0x20 <= ord(c) <= 0x7E and c != "\t"),  # a tab at an end is trimmed
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=100),
    ).map("".join)
)
def test_a_key_with_any_other_character_is_refused(key: str) -> None:
    with pytest.raises(InvalidChange) as refused:
        parse_envelope(idempotency_key=key)
    assert bad_fields(refused.value) == ["idempotency_key"]


# -- issue 12: hostile text ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("a\x00b", "must not contain a control character (\\x00 at position 2)"),
        ("a\x1b[31mb", "must not contain a control character (\\x1b at position 2)"),
        ("a\nb", "must not contain a control character (\\x0a at position 2)"),
        ("a\tb", "must not contain a control character (\\x09 at position 2)"),
        ("a\x7fb", "must not contain a control character (\\x7f at position 2)"),
        ("a\x85b", "must not contain a control character (\\x85 at position 2)"),
        ("abc\u202edcba", "must not contain a bidirectional override (\\u202e at position 4)"),
        ("x\u2066y\u2069", "must not contain a bidirectional override (\\u2066 at position 2)"),
        ("\u200b", "must have a visible character"),
        ("\u200d\u200c\ufeff", "must have a visible character"),
        ("\u3164", "must have a visible character"),
        ("\u2800\u2800", "must have a visible character"),
        ("\u0301", "must have a visible character"),
        ("a\ud800", "must be valid Unicode text (it holds a lone surrogate)"),
    ],
    ids=repr,
)
def test_names_that_would_deceive_or_act_on_a_terminal_are_refused_with_the_reason(name: str, reason: str) -> None:
    refused = refusal({"name": name, "applyTo": 1})
    assert [e.field for e in refused.errors] == ["name"]
    assert refused.errors[0].reason.startswith(reason)
    assert "\x1b" not in str(refused)
    assert "\u202e" not in str(refused)


@pytest.mark.parametrize("name", ["Café", "日本の段階", "مرحلة", "Hot 🔥", "👩\u200d💻 devs", "a\u200bb", "Ünïcödé"])
def test_names_in_any_script_with_visible_characters_are_kept(name: str) -> None:
    assert parse_change({"name": name, "applyTo": 1}).name == name


def test_a_lone_surrogate_in_the_source_is_refused_naming_it() -> None:
    """Issue 12 item 8: it raised TypeError (from JSON encoding) deep in the library."""
    with pytest.raises(InvalidChange) as refused:
        parse_envelope(source="crm \udc80")
    assert bad_fields(refused.value) == ["source"]


def test_errors_name_fields_as_the_input_spells_them() -> None:
    refused = refusal({"name": "x", "appliesTo": 7, "color": "red"})
    assert bad_fields(refused) == ["color", "appliesTo"]


def test_an_unknown_field_name_is_echoed_cut_and_escaped() -> None:
    refused = refusal({"f" * 100_000: 1, "name": "x", "applyTo": 1})
    assert len(str(refused)) < 200
    assert "(100000 characters)" in str(refused)
    escaped = refusal({"a\x1b]0;owned\x07": 1, "name": "x", "applyTo": 1})
    assert "a\\x1b]0;owned\\x07" in str(escaped)
    assert "\x1b" not in str(escaped)


@pytest.mark.parametrize("text", ["1", "42", str(ID_MAX)])
def test_an_id_written_as_text_is_plain_digits(text: str) -> None:
    assert parse_id_text(text) == int(text)


@pytest.mark.parametrize(
    "text", ["", "0", "05", "+5", "-5", " 5", "5 ", "5_0", "5.0", "1e3", "\u0665", "\uff15", str(ID_MAX + 1)]
)
def test_other_id_texts_are_refused_as_json_producers_refuse_them(text: str) -> None:
    """Issue 12 item 9: int() accepts +5, 5_0, ' 5' and non-ASCII digits; a JSON producer does not."""
    with pytest.raises(InvalidChange) as refused:
        parse_id_text(text)
    assert bad_fields(refused.value) == ["id"]


def test_shown_cuts_and_escapes_for_a_terminal() -> None:
    assert shown("plain text") == "plain text"
    assert shown("x" * 50, limit=10) == "xxxxxxxxxx... (50 characters)"
    assert shown("a\x1b[2Jb\u202ec\ud800") == "a\\x1b[2Jb\\u202ec\\ud800"


@pytest.mark.parametrize(
    ("text", "repeated"),
    [
        (b'{"name": "a", "applyTo": 1}', None),
        (b'{"name": "a:b", "source": "x:y", "applyTo": 1}', None),  # colons in values: the slow path
        (b'{"name": "a", "name": "b", "applyTo": 1}', "name"),
        (b'{"name": "a", "applyTo": 1, "applyTo" : 2}', "applyTo"),
        (b'{"x": {"k": 1, "k": 2}}', "k"),
        (b'[{"a": 1}, {"a": 1, "a": 2}]', "a"),
        (b'"plain"', None),
    ],
)
def test_a_repeated_key_in_json_is_found_whatever_the_parser_kept(text: bytes, repeated: str | None) -> None:
    """Issue 12 item 9: orjson keeps the last of repeated keys; every JSON producer refuses them."""
    assert repeated_key(text, orjson.loads(text)) == repeated


def test_the_published_name_pattern_is_the_strict_form_of_the_model() -> None:
    """The OpenAPI document's name pattern (anchored there) against ``parse_change``: every name it
    takes, the model takes (what schemathesis sends as valid is valid); the model's refusals
    (control characters, bidi overrides, nothing visible) it refuses too."""
    pattern = re.compile(NAME_PATTERN)
    for code in [*range(0x3001), 0xFEFF, 0x10FFFF]:
        for name in (f" {chr(code)} ", f"a{chr(code)}b"):
            try:
                parse_change({"name": name, "applyTo": 1})
                accepted = True
            except InvalidChange:
                accepted = False
            if pattern.fullmatch(name) is not None:
                assert accepted, hex(code)
    for refused in ("a\x1bb", "a\x00", "x\u202ey", "\u200b", " ", "\x1f"):
        assert pattern.fullmatch(refused) is None, repr(refused)
