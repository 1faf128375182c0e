"""What an output constraint may ask for, checked before og compiles it (guidance.py calls `problem`).

og 0.18's constraint compiler (llguidance) expands counts into grammar symbols and regex repetitions into lexer
states, and some of it happens only at the first token, after the prefill. Measured on the tiny fixture (og 0.18,
CPU): `maxItems` 10,000 compiles in 0.13 s (136 MB), 100,000 is a Rust panic ("grammar.symbols.len() < u16::MAX"),
10^7 aborts the process and `minItems` 10^9 allocated 22 GB until the OOM killer ended it; a regex `a{100000}` or
`(a{300}){300}` compiles (160 MB), `a{1000000}` fails at the first token ("too many expressions"); a Lark
`"a"~100000` fails at the first token, `~10000` works; `maxLength` 10^7 is cheap (strings are lexed, not
expanded). The limits below sit at or under what worked, in the spirit of OpenAI's strict-mode limits (5,000
properties, 1,000 enum values, bounded nesting and size). Each problem is one phrase naming the limit; the caller
puts the constraint's label in front.

And what has no finite answer: a `$ref` that reaches only itself (`{"$ref": "#"}` answers "" as if complete) or a
property that is required all the way down (og writes `{` and then fails mid-answer). A schema node is
"productive" when some finite JSON value satisfies its required structure; local `$ref` targets are solved like
the productive symbols of a grammar (an AND/OR circuit, below). It errs on the side of letting a schema through
(og still compiles what is left)."""

from __future__ import annotations

import json
import re
from urllib.parse import unquote

MAX_CHARS = 100_000  # the constraint's text (a schema as compact JSON, a regex, a grammar)
MAX_DEPTH = 64  # nesting of a schema's JSON (objects and lists)
MAX_COUNT = 10_000  # minItems, maxItems, minProperties, maxProperties, minContains, maxContains, Lark ~ n
MAX_LENGTH = 1_000_000  # minLength, maxLength
MAX_REPEAT = 100_000  # a regex's repetitions, multiplied through nested groups: (a{300}){300} is 90,000
MAX_PROPERTIES = 5_000  # properties over the whole schema (OpenAI's strict mode: 5,000)
MAX_ENUM = 1_000  # values of one enum (OpenAI's strict mode: 1,000)

COUNT_KEYS = ("minItems", "maxItems", "minProperties", "maxProperties", "minContains", "maxContains")
LENGTH_KEYS = ("minLength", "maxLength")
VALUE_KEYS = ("const", "enum", "default", "examples")  # data, not schemas: not walked for keywords
QUANTIFIER = re.compile(r"\{(\d+)(?:,(\d*))?\}")
LARK_REPEAT = re.compile(r"~\s*(\d+)(?:\s*\.\.\s*(\d+))?")
LARK_JSON = re.compile(r"%json\s*(?=\{)")


def problem(kind: str, data: str) -> str | None:
    """What is over a limit (or has no finite answer) in a constraint of og's `kind`, as a phrase; None if fine."""
    if len(data) > MAX_CHARS:
        return f"is {len(data):,} characters long: the limit is {MAX_CHARS:,}"
    if kind == "regex":
        return regex_problem(data)
    if kind == "lark_grammar":
        return lark_problem(data)
    try:
        schema = json.loads(data)
    except RecursionError:
        return f"nests deeper than {MAX_DEPTH} levels"
    except ValueError:
        return None  # og says what is wrong with it
    return schema_problem(schema)


def schema_problem(schema: object) -> str | None:
    """Counts, lengths, patterns, sizes and nesting of a JSON schema, then whether it has a finite answer."""
    found = _walk(schema, "#", 0, [0])
    return found or _unproductive(schema)


def _walk(node: object, where: str, depth: int, properties: list[int]) -> str | None:
    if depth > MAX_DEPTH:
        return f"nests deeper than {MAX_DEPTH} levels"
    if isinstance(node, list):
        for i, item in enumerate(node):
            found = _walk(item, f"{where}/{i}", depth + 1, properties)
            if found:
                return found
        return None
    if not isinstance(node, dict):
        return None
    found = _keywords(node, where, properties)
    if found:
        return found
    for key, value in node.items():
        if key in VALUE_KEYS:
            continue
        found = _walk(value, f"{where}/{_escape(key)}", depth + 1, properties)
        if found:
            return found
    return None


