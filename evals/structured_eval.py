"""Structured-output and tool-calling eval (a command, not a test).

Runs requests through OpenMini's Chat Completions serving path (``parse_chat_request`` ->
``ChatCompletionService.prepare`` -> engine -> the OpenAI response body), all of them at
once so the engine batches them, greedy, fp32:

1. JSON schemas: `SCHEMAS` (>= 50 varied schemas, each with a prompt) as
   ``response_format: json_schema`` with ``strict: true``. Reported: the share of outputs
   that parse and validate (``jsonschema``, Draft 2020-12 with format checks), the share
   cut off by ``max_tokens`` (finish_reason ``length``), and the share valid among the
   outputs that finished.
2. Tool calling: `TOOL_PROMPTS` (>= 30 prompts, each with 1-3 tools) in ``required`` and
   named (``{"type": "function", ...}`` of the tool the prompt needs) mode: the share of
   calls that name a listed tool with schema-valid arguments (all calls, and the calls not
   cut off by ``max_tokens``), and in ``auto`` mode the share of prompts answered with a
   call (the call rate) and with the expected tool.

Usage::

    python evals/structured_eval.py [--model smollm2-135m-instruct] [--max-tokens 256]
        [--json out.json] [--limit N]

Prints a Markdown summary (docs/structured_outputs.md quotes it).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import re
import sys
import time
from typing import Any

import jsonschema

from openmini.api.chat_schema import parse_chat_request
from openmini.config import CacheConfig, EngineConfig, SchedulerConfig
from openmini.serving.chat import ChatCompletionService
from openmini.serving.errors import OpenAIError


def obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    """A strict object schema (every property required, no others), as SDKs send them."""
    return {"type": "object", "properties": props,
            "required": list(props) if required is None else required,
            "additionalProperties": False}


S, I, N, B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}


def arr(items: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"type": "array", "items": items, **kw}


def enum(*values: Any) -> dict[str, Any]:
    return {"enum": list(values)}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


ADDRESS = obj({"street": S, "city": S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
               "country": S})
TREE = {"$defs": {"node": obj({"name": S, "children": arr({"$ref": "#/$defs/node"})})},
        "$ref": "#/$defs/node"}

SCHEMAS: list[tuple[str, str, dict[str, Any]]] = [
    ("person", "Describe a fictional person: name, age and email.",
     obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 130},
          "email": {"type": "string", "format": "email"}})),
    ("address", "Give the address of a bakery in Berlin.", ADDRESS),
    ("product", "Describe a laptop for an online shop.",
     obj({"name": S, "price": {"type": "number", "minimum": 0}, "in_stock": B,
          "tags": arr(S, maxItems=5)})),
    ("sentiment", "Classify the sentiment of: 'I love this phone, the battery is great.'",
     obj({"sentiment": enum("positive", "negative", "neutral"),
          "confidence": {"type": "number", "minimum": 0, "maximum": 1}})),
    ("capital", "What is the capital of France?", obj({"country": S, "capital": S})),
    ("math", "Solve 8x + 7 = -23 step by step.",
     {"$defs": {"step": obj({"explanation": S, "output": S})},
      **obj({"steps": arr({"$ref": "#/$defs/step"}), "final_answer": S})}),
    ("event", "Extract the event: 'Alice and Bob go to a science fair on Friday.'",
     obj({"name": S, "date": S, "participants": arr(S)})),
    ("recipe", "Give a short pancake recipe.",
     obj({"title": S, "servings": I, "ingredients": arr(obj({"item": S, "amount": S})),
          "steps": arr(S)})),
    ("weather", "Report the weather in Oslo today (make it up).",
     obj({"city": S, "temperature_c": N, "condition": enum("sunny", "cloudy", "rain", "snow"),
          "wind_kmh": {"type": "number", "minimum": 0}})),
    ("todo", "Make a todo list with three tasks for moving house.",
     obj({"todos": arr(obj({"task": S, "done": B, "priority": enum("low", "medium", "high")}),
                       minItems=1, maxItems=5)})),
    ("movie", "Review the movie Inception.",
     obj({"title": S, "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
          "rating": {"type": "integer", "minimum": 1, "maximum": 10}, "summary": S})),
    ("book", "Describe the book 'Moby Dick'.",
     obj({"title": S, "author": S, "published": I, "genres": arr(S, maxItems=3)})),
    ("issue", "File a bug report: the login button does nothing on mobile.",
     obj({"title": S, "severity": enum("low", "medium", "high", "critical"),
          "steps_to_reproduce": arr(S), "labels": arr(S)})),
    ("calendar", "Create a calendar entry for a dentist appointment.",
     obj({"title": S, "date": {"type": "string", "format": "date"},
          "start_time": {"type": "string", "format": "time"}, "location": nullable(S)})),
    ("flight", "Book a flight from Paris to Tokyo for two adults.",
     obj({"origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
          "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
          "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
          "class": enum("economy", "business", "first")})),
    ("profile", "Create a user profile with a home address.",
     obj({"username": S, "age": I, "address": ADDRESS, "verified": B})),
    ("order", "Create an order of two items from a stationery shop.",
     obj({"order_id": S, "items": arr(obj({"sku": S, "qty": {"type": "integer", "minimum": 1},
                                           "unit_price": N}), minItems=1),
          "total": N})),
    ("entities", "List the people and places in: 'Marie Curie moved from Warsaw to Paris.'",
     obj({"people": arr(S), "places": arr(S)})),
    ("classify", "Is this email spam? 'You won a free cruise, click here!'",
     obj({"is_spam": B, "reason": S})),
    ("geo", "Give the coordinates of Rome.",
     obj({"name": S, "lat": {"type": "number", "minimum": -90, "maximum": 90},
          "lon": {"type": "number", "minimum": -180, "maximum": 180}})),
    ("settings", "Give app settings for dark mode with large font.",
     obj({"theme": enum("light", "dark"), "font_size": enum("small", "medium", "large"),
          "notifications": B})),
    ("matrix", "Give a 2x2 identity matrix.",
     obj({"rows": arr(arr(I, minItems=2, maxItems=2), minItems=2, maxItems=2)})),
    ("tuple", "Give a point as [label, x, y].",
     {"type": "array", "prefixItems": [S, N, N], "items": False, "minItems": 3}),
    ("version", "Describe API version 2 of a service.",
     obj({"api_version": {"const": 2}, "name": S, "deprecated": B})),
    ("uuid", "Create a record with a random UUID id.",
     obj({"id": {"type": "string", "format": "uuid"}, "label": S})),
    ("filesystem", "Describe a small folder tree for a Python project.", TREE),
    ("shape", "Describe a circle of radius 2.",
     {"anyOf": [obj({"kind": {"const": "circle"}, "radius": N}),
                obj({"kind": {"const": "rectangle"}, "width": N, "height": N})]}),
    ("nullable", "Give a contact; the phone number is unknown.",
     obj({"name": S, "phone": nullable(S), "email": nullable(S)})),
    ("optional", "Describe a city; population is optional.",
     obj({"name": S, "population": I}, required=["name"])),
    ("invoice", "Create an invoice for 3 hours of consulting at 100 EUR per hour.",
     obj({"invoice_number": S, "currency": enum("EUR", "USD", "GBP"),
          "lines": arr(obj({"description": S, "hours": N, "rate": N})), "total": N})),
    ("quiz", "Write a quiz question about the solar system.",
     obj({"question": S, "choices": arr(S, minItems=4, maxItems=4),
          "answer_index": {"type": "integer", "minimum": 0, "maximum": 3}})),
    ("translation", "Translate 'good morning' to Spanish.",
     obj({"source": S, "target_language": S, "translation": S})),
    ("color", "Pick a color for a calm bedroom.",
     obj({"name": S, "hex": {"type": "string", "pattern": "^#[0-9a-fA-F]{6}$"}})),
    ("stock", "Give a stock quote for a fictional company.",
     obj({"ticker": {"type": "string", "pattern": "^[A-Z]{1,5}$"}, "price": N,
          "change_pct": N})),
    ("meeting", "Summarise a meeting about the Q3 budget.",
     obj({"topic": S, "decisions": arr(S), "action_items": arr(obj({"owner": S, "task": S}))})),
    ("employee", "Describe an employee record.",
     obj({"id": I, "name": S, "department": enum("sales", "engineering", "hr", "finance"),
          "manager_id": nullable(I)})),
    ("http", "Describe an HTTP request that fetches user 42.",
     obj({"method": enum("GET", "POST", "PUT", "DELETE"), "path": S,
          "headers": {"type": "object", "additionalProperties": S}})),
    ("counts", "Count the words 'the', 'cat' in: 'the cat saw the dog'.",
     {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}),
    ("playlist", "Make a playlist of three jazz songs.",
     obj({"name": S, "songs": arr(obj({"title": S, "artist": S,
                                       "seconds": {"type": "integer", "minimum": 1}}))})),
    ("ip", "Describe a server with its IPv4 address.",
     obj({"hostname": S, "ip": {"type": "string", "format": "ipv4"}, "port": I})),
    ("datetime", "When did the first moon landing happen?",
     obj({"event": S, "timestamp": {"type": "string", "format": "date-time"}})),
    ("yesno", "Is water wet? Answer yes or no.", obj({"answer": enum("yes", "no")})),
    ("number", "How many legs does a spider have?", {"type": "integer"}),
    ("list", "List three primary colors.", arr(S, minItems=3, maxItems=3)),
    ("string", "Give a one-word synonym of 'happy'.", {"type": "string", "maxLength": 20}),
    ("pet", "Describe a pet.",
     {"$defs": {"owner": obj({"name": S})},
      **obj({"species": enum("cat", "dog", "fish", "bird"), "name": S,
             "owner": {"$ref": "#/$defs/owner"}})}),
    ("team", "Describe a football team with two players.",
     obj({"name": S, "players": arr(obj({"name": S, "number": I,
                                         "position": enum("GK", "DF", "MF", "FW")}))})),
    ("receipt", "Make a grocery receipt with two lines.",
     obj({"store": S, "lines": arr(obj({"item": S, "price": {"type": "number",
                                                             "exclusiveMinimum": 0}})),
          "paid": B})),
    ("language", "Detect the language of 'Bonjour tout le monde'.",
     obj({"language": S, "iso_code": {"type": "string", "pattern": "^[a-z]{2}$"}})),
    ("summary", "Summarise: 'The cat sat on the mat all day and slept.'",
     obj({"summary": {"type": "string", "maxLength": 120}, "keywords": arr(S, maxItems=4)})),
    ("unit", "Convert 5 km to miles.",
     obj({"value": N, "from_unit": S, "to_unit": S, "result": N})),
    ("dict_of_lists", "Group these animals by class: cat, eagle, shark.",
     {"type": "object", "additionalProperties": arr(S)}),
    ("all_of", "Describe a car with a VIN.",
     {"allOf": [{"type": "object", "properties": {"make": S, "model": S},
                 "required": ["make", "model"]},
                {"type": "object", "properties": {"vin": S}, "required": ["vin"]}]}),
    ("json_object", "Give any JSON object describing yourself.", {"type": "object"}),
]


def tool(name: str, description: str, params: dict[str, Any], strict: bool = True
         ) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": params, "strict": strict}}


T = {
    "weather": tool("get_weather", "Get the current weather for a city.",
                    obj({"location": S, "unit": enum("celsius", "fahrenheit")})),
    "time": tool("get_time", "Get the current time in a timezone.", obj({"timezone": S})),
    "calc": tool("calculate", "Evaluate an arithmetic expression.", obj({"expression": S})),
    "search": tool("web_search", "Search the web.",
                   obj({"query": S, "max_results": {"type": "integer", "minimum": 1,
                                                    "maximum": 10}})),
    "email": tool("send_email", "Send an email.",
                  obj({"to": {"type": "string", "format": "email"}, "subject": S, "body": S})),
    "event": tool("create_event", "Create a calendar event.",
                  obj({"title": S, "date": {"type": "string", "format": "date"},
                       "duration_minutes": {"type": "integer", "minimum": 1}})),
    "fx": tool("convert_currency", "Convert an amount between currencies.",
               obj({"amount": N, "from": {"type": "string", "pattern": "^[A-Z]{3}$"},
                    "to": {"type": "string", "pattern": "^[A-Z]{3}$"}})),
    "translate": tool("translate", "Translate text.", obj({"text": S, "target_language": S})),
    "stock": tool("get_stock_price", "Get a stock price.",
                  obj({"ticker": {"type": "string", "pattern": "^[A-Z]{1,5}$"}})),
    "write": tool("write_file", "Write a file.", obj({"path": S, "content": S})),
    "read": tool("read_file", "Read a file.", obj({"path": S})),
    "flight": tool("search_flights", "Search flights.",
                   obj({"origin": S, "destination": S, "date": {"type": "string",
                                                                "format": "date"}})),
    "reminder": tool("set_reminder", "Set a reminder.",
                     obj({"text": S, "minutes_from_now": {"type": "integer", "minimum": 1}})),
    "music": tool("play_music", "Play music.",
                  obj({"artist": nullable(S), "genre": enum("jazz", "rock", "pop",
                                                            "classical")})),
    "lights": tool("set_lights", "Turn lights on or off.",
                   obj({"room": S, "on": B, "brightness": {"type": "integer", "minimum": 0,
                                                           "maximum": 100}})),
    "db": tool("query_database", "Run a read-only SQL query.", obj({"sql": S}), strict=False),
}

TOOL_PROMPTS: list[tuple[str, list[str], str]] = [
    ("What's the weather in Oslo right now?", ["weather", "time"], "get_weather"),
    ("What time is it in Tokyo?", ["weather", "time"], "get_time"),
    ("What is 234 * 19?", ["calc", "search"], "calculate"),
    ("Search the web for the latest Python release.", ["search", "calc"], "web_search"),
    ("Email bob@example.com that the meeting moved to 3pm.", ["email", "event"],
     "send_email"),
    ("Put a 30 minute dentist appointment on 2025-03-14 in my calendar.", ["event", "email"],
     "create_event"),
    ("Convert 100 USD to EUR.", ["fx", "calc"], "convert_currency"),
    ("Translate 'thank you' into Japanese.", ["translate", "search"], "translate"),
    ("How much is AAPL stock trading at?", ["stock", "search"], "get_stock_price"),
    ("Save 'hello world' to notes.txt.", ["write", "read"], "write_file"),
    ("Show me what is in config.yaml.", ["read", "write"], "read_file"),
    ("Find flights from Paris to Rome on 2025-06-01.", ["flight", "weather"],
     "search_flights"),
    ("Remind me to call mom in 20 minutes.", ["reminder", "event"], "set_reminder"),
    ("Play some jazz.", ["music", "lights"], "play_music"),
    ("Turn off the kitchen lights.", ["lights", "music"], "set_lights"),
    ("How many users signed up yesterday? Use the database.", ["db", "calc"],
     "query_database"),
    ("Is it raining in London?", ["weather"], "get_weather"),
    ("What's 15% of 80?", ["calc"], "calculate"),
    ("Look up who won the 2018 World Cup.", ["search"], "web_search"),
    ("Send an email to alice@example.org saying hi.", ["email"], "send_email"),
    ("Convert 50 GBP into JPY.", ["fx"], "convert_currency"),
    ("Translate 'where is the station' to German.", ["translate"], "translate"),
    ("What's the price of MSFT?", ["stock"], "get_stock_price"),
    ("Create a file hello.py that prints hello.", ["write"], "write_file"),
    ("Dim the living room lights to 30 percent.", ["lights"], "set_lights"),
    ("What's the temperature in Cairo in fahrenheit?", ["weather", "fx", "time"],
     "get_weather"),
    ("What time is it in New York?", ["time", "calc", "search"], "get_time"),
    ("Add a team lunch on 2025-05-02 for 90 minutes.", ["event", "reminder", "email"],
     "create_event"),
    ("Read the file todo.md.", ["read", "search", "write"], "read_file"),
    ("Play classical music by Bach.", ["music", "search"], "play_music"),
    ("Remind me in 45 minutes to take the laundry out.", ["reminder", "lights"],
     "set_reminder"),
    ("Compute (17 + 25) / 6.", ["calc", "stock"], "calculate"),
]


# ---- running ------------------------------------------------------------------------------------


async def _run_all(service: ChatCompletionService, bodies: list[dict[str, Any]]
                   ) -> list[dict[str, Any] | OpenAIError]:
    async def one(body: dict[str, Any]) -> dict[str, Any] | OpenAIError:
        try:
            return await service.create(service.prepare(parse_chat_request(body)))
        except OpenAIError as exc:
            return exc
    return await asyncio.gather(*(one(b) for b in bodies))


_DATE_TIME = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
"""RFC 3339 section 5.6 ``date-time`` (jsonschema checks it only with an extra package)."""
_TIME = re.compile(r"^\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
"""RFC 3339 ``full-time`` (the same)."""


def _validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """Draft 2020-12 with its format checks (``FormatChecker()`` without a draft would mix
    in draft 3's ``time``, which rejects RFC 3339 offsets) plus ``date-time`` and ``time``."""
    checker = copy.deepcopy(jsonschema.Draft202012Validator.FORMAT_CHECKER)
    checker.checks("date-time")(lambda s: not isinstance(s, str) or bool(_DATE_TIME.match(s)))
    checker.checks("time")(lambda s: not isinstance(s, str) or bool(_TIME.match(s)))
    return jsonschema.Draft202012Validator(schema, format_checker=checker)


def eval_schemas(service, model: str, max_tokens: int, limit: int | None) -> dict[str, Any]:
    items = SCHEMAS[:limit] if limit else SCHEMAS
    bodies = [{"model": model, "temperature": 0, "max_tokens": max_tokens,
               "messages": [{"role": "user", "content": prompt + " Reply in JSON."}],
               "response_format": {"type": "json_schema", "json_schema": {
                   "name": name, "schema": schema, "strict": True}}}
              for name, prompt, schema in items]
    results = asyncio.run(_run_all(service, bodies))
    valid = cut = finished_valid = finished = 0
    failures: list[tuple[str, str]] = []
    cut_examples: list[tuple[str, str]] = []
    for (name, _, schema), res in zip(items, results):
        if isinstance(res, OpenAIError):
            failures.append((name, f"HTTP {res.status}: {res.message[:80]}"))
            continue
        choice = res["choices"][0]
        if choice["finish_reason"] == "length":
            cut += 1
            cut_examples.append((name, (choice["message"]["content"] or "")[-160:]))
        else:
            finished += 1
        try:
            _validator(schema).validate(json.loads(choice["message"]["content"]))
        except (ValueError, jsonschema.ValidationError) as exc:
            if choice["finish_reason"] != "length":
                failures.append((name, str(exc)[:120]))
            continue
        valid += 1
        finished_valid += choice["finish_reason"] != "length"
    n = len(items)
    return {"schemas": n, "valid": valid, "valid_pct": 100 * valid / n, "cut_off": cut,
            "valid_of_finished_pct": 100 * finished_valid / max(finished, 1),
            "failures": failures, "cut_off_tails": cut_examples}


def eval_tools(service, model: str, max_tokens: int, limit: int | None) -> dict[str, Any]:
    items = TOOL_PROMPTS[:limit] if limit else TOOL_PROMPTS
    out: dict[str, Any] = {"prompts": len(items)}
    for mode in ("required", "named", "auto"):
        bodies = []
        for prompt, keys, expected in items:
            choice: Any = mode if mode != "named" else {"type": "function",
                                                       "function": {"name": expected}}
            bodies.append({"model": model, "temperature": 0, "max_tokens": max_tokens,
                           "messages": [{"role": "user", "content": prompt}],
                           "tools": [T[k] for k in keys], "tool_choice": choice})
        results = asyncio.run(_run_all(service, bodies))
        calls = good = complete = complete_good = with_call = expected_hit = cut = 0
        for (prompt, keys, expected), res in zip(items, results):
            if isinstance(res, OpenAIError):
                continue
            choice = res["choices"][0]
            was_cut = choice["finish_reason"] == "length"
            cut += was_cut
            tool_calls = choice["message"].get("tool_calls") or []
            with_call += bool(tool_calls)
            expected_hit += any(tc["function"]["name"] == expected for tc in tool_calls)
            schemas = {T[k]["function"]["name"]: T[k]["function"]["parameters"] for k in keys}
            for k, tc in enumerate(tool_calls):
                calls += 1
                finished = not (was_cut and k == len(tool_calls) - 1)  # not cut off
                complete += finished
                fn = tc["function"]
                try:
                    _validator(schemas[fn["name"]]).validate(json.loads(fn["arguments"]))
                except (KeyError, ValueError, jsonschema.ValidationError):
                    continue
                good += 1
                complete_good += finished
        out[mode] = {"with_call_pct": 100 * with_call / len(items),
                     "calls": calls, "valid_calls_pct": 100 * good / max(calls, 1),
                     "complete_calls": complete,
                     "valid_complete_calls_pct": 100 * complete_good / max(complete, 1),
                     "expected_tool_pct": 100 * expected_hit / len(items), "cut_off": cut}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--tool-max-tokens", type=int, default=128)
    ap.add_argument("--limit", type=int, default=None, help="first N items only (smoke run)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", choices=("schemas", "tools"), default=None)
    args = ap.parse_args(argv)

    from openmini.engine.async_engine import AsyncEngine
    engine = AsyncEngine.from_config(EngineConfig(
        model=args.model, dtype="float32", num_threads=args.threads, max_model_len=4096,
        cache=CacheConfig(kv_cache_memory=1 << 30),
        scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=4096)))
    service = ChatCompletionService(engine, "eval", "fp_eval")
    t0 = time.time()
    schemas = tools = None
    if args.only != "tools":
        schemas = eval_schemas(service, "eval", args.max_tokens, args.limit)
    t1 = time.time()
    if args.only != "schemas":
        tools = eval_tools(service, "eval", args.tool_max_tokens, args.limit)
    t2 = time.time()
    engine.shutdown()

    print(f"## {args.model}\n")
    if schemas is not None:
        _print_schemas(schemas, args.max_tokens, t1 - t0)
    if tools is not None:
        _print_tools(tools, args.tool_max_tokens, t2 - t1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "schemas": schemas, "tools": tools}, f, indent=2)
    return 0


