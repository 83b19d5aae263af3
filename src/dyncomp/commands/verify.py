"""`dyncomp verify`: check invariants 1 and 4 on a model, with or without a trained compressor."""

from __future__ import annotations

import argparse

from dyncomp.commands.common import add_model_options


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("verify", help="check that compressed training and decoding agree on this model")
    add_model_options(parser)
    parser.add_argument("--compressor", default=None, help="trained compressor folder; without it a randomized untrained adapter is checked")
    parser.add_argument("--k", type=int, default=1, help="<COMP> tokens per compression when no --compressor is given")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed logit difference between parallel and online decoding")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dyncomp.compression.verify import randomize_adapter, unsupported_reason, verify_invariants
    from dyncomp.models.compressed import load_compressed_model

    # fp32 on every device: the check compares logits to 1e-4, which bf16 rounding alone exceeds.
    loaded = load_compressed_model(args.model, args.compressor, device=args.device, dtype=args.dtype or "fp32", k=args.k)
    reason = unsupported_reason(loaded.model)
    if reason is not None:
        print(f"NOT SUPPORTED: {args.model}: {reason}")
        return 1
    if not loaded.trained:
        randomize_adapter(loaded.model)
        print("no --compressor given: checking an untrained adapter with random LoRA-B weights")

    result = verify_invariants(loaded.model, loaded.tokenizer, loaded.comp, keep_prompt=loaded.config.keep_prompt, tolerance=args.tolerance)
    print(f"model {args.model}, k={loaded.comp.k}, keep_prompt={loaded.config.keep_prompt}")
    print(f"invariant 1, parallel vs online decoding, max |logit difference|: {result.parallel_vs_recurrent:.3e} (tolerance {result.tolerance:.0e})")
    print(f"invariant 4, adapter vs base without <COMP>, max |logit difference| outside the <COMP> columns: {result.adapter_vs_base:.3e} (must be 0)")
    print(f"for reference, the adapter's effect on a sequence with <COMP>: {result.comp_changes_output:.3e}")
    print("PASS" if result.passed else "FAIL")
    return 0 if result.passed else 1