def _keywords(node: dict, where: str, properties: list[int]) -> str | None:
    for keys, limit in ((COUNT_KEYS, MAX_COUNT), (LENGTH_KEYS, MAX_LENGTH)):
        for key in keys:
            value = node.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > limit:
                return f"asks for {key} {_number(value)} at {where}: the limit is {limit:,}"
    enum = node.get("enum")
    if isinstance(enum, list) and len(enum) > MAX_ENUM:
        return f"has an enum of {len(enum):,} values at {where}: the limit is {MAX_ENUM:,}"
    props = node.get("properties")
    if isinstance(props, dict):
        properties[0] += len(props)
        if properties[0] > MAX_PROPERTIES:
            return f"has more than {MAX_PROPERTIES:,} properties in all: the limit is {MAX_PROPERTIES:,}"
    patterns = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
    if isinstance(node.get("patternProperties"), dict):
        patterns += list(node["patternProperties"])
    for pattern in patterns:
        found = regex_problem(pattern)
        if found:
            return f"has a pattern at {where} that {found}"
    return None


def regex_problem(pattern: str) -> str | None:
    """A regex whose repetitions, multiplied through nested groups, exceed MAX_REPEAT."""
    size = _repeat_size(pattern)
    if size > MAX_REPEAT:
        return f"repeats {_number(size)} times in all: the limit is {MAX_REPEAT:,} (counted through nested groups)"
    return None


def _repeat_size(pattern: str) -> int:
    """The regex expanded: every atom counts 1, a group the sum of its parts, `{n,m}` multiplies what it follows
    by its larger bound (`{n,}` by n). Escapes and classes are atoms; this is an estimate, not a regex parser."""
    stack: list[list[int]] = [[]]  # per open group: the sizes of its items
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            stack[-1].append(1)
            i += 2
            continue
        if c == "[":
            i = _class_end(pattern, i)
            stack[-1].append(1)
            continue
        if c == "(":
            stack.append([])
        elif c == ")" and len(stack) > 1:
            inner = stack.pop()
            stack[-1].append(max(sum(inner), 1))
        elif c == "{" and stack[-1] and (m := QUANTIFIER.match(pattern, i)):
            low, high = int(m.group(1)), m.group(2)
            times = max(low, int(high)) if high else low
            stack[-1][-1] = stack[-1][-1] * max(times, 1)
            i = m.end()
            continue
        elif c not in "|*+?^$":
            stack[-1].append(1)
        i += 1
    while len(stack) > 1:
        inner = stack.pop()
        stack[-1].append(sum(inner))
    return sum(stack[0])


def _class_end(pattern: str, i: int) -> int:
    """The index after the `]` that closes the class opening at i."""
    j = i + 1
    if pattern.startswith("^", j):
        j += 1
    if pattern.startswith("]", j):
        j += 1
    while j < len(pattern) and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
    return j + 1


def lark_problem(grammar: str) -> str | None:
    """A Lark grammar's `~ n..m` counts, its regexes' `{n,m}`, and the schemas of its `%json{...}`."""
    for m in LARK_REPEAT.finditer(grammar):
        value = max(int(m.group(1)), int(m.group(2) or 0))
        if value > MAX_COUNT:
            return f"repeats {_number(value)} times (~): the limit is {MAX_COUNT:,}"
    for m in QUANTIFIER.finditer(grammar):
        value = max(int(m.group(1)), int(m.group(2) or 0))
        if value > MAX_REPEAT:
            return f"repeats {_number(value)} times ({{}}): the limit is {MAX_REPEAT:,}"
    decoder = json.JSONDecoder()
    for m in LARK_JSON.finditer(grammar):
        try:
            schema, _ = decoder.raw_decode(grammar, m.end())
        except RecursionError:
            return f"has a %json schema that nests deeper than {MAX_DEPTH} levels"
        except ValueError:
            continue  # og says what is wrong with it
        found = schema_problem(schema)
        if found:
            return f"has a %json schema that {found}"
    return None


# -- a finite answer -------------------------------------------------------------------------------------------------
# The schema as an AND/OR circuit, one gate per schema object (and per allOf/anyOf/type choice), solved like Horn
# clauses: a gate becomes true when all (AND) or one (OR) of its inputs are; each edge is looked at once, so a
# schema of 100,000 characters is decided in milliseconds whatever the order of its $defs (a fixed point over
# passes took 4.5 s for a chain of 1,000 references listed backwards). Built without recursion: a chain of
# references can be longer than Python's stack.

