"""Authorization policy, shaped like Istio's AuthorizationPolicy: parsing and pure decisions.

A policy file is YAML:

    default: allow-authenticated      # or: deny   (used when no ALLOW rule exists)
    rules:
      - name: no-admin
        action: DENY                  # ALLOW | DENY | AUDIT
        to: {paths: ["/admin", "/admin/*"]}
      - name: frontend-may-process
        action: ALLOW
        from: {principals: ["spiffe://cluster.local/ns/default/sa/frontend"]}
        to: {paths: ["/process"], methods: ["GET"]}
        when: [{claim: groups, values: [ops]}]
        dry_run: false

A rule matches when every field it names matches (within a field, any value).
Fields: `from.principals`, `from.namespaces`, `from.request_principals`
(`iss/sub` of the verified JWT), `to.paths`, `to.methods`, `when` (claim
conditions), and each with a `not_` twin (`not_principals`, ...) that must
*not* match. Strings match exactly, by prefix (`abc*`), by suffix (`*abc`), or
`*` (any non-empty value). Principals may omit `spiffe://`, as Istio's do.

Decision: any matching DENY refuses; else, if ALLOW rules exist, one must match;
else `default` decides. AUDIT rules only mark the log. A `dry_run` rule is
evaluated and logged ("would deny"), and changes nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ACTIONS = ("ALLOW", "DENY", "AUDIT")
# Decisions kept (cleared whole when full). The key holds the request's token, if any: at
# 4,096, as many as the verified-token cache (policy/authn.py, CACHE_SIZE), the two share
# the token strings instead of this one keeping up to 5,900 more (about 2.4 MiB).
DECISION_CACHE = 4096
DEFAULTS = ("allow-authenticated", "deny")


class PolicyError(ValueError):
    """The policy file is invalid; `problems` names each bad field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Pattern:
    """One string pattern: exact, prefix (`abc*`), suffix (`*abc`) or presence (`*`)."""

    kind: str  # exact | prefix | suffix | any
    value: str

    @classmethod
    def parse(cls, text: str) -> Pattern:
        """Compile Istio's string-match forms."""
        if text == "*":
            return cls("any", "")
        if text.endswith("*") and "*" not in text[:-1]:
            return cls("prefix", text[:-1])
        if text.startswith("*") and "*" not in text[1:]:
            return cls("suffix", text[1:])
        if "*" in text:
            raise ValueError(f"{text!r}: '*' may only lead or end a pattern")
        return cls("exact", text)

    def match(self, value: str | None) -> bool:
        """Does `value` match (None never does)?"""
        if not value:
            return False
        k = self.kind
        if k == "exact":
            return value == self.value
        if k == "prefix":
            return value.startswith(self.value)
        if k == "suffix":
            return value.endswith(self.value)
        return True


def _any(patterns: tuple[Pattern, ...], value: str | None) -> bool:
    return any(p.match(value) for p in patterns)


RequestPrincipal = tuple[str, str] | str  # (issuer, subject); "iss/sub" where issuers are unknown


