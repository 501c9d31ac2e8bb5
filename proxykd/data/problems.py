"""GSM8K-style arithmetic word problems: templates, a seeded generator, and a parser.

Each template is a question with named slots, a list of computation steps and the answer slot. The
generator fills the slots from a seeded RNG; `parse` recovers the slots from the question text (the
synthetic teacher sees only the text, like any black-box model). Train and held-out sets are
disjoint by construction: a problem belongs to the held-out set iff a hash of its question text
falls in the held-out bucket, whatever seed generated it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Callable

NAMES = {"She": ["Natalia", "Maya", "Olivia", "Priya", "Sofia", "Hana", "Lucia", "Grace", "Amara", "Elena"],
         "He": ["James", "Tomas", "Ravi", "Kenji", "Omar", "Liam", "Mateo", "Noah", "Felix", "Daniel"]}
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "cards", "shells", "books", "stamps", "eggs"]
THINGS = ["bike", "jacket", "game", "backpack", "lamp", "guitar"]
HELDOUT_BUCKETS = 10  # 1 in 10 question texts is held out.


@dataclasses.dataclass(frozen=True)
class Step:
  out: str  # the slot this step computes
  fn: Callable[[dict], int]
  calc: str  # the computation as written, e.g. "{a} + {b}"
  phrasings: tuple[str, ...]  # sentences; "{calc}" expands to "<calc> = <out>"


@dataclasses.dataclass(frozen=True)
class Template:
  name: str
  question: str
  draw: Callable[[random.Random], dict]  # the numeric slots
  steps: tuple[Step, ...]
  answer: str = "ans"


def _buy_give(r):
  a, b = r.randint(5, 40), r.randint(2, 30)
  return {"a": a, "b": b, "c": r.randint(1, a + b - 1)}


def _change(r):
  a, p = r.randint(2, 9), r.randint(2, 15)
  return {"a": a, "p": p, "bill": next(x for x in (20, 50, 100, 200) if x > a * p)}


def _share(r):
  c = r.randint(2, 8)
  return {"a": r.randint(2, 6), "b": c * r.randint(1, 6), "c": c}


def _weekly(r):
  return {"a": r.randint(5, 30), "b": r.randint(5, 40), "w": r.randint(2, 6)}


def _half(r):
  return {"a": 2 * r.randint(3, 30), "b": r.randint(1, 25)}


def _trip(r):
  return {"a": r.choice(range(30, 80, 5)), "b": r.randint(2, 5), "c": r.choice(range(20, 70, 5)), "d": r.randint(2, 4)}


def _savings(r):
  a, b = r.randint(5, 40), r.randint(3, 12)
  return {"a": a, "b": b, "c": r.randint(5, a * b - 1)}


TEMPLATES = (
    Template("buy_give",
             "{name} has {a} {items}. {Pron} buys {b} more {items} and then gives {c} {items} to {friend}. "
             "How many {items} does {name} have now?", _buy_give,
             (Step("s1", lambda v: v["a"] + v["b"], "{a} + {b}",
                   ("After buying, {name} has {calc} {items}.", "{name} first has {calc} {items}.",
                    "Buying {b} more gives {calc}.")),
              Step("ans", lambda v: v["s1"] - v["c"], "{s1} - {c}",
                   ("After giving {c} away, {name} has {calc} {items}.", "Then {calc} {items} are left.",
                    "Giving {c} to {friend} leaves {calc}.")))),
    Template("change",
             "{name} buys {a} {items} at ${p} each and pays with a ${bill} bill. How much change does {name} get?",
             _change,
             (Step("s1", lambda v: v["a"] * v["p"], "{a} x {p}",
                   ("The {items} cost {calc} dollars.", "{name} spends {a} x ${p} = ${s1}.",
                    "In total the {items} cost ${calc}.")),
              Step("ans", lambda v: v["bill"] - v["s1"], "{bill} - {s1}",
                   ("The change is {calc} dollars.", "So {name} gets back ${bill} - ${s1} = ${ans}.",
                    "{name} receives {calc} dollars in change.")))),
    Template("share",
             "{name} bakes {a} trays of {items} with {b} {items} on each tray. {Pron} shares them equally "
             "among {c} friends. How many {items} does each friend get?", _share,
             (Step("s1", lambda v: v["a"] * v["b"], "{a} x {b}",
                   ("There are {calc} {items} in total.", "{name} bakes {calc} {items}.",
                    "Altogether that is {calc} {items}.")),
              Step("ans", lambda v: v["s1"] // v["c"], "{s1} / {c}",
                   ("Each friend gets {calc} {items}.", "Sharing among {c} friends gives {calc} each.",
                    "So each of the {c} friends gets {calc}.")))),
    Template("weekly",
             "{name} reads {a} pages every weekday and {b} pages on each day of the weekend. "
             "How many pages does {name} read in {w} weeks?", _weekly,
             (Step("s1", lambda v: 5 * v["a"], "5 x {a}",
                   ("On weekdays {name} reads {calc} pages.", "The five weekdays give {calc} pages.",
                    "Weekdays: {calc} pages.")),
              Step("s2", lambda v: 2 * v["b"], "2 x {b}",
                   ("On the weekend {name} reads {calc} pages.", "The two weekend days give {calc} pages.",
                    "Weekend: {calc} pages.")),
              Step("s3", lambda v: v["s1"] + v["s2"], "{s1} + {s2}",
                   ("In one week that is {calc} pages.", "Each week {name} reads {calc} pages.",
                    "A whole week is {calc} pages.")),
              Step("ans", lambda v: v["s3"] * v["w"], "{s3} x {w}",
                   ("In {w} weeks {name} reads {calc} pages.", "Over {w} weeks that makes {calc} pages.",
                    "So {w} weeks give {calc} pages.")))),
    Template("half",
             "{name} had {a} {items}. {Pron} gave half of them to {friend} and then bought {b} more. "
             "How many {items} does {name} have now?", _half,
             (Step("s1", lambda v: v["a"] // 2, "{a} / 2",
                   ("Half of {a} is {calc}, so {name} keeps {s1} {items}.", "{name} keeps {calc} {items}.",
                    "After giving half away, {calc} {items} remain.")),
              Step("ans", lambda v: v["s1"] + v["b"], "{s1} + {b}",
                   ("After buying more, {name} has {calc} {items}.", "Then {calc} {items}.",
                    "Adding the {b} new ones gives {calc}.")))),
    Template("trip",
             "A train travels at {a} miles per hour for {b} hours and then at {c} miles per hour for {d} hours. "
             "How many miles does it travel in total?", _trip,
             (Step("s1", lambda v: v["a"] * v["b"], "{a} x {b}",
                   ("The first part covers {calc} miles.", "First leg: {calc} miles.",
                    "At {a} mph for {b} hours it goes {calc} miles.")),
              Step("s2", lambda v: v["c"] * v["d"], "{c} x {d}",
                   ("The second part covers {calc} miles.", "Second leg: {calc} miles.",
                    "At {c} mph for {d} hours it goes {calc} miles.")),
              Step("ans", lambda v: v["s1"] + v["s2"], "{s1} + {s2}",
                   ("In total the train travels {calc} miles.", "Together that is {calc} miles.",
                    "The whole trip is {calc} miles.")))),
    Template("savings",
             "{name} saves ${a} each week. After {b} weeks, {pron} spends ${c} on a {thing}. "
             "How much money does {name} have left?", _savings,
             (Step("s1", lambda v: v["a"] * v["b"], "{a} x {b}",
                   ("{name} saves {calc} dollars.", "After {b} weeks {name} has ${a} x {b} = ${s1}.",
                    "The savings come to {calc} dollars.")),
              Step("ans", lambda v: v["s1"] - v["c"], "{s1} - {c}",
                   ("After buying the {thing}, {calc} dollars are left.", "{name} has ${s1} - ${c} = ${ans} left.",
                    "So {calc} dollars remain.")))),
)


@dataclasses.dataclass(frozen=True)
class Problem:
  template: str
  question: str
  slots: dict  # every slot, the computed ones included
  answer: int


def solve(t: Template, slots: dict) -> dict:
  v = dict(slots)
  for s in t.steps:
    v[s.out] = s.fn(v)
  return v


def _fill(t: Template, r: random.Random) -> Problem:
  pron = r.choice(["She", "He"])
  name = r.choice(NAMES[pron])
  friend = r.choice([n for n in NAMES["She"] + NAMES["He"] if n != name])
  slots = {"name": name, "Pron": pron, "pron": pron.lower(), "friend": friend, "items": r.choice(ITEMS),
           "thing": r.choice(THINGS), **t.draw(r)}
  v = solve(t, slots)
  return Problem(t.name, t.question.format(**v), v, v[t.answer])


def is_heldout(question: str) -> bool:
  h = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big")
  return h % HELDOUT_BUCKETS == 0


def generate(n: int, split: str = "train", seed: int = 0) -> list[Problem]:
  """`n` distinct problems of `split` ("train" or "heldout"), deterministic in (split, seed)."""
  if split not in ("train", "heldout"):
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
  r = random.Random(f"{split}:{seed}")
  out, seen = [], set()
  while len(out) < n:
    p = _fill(r.choice(TEMPLATES), r)
    if p.question in seen or is_heldout(p.question) != (split == "heldout"):
      continue
    seen.add(p.question)
    out.append(p)
  return out


_SLOT = re.compile(r"\\\{(\w+)\\\}")
_SLOT_RE = {"name": r"[A-Z][a-z]+", "friend": r"[A-Z][a-z]+", "Pron": r"She|He", "pron": r"she|he",
            "items": r"[a-z]+", "thing": r"[a-z]+"}


def _compile(question: str) -> re.Pattern:
  seen: set[str] = set()

  def slot(m):
    k = m.group(1)
    if k in seen:
      return f"(?P={k})"
    seen.add(k)
    return f"(?P<{k}>{_SLOT_RE.get(k, r'[0-9]+')})"

  return re.compile(_SLOT.sub(slot, re.escape(question)))


_PATTERNS = tuple((t, _compile(t.question)) for t in TEMPLATES)


def parse(text: str) -> tuple[Template, dict] | None:
  """The template and solved slots of a generated problem found in `text`, or None."""
  for t, pat in _PATTERNS:
    m = pat.search(text)
    if m:
      slots = {k: (int(v) if v.isdigit() else v) for k, v in m.groupdict().items()}
      return t, solve(t, slots)
  return None
