"""Command line: see which attentions fxsparse finds in a model and what a pattern makes of them.

    python -m fxsparse inspect MODEL [--input SHAPE | --tokens B,N] [--pattern EXPR]
                                     [--block-size N] [--layers RANGE] [--model-kwargs KW]
                                     [--plot PATH]

MODEL is ``timm:NAME`` (random weights), ``torchvision:NAME`` (weights=None) or
``module.path:callable`` (called with no arguments; it returns an nn.Module). The model is
transformed in eval mode with a random example input, run once and the report is printed.

    python -m fxsparse inspect timm:vit_tiny_patch16_224 \\
        --pattern 'local_2d(window=2, prefix_tokens=1)' --block-size 32 --layers 0:6 --plot sites.png

--pattern is a call of fxsparse.patterns factories with literal arguments (default ``dense()``);
--layers is ``A:B`` or ``i,j,k`` (site indices); --model-kwargs is ``key=literal,...`` passed to
the model's constructor (e.g. ``img_size=32,patch_size=8``); --plot draws each rewritten site's
layout (full / partial / empty blocks) into an image. Errors exit with status 2.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import sys

import torch

import fxsparse
from fxsparse import patterns

# the mask_fn factories; the *_mask builders return tensors, not mask_fns
FACTORIES = [n for n in patterns.__all__ if n != "MaskFn" and not n.endswith("_mask")]


class CliError(Exception):
    pass


def parse_literal_kwargs(text: str) -> dict:
    """``"a=1,b=(2, 3)"`` -> ``{"a": 1, "b": (2, 3)}``; literals only."""
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        if call.args or any(kw.arg is None for kw in call.keywords):
            raise ValueError("give key=value pairs")
        return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as err:
        raise CliError(f"--model-kwargs {text!r}: expected key=literal,... ({err})") from None


def _is_literal(node) -> bool:
    """int/float/bool/str/None, a negative number, or a tuple/list of those (grid=(14, 14))."""
    if isinstance(node, ast.Constant):
        return node.value is None or isinstance(node.value, (int, float, str))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return isinstance(node.operand, ast.Constant) and type(node.operand.value) in (int, float)
    return isinstance(node, (ast.Tuple, ast.List)) and all(
        _is_literal(e) and not isinstance(e, (ast.Tuple, ast.List)) for e in node.elts)


def _pattern_node(node, text):
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise CliError(f"--pattern {text!r}: expected a call like dense() or local_2d(window=2), "
                       f"got {ast.unparse(node)!r}")
    name = node.func.id
    if name not in FACTORIES:
        raise CliError(f"--pattern {text!r}: unknown pattern {name!r}; known: {', '.join(FACTORIES)}")

    def value(arg):
        if isinstance(arg, ast.Call):
            return _pattern_node(arg, text)
        if _is_literal(arg):
            return ast.literal_eval(arg)
        raise CliError(f"--pattern {text!r}: argument {ast.unparse(arg)!r} of {name} is not a "
                       f"literal (int, float, bool, str, None, or a tuple of them) or a pattern")

    if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
        raise CliError(f"--pattern {text!r}: * and ** arguments are not allowed")
    args = [value(a) for a in node.args]
    kwargs = {k.arg: value(k.value) for k in node.keywords}
    try:
        return getattr(patterns, name)(*args, **kwargs)
    except (TypeError, ValueError) as err:
        raise CliError(f"--pattern {text!r}: {err}") from None


def parse_pattern(text: str):
    """A mask_fn from an expression of fxsparse.patterns calls with literal arguments."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        raise CliError(f"--pattern {text!r}: not an expression ({err.msg})") from None
    return _pattern_node(tree.body, text)


def parse_ints(text: str, flag: str, slices: bool = False):
    """``1,3,224,224`` -> [1, 3, 224, 224]; with ``slices`` also ``0:6`` -> range(0, 6)."""
    try:
        if slices and ":" in text:
            start, stop = text.split(":")
            return range(int(start or 0), int(stop))
        return [int(i) for i in text.split(",")]
    except ValueError:
        raise CliError(f"{flag} {text!r}: expected comma-separated integers"
                       f"{' or A:B' if slices else ''}") from None


def load_model(spec: str, kwargs: dict) -> torch.nn.Module:
    source, _, name = spec.partition(":")
    if not name:
        raise CliError(f"model {spec!r}: expected timm:NAME, torchvision:NAME or module.path:callable")
    try:
        if source == "timm":
            import timm
            model = timm.create_model(name, pretrained=False, **kwargs)
        elif source == "torchvision":
            import torchvision
            model = getattr(torchvision.models, name)(weights=None, **kwargs)
        else:
            model = getattr(importlib.import_module(source), name)(**kwargs)
    except Exception as err:  # unknown name, missing module, bad kwargs: one line
        raise CliError(f"model {spec!r}: {type(err).__name__}: {err}") from None
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"model {spec!r}: returned {type(model).__name__}, not an nn.Module")
    return model


def with_block_size(mask_fn, block_size: int):
    def fn(site):
        return mask_fn.at(site.q_len, site.kv_len, num_heads=site.num_heads, block_size=block_size, site=site)
    return patterns.MaskFn(fn, getattr(mask_fn, "__name__", "mask_fn"))


def inspect(args) -> None:
    mask_fn = parse_pattern(args.pattern)
    if args.layers:
        mask_fn = patterns.only(mask_fn, layers=parse_ints(args.layers, "--layers", slices=True))
    if args.block_size:
        mask_fn = with_block_size(mask_fn, args.block_size)
    if args.tokens:
        x = torch.randint(0, 100, parse_ints(args.tokens, "--tokens"), dtype=torch.int64)
    else:
        x = torch.randn(parse_ints(args.input or "1,3,224,224", "--input"))
    model = load_model(args.model, parse_literal_kwargs(args.model_kwargs) if args.model_kwargs else {})
    model.eval()
    noise = io.StringIO()  # torch.fx prints the generated code's traceback when a forward fails
    try:
        with contextlib.redirect_stderr(noise):
            sparse = fxsparse.transform(model, mask_fn, example_inputs=(x,))
            with torch.no_grad():
                sparse(x)
    except Exception as err:  # trace failures, mask_fn errors, shape errors
        first = (str(err).strip().splitlines() or [""])[0]
        raise CliError(f"{args.model}: {type(err).__name__}: {first}") from None
    sys.stderr.write(noise.getvalue())  # warnings of a run that worked
    report = fxsparse.report(sparse)
    print(report)
    if args.plot:
        try:
            report.plot(args.plot)
        except (ImportError, ValueError) as err:
            raise CliError(f"--plot {args.plot}: {err}") from None
        print(f"wrote {args.plot}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxsparse", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="transform a model, run it once and print the report")
    p.add_argument("model", help="timm:NAME, torchvision:NAME or module.path:callable")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--input", help="shape of a float input (default 1,3,224,224)")
    group.add_argument("--tokens", help="B,N: random int64 token ids < 100")
    p.add_argument("--pattern", default="dense()", help="e.g. 'local_2d(window=2, prefix_tokens=1)'")
    p.add_argument("--block-size", type=int, help="cut token masks into blocks of N tokens")
    p.add_argument("--layers", help="site indices: A:B or i,j,k")
    p.add_argument("--plot", metavar="PATH", help="draw each rewritten site's layout into PATH (.png, .svg, .pdf; "
                   "needs matplotlib)")
    p.add_argument("--model-kwargs", help="key=literal,... passed to the model's constructor")
    args = parser.parse_args(argv)
    try:
        inspect(args)
    except CliError as err:
        print(f"fxsparse: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