@dataclass(frozen=True)
class PrincipalPattern:
    """A request-principal pattern (`iss/sub`, Istio's syntax) read as an issuer part and a
    subject part, against the configured issuers, so that a token from one issuer can never
    spell another issuer's principal ("a" + "/b/c" and "a/b" + "/c" are different).

    Without the issuers (`bound` False) it matches the joined string, as Istio does."""

    text: Pattern
    bound: bool = False
    issuer: str | None = None  # exactly this issuer, and `subject` on the subject
    subject: Pattern | None = None
    issuer_prefix: str | None = None  # the pattern ends inside the issuer name
    never: bool = False  # names an issuer that is not configured

    def match(self, rp: RequestPrincipal | None) -> bool:
        """Does the request principal match?"""
        if not rp:
            return False
        if isinstance(rp, str) or not self.bound:
            return self.text.match(rp if isinstance(rp, str) else f"{rp[0]}/{rp[1]}")
        iss, sub = rp
        if self.never or not iss or not sub:
            return False
        if self.issuer is not None:
            assert self.subject is not None
            if self.subject.kind == "prefix":
                return iss == self.issuer and sub.startswith(self.subject.value)
            return iss == self.issuer and sub == self.subject.value
        if self.issuer_prefix is not None:
            return iss.startswith(self.issuer_prefix)
        return self.text.match(f"{iss}/{sub}")  # `*` and `*suffix`: any issuer

    @classmethod
    def compile(cls, text: Pattern, issuers: tuple[str, ...] | None) -> PrincipalPattern:
        """Bind `text` to the configured issuers; ValueError if it could name two of them."""
        if issuers is None:
            return cls(text)
        if text.kind in ("any", "suffix"):
            return cls(text, bound=True)
        v = text.value
        full = [i for i in issuers if v.startswith(i + "/")]
        partial = (
            [i for i in issuers if i not in full and (i + "/").startswith(v)]
            if text.kind == "prefix"
            else []
        )
        if full and len(full) + len(partial) > 1:
            a, b = (full + partial)[:2]
            raise ValueError(
                f"{v + ('*' if text.kind == 'prefix' else '')!r} could name issuer {a!r} "
                f"or {b!r}; use when: conditions on the iss and sub claims instead"
            )
        if full:
            issuer = full[0]
            return cls(text, True, issuer, Pattern(text.kind, v[len(issuer) + 1 :]))
        if text.kind == "prefix":
            return cls(text, True, issuer_prefix=v)
        return cls(text, True, never=True)


@dataclass(frozen=True)
class Condition:
    """`claim` (a name, or names for nested claims) equals, or contains, one of `values`."""

    claim: tuple[str, ...]
    values: frozenset[str]
    negate: bool = False

    def match(self, claims: Mapping[str, Any] | None) -> bool:
        """True when the claim holds one of the values (or, negated, none of them)."""
        hit = False
        value: Any = claims
        for name in self.claim:
            if not isinstance(value, Mapping) or name not in value:
                value = None
                break
            value = value[name]
        if isinstance(value, list):
            hit = any(str(v) in self.values for v in value if not isinstance(v, dict | list))
        elif value is not None and not isinstance(value, dict):
            hit = (str(value).lower() if isinstance(value, bool) else str(value)) in self.values
        return hit != self.negate


class Request:
    """What a decision looks at (all strings already normalized)."""

    __slots__ = ("principal", "path", "method", "request_principal", "claims", "namespace")

    def __init__(
        self,
        principal: str | None,
        path: str,
        method: str,
        request_principal: RequestPrincipal | None = None,
        claims: Mapping[str, Any] | None = None,
    ) -> None:
        self.principal = principal
        self.path = path
        self.method = method
        self.request_principal = request_principal
        self.claims = claims
        self.namespace = namespace_of(principal)

    def __repr__(self) -> str:
        return f"Request({self.principal!r}, {self.path!r}, {self.method!r})"


def namespace_of(principal: str | None) -> str | None:
    """The `ns` segment of a `spiffe://td/ns/<ns>/sa/<sa>` principal."""
    if not principal:
        return None
    parts = principal.split("/")  # 'spiffe:', '', td, 'ns', <ns>, ...
    if len(parts) >= 5 and parts[3] == "ns":
        return parts[4]
    return None


