"""`hmt lm-eval`: lm-evaluation-harness's own command line, with the `hmt` model registered."""

from __future__ import annotations

import sys

import typer


def lm_eval_command(ctx: typer.Context) -> None:
    """lm-evaluation-harness with the hmt model: takes lm-eval's arguments unchanged, e.g.
    `hmt lm-eval --model hmt --model_args adapter=DIR,segment_length=256 --tasks wikitext`.
    (lm-eval finds models only in its own registry; this registers `hmt` first. `hmt lm-eval --help`
    shows lm-eval's help; model args are in docs/lm-eval.md.)"""
    try:
        import lm_eval.__main__ as lm_eval_main

        import hmt.harness  # noqa: F401  (registers the model "hmt")
    except ImportError as err:
        raise ImportError(
            f"hmt lm-eval needs lm-evaluation-harness: pip install 'hmt-lm[eval]' ({err})"
        ) from err
    argv = sys.argv
    sys.argv = ["lm-eval", *ctx.args]  # lm-eval's parser reads sys.argv only
    try:
        lm_eval_main.cli_evaluate()
    finally:
        sys.argv = argv
