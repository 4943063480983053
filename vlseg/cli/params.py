"""``vlseg params``: parameter counts of a config's network, without allocating it."""

from __future__ import annotations

import argparse

from vlseg.errors import VlsegError, run_guarded


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlseg params", description=(
        "Count the parameters a config builds (image encoder and fusion; the text tower is not built), without "
        "allocating them."))
    parser.add_argument("config", help="experiment YAML, e.g. configs/reference/sat_nano.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--text-dim", type=int, default=None,
                        help="the text tower's width (default: 512 for clip, as ViT-B; 768 otherwise, as BERT-base)")
    args = parser.parse_args(argv)

    def go():
        from vlseg.config import load_config
        from vlseg.models.network import count_parameters

        cfg = load_config(args.config, args.overrides)
        text_dim = args.text_dim or (512 if cfg["text_encoder"].get("name") == "clip" else 768)
        try:
            counts = count_parameters(cfg, text_dim)
        except (TypeError, ValueError) as exc:
            raise VlsegError(f"{args.config}: cannot build the network ({exc})") from None
        for key, n in counts.items():
            print(f"{key:<14} {n / 1e6:10.2f} M")
        print(f"(text tower of width {text_dim} not counted)")

    return run_guarded(go)