@dataclass(frozen=True)
class Rule:
    """One compiled rule."""

    name: str
    action: str
    dry_run: bool = False
    principals: tuple[Pattern, ...] | None = None
    not_principals: tuple[Pattern, ...] | None = None
    namespaces: tuple[Pattern, ...] | None = None
    not_namespaces: tuple[Pattern, ...] | None = None
    request_principals: tuple[PrincipalPattern, ...] | None = None
    not_request_principals: tuple[PrincipalPattern, ...] | None = None
    paths: tuple[Pattern, ...] | None = None
    not_paths: tuple[Pattern, ...] | None = None
    methods: frozenset[str] | None = None
    not_methods: frozenset[str] | None = None
    when: tuple[Condition, ...] = ()

    @property
    def needs_http(self) -> bool:
        """Whether the rule names something only an HTTP request has (paths, methods,
        a JWT's principal or claims)."""
        return (
            self.paths is not None
            or self.not_paths is not None
            or self.methods is not None
            or self.not_methods is not None
            or self.request_principals is not None
            or self.not_request_principals is not None
            or bool(self.when)
        )

    def match_connection(self, principal: str | None, namespace: str | None) -> bool:
        """The fields a TCP connection has (its principal and namespace) match."""
        if self.principals is not None and not _any(self.principals, principal):
            return False
        if self.not_principals is not None and _any(self.not_principals, principal):
            return False
        if self.namespaces is not None and not _any(self.namespaces, namespace):
            return False
        return not (self.not_namespaces is not None and _any(self.not_namespaces, namespace))

    def match(self, r: Request) -> bool:
        """All named fields match."""
        if self.methods is not None and r.method not in self.methods:
            return False
        if self.not_methods is not None and r.method in self.not_methods:
            return False
        if self.paths is not None and not _any(self.paths, r.path):
            return False
        if self.not_paths is not None and _any(self.not_paths, r.path):
            return False
        if self.principals is not None and not _any(self.principals, r.principal):
            return False
        if self.not_principals is not None and _any(self.not_principals, r.principal):
            return False
        if self.namespaces is not None and not _any(self.namespaces, r.namespace):
            return False
        if self.not_namespaces is not None and _any(self.not_namespaces, r.namespace):
            return False
        rp = r.request_principal
        if self.request_principals is not None and not any(
            p.match(rp) for p in self.request_principals
        ):
            return False
        if self.not_request_principals is not None and any(
            p.match(rp) for p in self.not_request_principals
        ):
            return False
        return all(c.match(r.claims) for c in self.when)


@dataclass(frozen=True)
class Decision:
    """The outcome, with what the access log and the 403 body say."""

    allowed: bool
    rule: str | None
    reason: str
    audit: tuple[str, ...] = ()
    dry_run: tuple[str, ...] = ()


@dataclass(frozen=True)
class Policy:
    """A compiled policy."""

    rules: tuple[Rule, ...] = ()
    default: str = "allow-authenticated"
    source: str = "(built-in default)"
    _deny: tuple[Rule, ...] = field(default=(), repr=False)
    _allow: tuple[Rule, ...] = field(default=(), repr=False)
    _audit: tuple[Rule, ...] = field(default=(), repr=False)
    _dry: tuple[Rule, ...] = field(default=(), repr=False)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)
    # Whether any rule reads a JWT's claims (`when`): if none does, a decision depends on
    # the token's principal only, not on the token itself.
    reads_claims: bool = field(default=True, repr=False, compare=False)
    # One object per distinct decision, which the entries of `_cache` share (a policy has
    # few): a decision and its reason string of its own were 175 bytes more per entry.
    _decisions: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, rules: Sequence[Rule], default: str, source: str) -> Policy:
        """Group rules once, so evaluation walks only what it needs."""
        live = [r for r in rules if not r.dry_run]
        return cls(
            tuple(rules),
            default,
            source,
            tuple(r for r in live if r.action == "DENY"),
            tuple(r for r in live if r.action == "ALLOW"),
            tuple(r for r in live if r.action == "AUDIT"),
            tuple(r for r in rules if r.dry_run and r.action != "AUDIT"),
            reads_claims=any(r.when for r in rules),
        )

    def decide_cached(self, key: tuple, make: Callable[[], Request]) -> Decision:
        """`decide(make())`, memoized on `key` (which must determine the request's facts)."""
        cache = self._cache
        hit = cache.get(key)
        if hit is None:
            hit = self.decide(make())
            if len(cache) >= DECISION_CACHE:
                cache.clear()  # simple bound; a policy's working set is small
                self._decisions.clear()
            hit = cache[key] = self._decisions.setdefault(hit, hit)
        return hit

    def allows_with_token(self, r: Request) -> str | None:
        """The ALLOW rule that would match `r` (which has no JWT) if it carried a JWT
        with the right principal or claims, or None: then the request lacks a token,
        not a permission (a 401 rather than a 403)."""
        for rule in self._allow:
            if rule.request_principals is None and not rule.when:
                continue
            relaxed = dataclasses.replace(
                rule, request_principals=None, not_request_principals=None, when=()
            )
            if relaxed.match(r):
                return rule.name
        return None

    def decide_connection(self, principal: str | None) -> Decision:
        """The decision for an opaque TCP connection, which has only the peer's principal
        and namespace (Istio's rules for TCP): an ALLOW or AUDIT rule that names an HTTP
        attribute never matches; a DENY rule that does is matched on its other fields
        alone, so it refuses more rather than less."""
        namespace = namespace_of(principal)
        audit = tuple(
            x.name
            for x in self._audit
            if not x.needs_http and x.match_connection(principal, namespace)
        )
        dry = tuple(
            f"{x.name}: would {'deny' if x.action == 'DENY' else 'allow'}"
            for x in self._dry
            if (x.action == "DENY" or not x.needs_http) and x.match_connection(principal, namespace)
        )
        for rule in self._deny:
            if rule.match_connection(principal, namespace):
                return Decision(False, rule.name, f"denied by rule {rule.name!r}", audit, dry)
        if self._allow:
            for rule in self._allow:
                if not rule.needs_http and rule.match_connection(principal, namespace):
                    return Decision(True, rule.name, f"allowed by rule {rule.name!r}", audit, dry)
            return Decision(False, None, "no ALLOW rule matched a TCP connection", audit, dry)
        if self.default == "deny":
            return Decision(False, None, "denied by default (no ALLOW rule)", audit, dry)
        if principal:
            return Decision(True, None, "authenticated peer (default)", audit, dry)
        return Decision(False, None, "no authenticated peer (default)", audit, dry)

    def decide(self, r: Request) -> Decision:
        """DENY first, then ALLOW, then the default; dry-run and audit rules are noted."""
        audit = tuple(x.name for x in self._audit if x.match(r))
        dry = tuple(
            f"{x.name}: would {'deny' if x.action == 'DENY' else 'allow'}"
            for x in self._dry
            if x.match(r)
        )
        for rule in self._deny:
            if rule.match(r):
                return Decision(False, rule.name, f"denied by rule {rule.name!r}", audit, dry)
        if self._allow:
            for rule in self._allow:
                if rule.match(r):
                    return Decision(True, rule.name, f"allowed by rule {rule.name!r}", audit, dry)
            return Decision(False, None, "no ALLOW rule matched", audit, dry)
        if self.default == "deny":
            return Decision(False, None, "denied by default (no ALLOW rule)", audit, dry)
        if r.principal:
            return Decision(True, None, "authenticated peer (default)", audit, dry)
        return Decision(False, None, "no authenticated peer (default)", audit, dry)