class _Circuit:
    def __init__(self, root: object):
        self.root = root
        self.need: list[int] = []  # inputs still false: an AND needs all of them, an OR one
        self.users: list[list[int]] = []  # gates that take this gate as an input
        self.gate_of: dict[int, int] = {}  # id(schema object) -> its gate
        self.todo: list[tuple[int, object]] = []
        self.refs: dict[str, int] = {}  # local $ref -> its target's gate, in the order they are met
        self.true: set[int] = set()

    def gate(self, inputs: list[int], all_of: bool) -> int:
        g = len(self.need)
        self.need.append(len(inputs) if all_of else min(len(inputs), 1))
        self.users.append([])
        for i in inputs:
            self.users[i].append(g)
        if not all_of and not inputs:
            self.need[g] = -1  # an OR of nothing is never true
        return g

    def node(self, schema: object) -> int:
        """The gate of a schema object (made once; expanded later, so cycles and long chains need no stack)."""
        if not isinstance(schema, dict):
            return self.gate([], schema is not False)
        if id(schema) not in self.gate_of:
            g = len(self.need)
            self.need.append(0)
            self.users.append([])
            self.gate_of[id(schema)] = g
            self.todo.append((g, schema))
        return self.gate_of[id(schema)]

    def expand(self, g: int, schema: dict) -> None:
        conditions: list[int] = []
        ref = schema.get("$ref")
        target = _resolve(self.root, ref) if isinstance(ref, str) and ref.startswith("#") else None
        if target is not None:
            self.refs.setdefault(ref, self.node(target))
            conditions.append(self.refs[ref])
        if isinstance(schema.get("allOf"), list):
            conditions += [self.node(s) for s in schema["allOf"]]
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list) and schema[key]:
                conditions.append(self.gate([self.node(s) for s in schema[key]], all_of=False))
        conditions.append(self.type_gate(schema))
        self.need[g] = len(conditions)
        for c in conditions:
            self.users[c].append(g)

    def type_gate(self, schema: dict) -> int:
        types = schema.get("type")
        types = [types] if isinstance(types, str) else types if isinstance(types, list) else None
        if "const" in schema or "enum" in schema or types is None or any(t not in ("object", "array")
                                                                           for t in types):
            return self.gate([], all_of=True)  # a scalar (or a listed value) satisfies it
        options = []
        if "object" in types:
            props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
            extra = schema.get("additionalProperties", True)
            required = schema.get("required") if isinstance(schema.get("required"), list) else []
            options.append(self.gate([self.node(props.get(n, extra)) for n in required if isinstance(n, str)],
                                     all_of=True))
        if "array" in types:
            least = schema.get("minItems", 0)
            least = least if isinstance(least, int) and not isinstance(least, bool) else 0
            prefix = schema.get("prefixItems") if isinstance(schema.get("prefixItems"), list) else []
            inputs = [self.node(s) for s in prefix[:least]]
            if least > len(prefix):
                inputs.append(self.node(schema.get("items", True)))
            options.append(self.gate(inputs, all_of=True))
        return self.gate(options, all_of=False)

    def solve(self) -> None:
        while self.todo:
            self.expand(*self.todo.pop())
        ready = [g for g, n in enumerate(self.need) if n == 0]
        while ready:
            g = ready.pop()
            if g in self.true:
                continue
            self.true.add(g)
            for user in self.users[g]:
                self.need[user] -= 1
                if self.need[user] == 0:
                    ready.append(user)


def _unproductive(schema: object) -> str | None:
    """Whether some finite value satisfies the schema's required structure, and every local $ref target too (an
    optional reference that never ends is refused as well: the model could start it)."""
    circuit = _Circuit(schema)
    root = circuit.node(schema)
    for ref in _local_refs(schema):  # optional places too: every reference must be able to end
        target = _resolve(schema, ref)
        if target is not None:
            circuit.refs.setdefault(ref, circuit.node(target))
    circuit.solve()
    stuck = [ref for ref, g in circuit.refs.items() if g not in circuit.true]
    if not stuck and root in circuit.true:
        return None
    via = f' (through "$ref": {json.dumps(stuck[0])})' if stuck else ""
    return (f"has no finite answer{via}: a $ref loop or a property required at every level of a recursion "
            f"(give the recursion a way out: make the property optional, or allow an empty list)")


def _local_refs(node: object, found: dict[str, None] | None = None) -> list[str]:
    """Every local `$ref` (`#...`) in the schema, once each (the nesting is bounded by MAX_DEPTH by now)."""
    found = {} if found is None else found
    if isinstance(node, list):
        for item in node:
            _local_refs(item, found)
    elif isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            found.setdefault(ref)
        for key, value in node.items():
            if key not in VALUE_KEYS:
                _local_refs(value, found)
    return list(found)


def _resolve(root: object, ref: str) -> object:
    """The schema a local JSON-pointer `$ref` names (None when it names none: og reports those)."""
    node = root
    for part in [p for p in unquote(ref[1:]).split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) or value != value or abs(value) == float("inf") else f"{value:,.0f}"
