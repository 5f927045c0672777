"""The prepared form of a lookup query: psycopg2 placeholders to `$n`, values never in it."""

from __future__ import annotations

import pytest

from proxy.db import compile_statement

QUERY = (
    "SELECT storage, key FROM media WHERE id = %(id)s AND (%(variant)s IS NULL OR v = %(variant)s)"
)


def test_named_placeholders_become_numbered_parameters() -> None:
    stmt = compile_statement(QUERY)
    assert stmt is not None
    assert stmt.params == ("id", "variant")
    assert stmt.body == ("SELECT storage, key FROM media WHERE id = $1 AND ($2 IS NULL OR v = $2)")
    assert stmt.prepare_sql() == f"PREPARE {stmt.name} AS {stmt.body}"
    # The values reach EXECUTE through psycopg2's binding: only placeholders in the text.
    assert stmt.execute == f"EXECUTE {stmt.name}(%(id)s, %(variant)s)"


def test_parameter_types_are_declared_only_when_asked() -> None:
    stmt = compile_statement(QUERY)
    assert stmt is not None
    stmt.typed = "text"
    assert stmt.prepare_sql().startswith(f"PREPARE {stmt.name} (text, text) AS SELECT")


def test_literal_percent_and_trailing_semicolon() -> None:
    stmt = compile_statement("SELECT key FROM media WHERE key LIKE 'a%%' AND id = %(id)s ;\n")
    assert stmt is not None
    assert stmt.body == "SELECT key FROM media WHERE key LIKE 'a%' AND id = $1"


def test_query_without_parameters() -> None:
    stmt = compile_statement("SELECT 1 AS one")
    assert stmt is not None
    assert stmt.params == () and stmt.execute == f"EXECUTE {stmt.name}"


@pytest.mark.parametrize(
    "query",
    [
        "SELECT key FROM media WHERE id = %s",  # positional: psycopg2's business
        "SELECT key FROM media WHERE key LIKE 'a%' AND id = %(id)s",  # stray %
        "SELECT %(id)d",  # not an `s` conversion
        "  ;  ",
        "SELECT 1 AS one; SELECT key FROM media WHERE id = %(id)s",  # two statements
        "SELECT key FROM media WHERE id = %(id)s AND key <> ';'",  # unsure: stays text
    ],
)
def test_anything_unusual_stays_a_text_query(query: str) -> None:
    assert compile_statement(query) is None


def test_names_are_stable_identifiers_distinct_per_query() -> None:
    one, again = compile_statement(QUERY), compile_statement(QUERY)
    other = compile_statement(QUERY + " LIMIT 1")
    assert one is not None and again is not None and other is not None
    assert one.name == again.name != other.name
    assert one.name.startswith("sidecar_") and one.name.isidentifier() and one.name.islower()


@pytest.mark.parametrize("name", ["id; DROP TABLE media; --", "a b", "", "x%y"])
def test_odd_placeholder_names_never_reach_the_sql_text(name: str) -> None:
    """The name inside %(...)s is psycopg2's key into the values, never SQL of ours."""
    stmt = compile_statement(f"SELECT key FROM media WHERE id = %({name})s")
    assert stmt is not None
    assert stmt.body == "SELECT key FROM media WHERE id = $1"
    assert stmt.params == (name,)
