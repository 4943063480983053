"""Ablation studies: a YAML grid × seeds → training and evaluation runs → one table.

    vlseg ablate configs/ablations/<study>.yaml                  # run what is missing, then the table
    vlseg ablate configs/ablations/<study>.yaml --emit-commands  # one shell line per run, for a scheduler
    vlseg ablate configs/ablations/<study>.yaml --collect        # only the table, from finished runs
    vlseg ablate configs/ablations/<study>.yaml --seeds 0        # only some of the study's seeds
    vlseg ablate configs/ablations/<study>.yaml --variants naive # ... or of its variants

A study file::

    name: masked_vs_naive              # default: the file's stem
    base: configs/phantom.yaml         # the experiment every run starts from
    overrides: [train.steps=300]       # applied to every run
    variants:                          # named sets of overrides (optional) ...
      masked: [loss.name=masked]
      naive: [loss.name=naive]
    grid:                              # ... and/or keys whose values are crossed (optional)
      fusion.layers: [1, 2]
    seeds: [0, 1, 2]
    evaluate: {split: test}            # manifest: default the run's own; all_classes: false; retrieval: false
    output: checkpoints/ablations/masked_vs_naive
    table: docs/results/masked_vs_naive   # where the markdown/CSV/PNG go (default: output)

Every variant × grid point × seed is one run in ``<output>/<variant>/seed<k>/``, starting from
``<output>/base.yaml`` (``base`` plus ``overrides``), trained with ``--resume auto`` (a run that finished is skipped,
an interrupted one continues) and evaluated once.  A run identical to a finished run of another study under the same
parent folder (the same resolved config apart from where it is written) is linked to that run instead of being trained
again.  The table gives each metric declared for ablation tables (Dice; ``vlseg.evaluate.metrics``), mean ± std over
seeds per class and overall (and on held-out paraphrases where the vocabulary has them), with the compute each cost:
parameters in the checkpoint, training time (``run_info.json``) and evaluation seconds per case.  Under each variant, a
row gives each figure's 95% bootstrap interval over cases and prompts, from the per-case rows of its evaluated seeds
pooled (``tables`` says how they are resampled).  Where paraphrases were asked, a prompting table follows: Dice by
name and by paraphrase and their ratio, the presence head's absent-target false positives and misses both ways, and
(``retrieval: true``: every evaluation also ranks the classes for each held-out paraphrase with the text encoder
alone) retrieval top-1/top-5, each with its interval.  A table resting on one seed or one case says so below it.

The study file is read in ``study``, its runs trained and evaluated (or emitted as shell lines) in ``runner``, and
tabulated in ``tables``.
"""
