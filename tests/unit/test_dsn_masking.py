"""No part of a password ever shows, whatever the DSN looks like (property-based).

Passwords are words of a marker alphabet (upper-case letters that no message, host, user or
database name here uses) joined by the characters that break naive masking: ``/ @ : # ? & =
' " \\ ;`` and blanks. Every word (4 to 12 characters, one of exactly 12: the marker) must be
absent from every text areplica derives from the DSN: ``mask_dsn()``, the text of the
``ConfigurationError`` that ``parse`` raises, ``repr(NodeDSN)`` and ``.masked``, and, through a
``ReplicaManager``, its repr, its ``status()`` and its constructor's errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import quote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from psycopg2.extensions import make_dsn

from areplica import ReplicaManager
from areplica.dsn import MASK, NodeDSN, mask_dsn, parse, split_dsns
from areplica.errors import ConfigurationError

MARKER_ALPHABET = "QXZJKVWY"
SEPARATORS = ["/", "@", ":", "#", "?", "&", "=", "'", '"', "\\", ";", " ", "  ", "\t", "%"]
LOTS = settings(max_examples=3000, deadline=None)


@dataclass(frozen=True)
class Case:
    dsn: str
    words: tuple[str, ...]

    def leaks(self, text: str) -> list[str]:
        """The password words (present in the DSN) that ``text`` shows."""
        return [w for w in self.words if w in self.dsn and w in text]


words = st.text(alphabet=MARKER_ALPHABET, min_size=4, max_size=12)
marker = st.text(alphabet=MARKER_ALPHABET, min_size=12, max_size=12)
separator = st.sampled_from(SEPARATORS)
lower = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
port = st.integers(min_value=1, max_value=65535).map(str)


@st.composite
def passwords(draw: st.DrawFn) -> tuple[str, tuple[str, ...]]:
    """A password of words and nasty separators (maybe leading/trailing), and its words."""
    parts = [*draw(st.lists(words, max_size=3)), draw(marker)]
    parts = draw(st.permutations(parts))
    text = draw(separator) if draw(st.booleans()) else ""
    for i, word in enumerate(parts):
        text += word
        if i < len(parts) - 1:
            text += draw(st.text(alphabet="".join(SEPARATORS), min_size=1, max_size=3))
    if draw(st.booleans()):
        text += draw(separator)
    return text, tuple(parts)


def _url(user: str, auth: str, host: str, port: str, db: str, query: str = "") -> str:
    return f"postgresql://{user}:{auth}@{host}:{port}/{db}{query}"


FORMS: dict[str, Callable[[str, str, str, str, str], str]] = {
    "url, encoded": lambda pw, u, h, p, d: _url(u, quote(pw, safe=""), h, p, d),
    "url, raw": lambda pw, u, h, p, d: _url(u, pw, h, p, d),
    "url, raw, with a query": lambda pw, u, h, p, d: _url(u, pw, h, p, d, "?sslmode=disable"),
    "postgres:// url, raw": lambda pw, u, h, p, d: f"postgres://{u}:{pw}@{h}/{d}",
    "url, no host": lambda pw, u, h, p, d: f"postgresql://{u}:{pw}",
    "url query, encoded": lambda pw, u, h, p, d: (
        f"postgresql://{u}@{h}:{p}/{d}?password={quote(pw, safe='')}&sslmode=disable"
    ),
    "url query, raw": lambda pw, u, h, p, d: (
        f"postgresql://{u}@{h}:{p}/{d}?application_name={d}&password={pw}&sslmode=disable"
    ),
    "url query, raw, last": lambda pw, u, h, p, d: f"postgresql://{h}/{d}?password={pw}",
    "url query, encoded key": lambda pw, u, h, p, d: (
        f"postgresql://{h}/{d}?%70assword={quote(pw, safe='')}&port={p}"
    ),
    "keywords, make_dsn": lambda pw, u, h, p, d: str(
        make_dsn(host=h, port=p, user=u, password=pw, dbname=d)
    ),
    "keywords, raw": lambda pw, u, h, p, d: f"host={h} password={pw} dbname={d}",
    "keywords, raw, last": lambda pw, u, h, p, d: f"host={h} user={u} password={pw}",
    "keywords, raw, first": lambda pw, u, h, p, d: f"password={pw} host={h} port={p}",
    "keywords, quoted raw": lambda pw, u, h, p, d: f"host={h} password='{pw}' port={p}",
    "keywords, blanks": lambda pw, u, h, p, d: f"host = {h}  password = {pw}  dbname = {d}",
    "keywords, upper case": lambda pw, u, h, p, d: f"host={h} PASSWORD={pw} dbname={d}",
    "keywords, sslpassword": lambda pw, u, h, p, d: f"host={h} sslpassword={pw} sslmode=require",
}
GARBAGE = ["", " nonsense", "&bogus", " port=notaport", ":x", "?", "'", " port=70000", "\\"]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    password, parts = draw(passwords())
    form = draw(st.sampled_from(sorted(FORMS)))
    dsn = FORMS[form](password, draw(lower), draw(lower), draw(port), draw(lower))
    if form == "url, no host" and "@" in password:
        # "postgresql://u:AAA@BBB" *is* a URL with host BBB: nothing can tell it apart.
        dsn = FORMS["url, raw"](password, "app", "db", "5432", "app")
    dsn += draw(st.sampled_from(GARBAGE))
    if form.startswith("keywords") and draw(st.booleans()):
        dsn = dsn[: draw(st.integers(min_value=0, max_value=len(dsn)))]  # cut anywhere
    return Case(dsn, parts)


def shown_by_parse(dsn: str) -> list[str]:
    """Every text ``parse`` lets out: the error's, or the parsed DSN's."""
    try:
        parsed = parse(dsn, option="primary")
    except ConfigurationError as exc:
        assert exc.__cause__ is None
        assert exc.__context__ is None or exc.__suppress_context__
        return [str(exc), repr(exc)]
    return [repr(parsed), str(parsed), parsed.masked]


def assert_hidden(case: Case, texts: Iterable[str]) -> None:
    for text in texts:
        assert not case.leaks(text), f"{case.leaks(text)} shown in {text!r} (DSN {case.dsn!r})"


@LOTS
@given(cases())
@example(Case("postgresql://app:Tr0ub4dor/QXZJKVWYQXZJ@db.example:5432/app", ("QXZJKVWYQXZJ",)))
@example(Case("host=db password=correct QXZJKVWYQXZJ battery", ("QXZJKVWYQXZJ",)))
@example(Case("postgresql://app:Tr0ub4dor@QXZJKVWYQXZJ@db.example/app", ("QXZJKVWYQXZJ",)))
def test_mask_dsn_hides_every_password_word(case: Case) -> None:
    masked = mask_dsn(case.dsn)
    assert_hidden(case, [masked])
    if any(w in case.dsn for w in case.words):
        assert MASK in masked


@LOTS
@given(cases())
def test_parse_errors_and_parsed_dsns_hide_every_password_word(case: Case) -> None:
    assert_hidden(case, shown_by_parse(case.dsn))


@LOTS
@given(cases(), st.booleans())
def test_a_manager_hides_every_password_word(case: Case, as_replica: bool) -> None:
    good = "postgresql://app@db.example/app"
    primary, replicas = (good, {"r1": case.dsn}) if as_replica else (case.dsn, {"r1": good})
    try:
        mgr = ReplicaManager(primary, replicas)
    except ConfigurationError as exc:
        assert_hidden(case, [str(exc), repr(exc)])
        assert exc.__cause__ is None
        return
    for node in mgr.cluster:
        # What a driver error quoting the password would leave after note_error().
        node.note_error(OSError(f"connection failed (password {node.dsn.password})"))
    statuses = mgr.status()
    assert_hidden(case, [repr(mgr), repr(statuses), *(s.dsn for s in statuses)])
    assert_hidden(case, [s.last_error or "" for s in statuses])


@pytest.mark.parametrize(
    ("dsn", "secret"),
    [
        # The three leaks reproduced on main before this module was rewritten.
        ("postgresql://app:Tr0ub4dor/horse@db.example:5432/app", ["Tr0ub4dor", "horse"]),
        ("host=db password=correct horse battery dbname=app", ["correct", "horse", "battery"]),
        ("postgresql://app:Tr0ub4dor@horse@db.example/app", ["Tr0ub4dor", "horse"]),
    ],
)
def test_reproduced_leaks_are_closed(dsn: str, secret: list[str]) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse(dsn)
    for text in (str(info.value), mask_dsn(dsn)):
        assert not [s for s in secret if s in text], text
        assert "db" in text  # the rest stays readable


def test_well_formed_dsns_stay_readable() -> None:
    parsed = parse("postgresql://app:p%40ss@db:6432/app?sslmode=require")
    assert parsed.masked == "user=app password=*** dbname=app host=db port=6432 sslmode=require"
    assert mask_dsn("postgresql://app:p%40ss@db:6432/app") == "postgresql://app:***@db:6432/app"
    assert mask_dsn("host=db password='a b' port=5") == "host=db password=*** port=5"
    assert mask_dsn("postgresql://app@db/app") == "postgresql://app@db/app"
    assert mask_dsn("host=db port=5432") == "host=db port=5432"


def test_ambiguous_urls_are_refused_with_advice() -> None:
    for dsn in ("postgresql://app:a/b@db/app", "postgresql://app:a@b@db/app"):
        with pytest.raises(ConfigurationError, match="percent-encode") as info:
            parse(dsn, option="replicas[r1]")
        assert info.value.option == "replicas[r1]"
    assert parse("postgresql://app:a%2Fb%40c@db/app").password == "a/b@c"


def test_hostile_sizes_and_types() -> None:
    huge = "host=db password=" + "QXZJ" * 100_000
    assert "QXZJ" not in mask_dsn(huge)
    with pytest.raises(ConfigurationError, match="too long") as info:
        parse(huge)
    assert "QXZJ" not in str(info.value)
    assert mask_dsn(None) == "<NoneType>"  # type: ignore[arg-type]
    spaces = "password=x" + " " * 8000 + "y"
    assert mask_dsn(spaces).startswith("password=***")


def test_split_dsns_keeps_a_semicolon_inside_a_password() -> None:
    text = "postgresql://app:pa;ss@db/app; postgresql://app@r1/app\nhost=r2 password=x;y"
    assert split_dsns(text) == [
        "postgresql://app:pa;ss@db/app",
        "postgresql://app@r1/app",
        "host=r2 password=x;y",
    ]
    assert split_dsns(" ; \n") == []


def test_node_dsn_masks_every_secret_parameter() -> None:
    dsn = NodeDSN({"host": "db", "sslpassword": "QXZJKVWY", "password": "KVWYQXZJ"})
    assert "QXZJ" not in dsn.masked and "KVWY" not in repr(dsn)
    unknown = NodeDSN({"host": "db", "oauth_client_secret": "KVWYQXZJ"})  # libpq < 18
    assert "KVWY" not in unknown.masked and "db" in unknown.masked


def test_masking_stays_fast_on_hostile_input() -> None:
    import time

    hostile = [
        "password" * 1000,
        "password= " * 819,
        "password=a" + " " * 8180,
        "postgresql://h/d?" + "password=a&" * 740,
        "postgresql://" + "@" * 8000,
        "postgresql://" + "a:1," * 2000,
        "password='" + "\\'" * 4000,
        "a" * 8000 + "=b",
    ]
    started = time.perf_counter()
    for text in hostile:
        assert "password=a" not in mask_dsn(text)
        try:
            assert "password=a" not in repr(parse(text))
        except ConfigurationError as exc:
            assert "password=a" not in str(exc)
    assert time.perf_counter() - started < 1.0  # a few ms each: no quadratic regex
