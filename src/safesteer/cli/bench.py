"""`safesteer bench extract|sae|steer-eval`: the benchmarks in bench/, reachable from the CLI."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    bench = typer.Typer(
        help="Benchmarks (ratios against a baseline measured in the same run).", no_args_is_help=True
    )

    @bench.command("extract", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def extract_bench(ctx: typer.Context) -> None:
        """Naive HF loop vs safesteer's extractor (SmolLM2, layer 15, 2,000 real texts)."""
        from safesteer.bench.extract import main

        main(list(ctx.args))

    @bench.command("sae", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def sae_bench(ctx: typer.Context) -> None:
        """Textbook fp32 Gated SAE step vs safesteer's trainer."""
        from safesteer.bench.sae import main

        main(list(ctx.args))

    @bench.command("steer-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def steer_eval_bench(ctx: typer.Context) -> None:
        """Steered evaluation: full forward passes vs the prefix cache (SmolLM2, layer 15)."""
        from safesteer.bench.steer_eval import main

        main(list(ctx.args))

    app.add_typer(bench, name="bench")