_FROM = ("principals", "namespaces", "request_principals")
_TO = ("paths", "methods")


def _patterns(value: Any, where: str, problems: list[str], spiffe: bool) -> tuple[Pattern, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        problems.append(f"{where}: must be a non-empty list of strings")
        return ()
    out = []
    for v in value:
        if spiffe and not v.startswith(("spiffe://", "*")):
            v = "spiffe://" + v  # Istio writes principals without the scheme
        try:
            out.append(Pattern.parse(v))
        except ValueError as e:
            problems.append(f"{where}: {e}")
    return tuple(out)


def parse_policy(
    doc: Any, source: str = "(inline)", issuers: tuple[str, ...] | None = None
) -> Policy:
    """Compile a policy document; PolicyError listing every problem by field.

    `issuers` (the configured JWT issuers) bind request principals to an issuer and a
    subject part (see PrincipalPattern); a pattern that could name two is refused."""
    problems: list[str] = []
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise PolicyError(["(top level): must be a mapping with 'rules'"])
    for k in doc:
        if k not in ("default", "rules"):
            problems.append(f"{k}: unknown key")
    default = doc.get("default", "allow-authenticated")
    if default not in DEFAULTS:
        problems.append(f"default: must be one of {', '.join(DEFAULTS)}")
    raw_rules = doc.get("rules", [])
    if not isinstance(raw_rules, list):
        problems.append("rules: must be a list")
        raw_rules = []
    rules: list[Rule] = []
    names: set[str] = set()
    for i, raw in enumerate(raw_rules):
        where = f"rules[{i}]"
        if not isinstance(raw, dict):
            problems.append(f"{where}: must be a mapping")
            continue
        for k in raw:
            if k not in ("name", "action", "dry_run", "from", "to", "when"):
                problems.append(f"{where}.{k}: unknown key")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            problems.append(f"{where}.name: required")
            name = f"rule-{i}"
        elif name in names:
            problems.append(f"{where}.name: {name!r} is used twice")
        names.add(name)
        where = f"rules[{i}] ({name})"
        action = raw.get("action")
        if action not in ACTIONS:
            problems.append(f"{where}.action: must be one of {', '.join(ACTIONS)}")
        dry = raw.get("dry_run", False)
        if not isinstance(dry, bool):
            problems.append(f"{where}.dry_run: must be true or false")
        fields: dict[str, Any] = {}
        for section, keys in (("from", _FROM), ("to", _TO)):
            sec = raw.get(section, {})
            if not isinstance(sec, dict):
                problems.append(f"{where}.{section}: must be a mapping")
                continue
            allowed = set(keys) | {"not_" + k for k in keys}
            for k in sec:
                if k not in allowed:
                    problems.append(f"{where}.{section}.{k}: unknown key")
            for k in keys:
                for key in (k, "not_" + k):
                    if key not in sec:
                        continue
                    loc = f"{where}.{section}.{key}"
                    if k == "methods":
                        vals = sec[key]
                        if (
                            not isinstance(vals, list)
                            or not vals
                            or not all(isinstance(m, str) and m.isalpha() for m in vals)
                        ):
                            problems.append(f"{loc}: must be a non-empty list of methods")
                            continue
                        fields[key] = frozenset(m.upper() for m in vals)
                    elif k == "request_principals":
                        compiled = []
                        for pat in _patterns(sec[key], loc, problems, False):
                            try:
                                compiled.append(PrincipalPattern.compile(pat, issuers))
                            except ValueError as e:
                                problems.append(f"{loc}: {e}")
                        fields[key] = tuple(compiled)
                    else:
                        fields[key] = _patterns(sec[key], loc, problems, k == "principals")
                        if k == "paths":
                            for pat in fields[key]:
                                if pat.kind in ("exact", "prefix") and not pat.value.startswith(
                                    "/"
                                ):
                                    problems.append(f"{loc}: {pat.value!r} must start with '/'")
        when: list[Condition] = []
        raw_when = raw.get("when", [])
        if not isinstance(raw_when, list):
            problems.append(f"{where}.when: must be a list")
            raw_when = []
        for j, cond in enumerate(raw_when):
            loc = f"{where}.when[{j}]"
            if not isinstance(cond, dict):
                problems.append(f"{loc}: must be a mapping with claim and values")
                continue
            for k in cond:
                if k not in ("claim", "values", "not_values"):
                    problems.append(f"{loc}.{k}: unknown key")
            claim = cond.get("claim")
            path = (claim,) if isinstance(claim, str) else tuple(claim or ())
            if not path or not all(isinstance(c, str) and c for c in path):
                problems.append(f"{loc}.claim: a claim name (or a list of names for nested claims)")
                continue
            has_values, has_not = "values" in cond, "not_values" in cond
            if has_values == has_not:
                problems.append(f"{loc}: give exactly one of values or not_values")
                continue
            vals = cond["values" if has_values else "not_values"]
            if not isinstance(vals, list) or not vals:
                problems.append(f"{loc}: values must be a non-empty list")
                continue
            when.append(
                Condition(
                    path,
                    frozenset(str(v).lower() if isinstance(v, bool) else str(v) for v in vals),
                    negate=has_not,
                )
            )
        if action in ACTIONS and isinstance(dry, bool):
            rules.append(Rule(name=name, action=action, dry_run=dry, when=tuple(when), **fields))
    if problems:
        raise PolicyError(problems)
    return Policy.build(rules, default, source)


def load_policy(path: Path, issuers: tuple[str, ...] | None = None) -> Policy:
    """Read and compile a policy file; PolicyError naming every problem."""
    try:
        text = path.read_text()
    except OSError as e:
        raise PolicyError([f"{path}: cannot read ({e.strerror})"]) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise PolicyError(
            [f"{path}: not valid YAML" + (f" at line {mark.line + 1}" if mark else "")]
        ) from None
    return parse_policy(doc, str(path), issuers)
