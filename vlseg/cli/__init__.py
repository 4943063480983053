"""The ``vlseg`` command: one verb per module of this package, imported only when chosen.

Bad input ends in one line on stderr, ``error: <file>: <problem>``, and exit status 2 — never a traceback
(``vlseg.errors.run_guarded``).
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time; fail fast instead of retrying
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# verb → one line of help, in the order the data flows; the verb's module is vlseg.cli.<verb> and has main(argv).
VERBS = {
    "prepare": "build a corpus and its cache: vlseg prepare {convert,cache,phantoms,samples} ...",
    "classes": "list or search the canonical vocabulary (--json, --modality CT)",
    "train": "train a model: vlseg train --config configs/phantom.yaml [key=value ...]",
    "align-text": "adapt a text tower contrastively on the vocabulary: vlseg align-text --out DIR",
    "params": "parameter counts of a config's network, e.g. vlseg params configs/reference/sat_pro.yaml",
    "launch": "accelerate launch, e.g. vlseg launch --multi_gpu --num_processes 8 train.py ...",
    "import": "a released model as a vlseg model: vlseg import {sat-nano,sat-pro,clip-universal-*,voxtell} ...",
    "export": "consolidated fp32 copy of a (DeepSpeed) checkpoint, without optimiser state",
    "predict": "segment a scan: vlseg predict -i scan.nii.gz -p 'liver tumor' -p liver -o out/",
    "calibrate": "choose the presence threshold on a validation split and store it with the checkpoint",
    "evaluate": "score a checkpoint on a manifest split (Dice, NSD, HD95)",
    "ablate": "run an ablation study and tabulate it: vlseg ablate configs/ablations/fusion.yaml",
    "demo": "the main job: corpus -> train -> evaluate -> predict 'liver tumor'",
}
MODULES = {"import": "import_", "align-text": "align_text"}  # verbs that are not module names


def usage() -> str:
    width = max(map(len, VERBS))
    return "usage: vlseg {" + ",".join(VERBS) + "} ...\n" + "\n".join(
        f"  {verb:<{width}}  {text}" for verb, text in VERBS.items())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in VERBS:
        print(usage(), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = MODULES.get(argv[0], argv[0])
    return importlib.import_module(f"vlseg.cli.{module}").main(argv[1:])