def _print_schemas(schemas: dict[str, Any], max_tokens: int, seconds: float) -> None:
    print(f"JSON schemas (strict, greedy, max_tokens {max_tokens}, {seconds:.0f} s): "
          f"{schemas['valid']}/{schemas['schemas']} valid ({schemas['valid_pct']:.1f}%), "
          f"{schemas['cut_off']} cut off by max_tokens, "
          f"{schemas['valid_of_finished_pct']:.1f}% of finished outputs valid\n")
    for name, why in schemas["failures"]:
        print(f"- invalid: {name}: {why}")
    if schemas["cut_off_tails"]:
        print("\nCut off by max_tokens: " + ", ".join(n for n, _ in schemas["cut_off_tails"]))


def _print_tools(tools: dict[str, Any], max_tokens: int, seconds: float) -> None:
    print(f"\nTool calling ({tools['prompts']} prompts, max_tokens {max_tokens}, "
          f"{seconds:.0f} s):\n")
    print("| mode | answers with a call | calls valid (listed tool, schema-valid args) | "
          "complete calls valid | expected tool called | cut off by max_tokens |")
    print("|---|---|---|---|---|---|")
    for mode in ("required", "named", "auto"):
        m = tools[mode]
        print(f"| {mode} | {m['with_call_pct']:.1f}% | {m['valid_calls_pct']:.1f}% "
              f"({m['calls']} calls) | {m['valid_complete_calls_pct']:.1f}% "
              f"({m['complete_calls']}) | {m['expected_tool_pct']:.1f}% | {m['cut_off']} |")


if __name__ == "__main__":
    sys.exit(main())
