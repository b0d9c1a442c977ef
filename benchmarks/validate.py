#!/usr/bin/env python3
"""Validate a benchmark JSON file against benchmarks/bench_schema.json, standard library only.

    python3 benchmarks/validate.py bench.json [more.json ...] [--schema benchmarks/bench_schema.json]

Implements the subset of JSON Schema (draft 2020-12) that the schema uses: type, enum, const,
properties, required, additionalProperties, items, minItems, minLength, pattern, minimum, maximum,
exclusiveMinimum, exclusiveMaximum, $ref to "#/$defs/...", anyOf, oneOf, allOf, if/then/else.
Any other keyword is an error, so the schema cannot silently rely on something unchecked.
Exit status 0 when every file is valid, 1 otherwise (each problem printed with its JSON path).
Warnings (printed, not failing) flag what the schema cannot: measured rows that do not say which
implementation ran them or in what precision ("none").
"""
import argparse
import json
import os
import re
import sys

ANNOTATIONS = {"$schema", "$id", "title", "description", "$comment", "$defs", "default", "examples"}
KEYWORDS = {
    "type", "enum", "const", "properties", "required", "additionalProperties", "items", "minItems",
    "minLength", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "$ref",
    "anyOf", "oneOf", "allOf", "if", "then", "else",
}


class SchemaError(Exception):
    """The schema itself uses something this checker does not implement."""


def type_matches(value, name):
    if name == "null":
        return value is None
    if name == "boolean":
        return isinstance(value, bool)
    if name == "integer":
        if isinstance(value, bool):
            return False
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "string":
        return isinstance(value, str)
    if name == "array":
        return isinstance(value, list)
    if name == "object":
        return isinstance(value, dict)
    raise SchemaError("unknown type name %r" % name)


def json_equal(a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


class Validator:
    def __init__(self, root):
        self.root = root

    def resolve(self, ref):
        if not ref.startswith("#/"):
            raise SchemaError("only local references '#/...' are supported, got %r" % ref)
        node = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise SchemaError("unresolvable reference %r" % ref)
            node = node[part]
        return node

    def errors(self, value, schema, path="$"):
        """Returns a list of 'path: problem' strings (empty when valid)."""
        if schema is True:
            return []
        if schema is False:
            return ["%s: no value is allowed here" % path]
        if not isinstance(schema, dict):
            raise SchemaError("a schema must be an object or a boolean, got %r" % (schema,))
        unknown = set(schema) - KEYWORDS - ANNOTATIONS
        if unknown:
            raise SchemaError("unsupported keywords %s at schema for %s" % (sorted(unknown), path))
        out = []
        if "$ref" in schema:
            out += self.errors(value, self.resolve(schema["$ref"]), path)
        if "type" in schema:
            names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            if not any(type_matches(value, n) for n in names):
                return out + ["%s: expected type %s, got %s" % (path, "/".join(names), type(value).__name__)]
        if "enum" in schema and not any(json_equal(value, e) for e in schema["enum"]):
            out.append("%s: %r is not one of %r" % (path, value, schema["enum"]))
        if "const" in schema and not json_equal(value, schema["const"]):
            out.append("%s: expected %r, got %r" % (path, schema["const"], value))
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if is_number:
            if "minimum" in schema and value < schema["minimum"]:
                out.append("%s: %r is below the minimum %r" % (path, value, schema["minimum"]))
            if "maximum" in schema and value > schema["maximum"]:
                out.append("%s: %r is above the maximum %r" % (path, value, schema["maximum"]))
            if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
                out.append("%s: %r must be > %r" % (path, value, schema["exclusiveMinimum"]))
            if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
                out.append("%s: %r must be < %r" % (path, value, schema["exclusiveMaximum"]))
        if isinstance(value, str):
            if "minLength" in schema and len(value) < schema["minLength"]:
                out.append("%s: string shorter than %d characters" % (path, schema["minLength"]))
            if "pattern" in schema and re.search(schema["pattern"], value) is None:
                out.append("%s: %r does not match %r" % (path, value, schema["pattern"]))
        if isinstance(value, list):
            if "minItems" in schema and len(value) < schema["minItems"]:
                out.append("%s: fewer than %d items" % (path, schema["minItems"]))
            if "items" in schema:
                for i, item in enumerate(value):
                    out += self.errors(item, schema["items"], "%s[%d]" % (path, i))
        if isinstance(value, dict):
            for key in schema.get("required", []):
                if key not in value:
                    out.append("%s: missing required field %r" % (path, key))
            properties = schema.get("properties", {})
            for key, item in value.items():
                if key in properties:
                    out += self.errors(item, properties[key], "%s.%s" % (path, key))
                elif "additionalProperties" in schema:
                    out += self.errors(item, schema["additionalProperties"], "%s.%s" % (path, key))
        for sub in schema.get("allOf", []):
            out += self.errors(value, sub, path)
        if "anyOf" in schema:
            if not any(not self.errors(value, sub, path) for sub in schema["anyOf"]):
                out.append("%s: matches none of the anyOf alternatives" % path)
        if "oneOf" in schema:
            matches = sum(1 for sub in schema["oneOf"] if not self.errors(value, sub, path))
            if matches != 1:
                out.append("%s: matches %d of the oneOf alternatives (exactly 1 needed)" % (path, matches))
        if "if" in schema:
            if not self.errors(value, schema["if"], path):
                if "then" in schema:
                    out += self.errors(value, schema["then"], path)
            elif "else" in schema:
                out += self.errors(value, schema["else"], path)
        return out


def unreported_rows(document):
    """One warning per field for the measured results rows whose implementation or
    compute_precision is "none": figures that cannot say what produced them."""
    rows = document.get("results", []) if isinstance(document, dict) else []
    measured = [(i, r) for i, r in enumerate(rows) if isinstance(r, dict) and r.get("status") == "measured"]
    out = []
    for key in ("implementation", "compute_precision"):
        silent = [i for i, r in measured if r.get(key) == "none"]
        if silent:
            out.append("%d of %d measured rows report %s 'none' (first: $.results[%d])" % (
                len(silent), len(measured), key, silent[0]))
    return out


def validate_file(path, schema):
    """Returns (problems, warnings)."""
    with open(path) as f:
        document = json.load(f)
    return Validator(schema).errors(document, schema), unreported_rows(document)


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="benchmark JSON files to check")
    parser.add_argument("--schema", default=os.path.join(here, "bench_schema.json"), help="the JSON Schema")
    args = parser.parse_args(argv)
    with open(args.schema) as f:
        schema = json.load(f)
    status = 0
    for path in args.files:
        warnings = []
        try:
            problems, warnings = validate_file(path, schema)
        except (OSError, ValueError) as e:
            problems = ["cannot read: %s" % e]
        except SchemaError as e:
            print("%s: schema error: %s" % (args.schema, e), file=sys.stderr)
            return 2
        if problems:
            status = 1
            print("%s: INVALID (%d problems)" % (path, len(problems)))
            for p in problems[:50]:
                print("  " + p)
            if len(problems) > 50:
                print("  ... and %d more" % (len(problems) - 50))
        else:
            print("%s: valid" % path)
        for w in warnings:
            print("  warning: " + w)
    return status


if __name__ == "__main__":
    sys.exit(main())
